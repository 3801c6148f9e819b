"""The server's TLS files, checked before anything starts: grpc itself only fails to bind the port
when it cannot use them, which reads like a port in use, and serves an expired certificate silently."""
from __future__ import annotations

import base64
import logging
import re
import ssl
from datetime import datetime, timezone
from pathlib import Path

from batchrl.errors import UserError

log = logging.getLogger("batchrl.serve")


def check_tls(cert: str | None, key: str | None, ca: str | None) -> None:
    """Refuse TLS files grpc could not use, in one line naming the file and its problem: grpc itself only
    fails to bind the port, which reads like a port in use. (OpenSSL reads PEM files as grpc does.)"""
    if not cert and not key:
        if ca:
            raise ValueError("--client-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
        return
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    ca = ca or None
    check_pem({"--tls-cert": cert, "--tls-key": key, "--client-ca": ca}, ssl.PROTOCOL_TLS_SERVER)


def check_pem(files: dict[str, str | Path | None], protocol: int, shown: dict[str, str] | None = None) -> None:
    """Load PEM files as OpenSSL (grpc's) will, the server's or the client's: ``files`` maps three flags,
    in order the certificate, its key and the CA that signs the other side's certificates, to a path or
    None (the key goes with the certificate). ``shown``: a flag's name for the file in messages, when not
    its path. UserError naming the first file grpc could not use."""
    (cert_flag, cert), (key_flag, key), (ca_flag, ca) = files.items()
    name = lambda flag: (shown or {}).get(flag, str(files[flag]))  # noqa: E731
    context = ssl.SSLContext(protocol)
    if cert is not None:
        tls_file(cert_flag, name(cert_flag), "a PEM certificate", lambda: context.load_verify_locations(cafile=cert))
        # (a password callback: an encrypted key, which grpc cannot use either, fails instead of prompting)
        tls_file(key_flag, name(key_flag), "an unencrypted PEM private key",
                 lambda: context.load_cert_chain(cert, key, password=lambda: b""),
                 mismatch=f"mismatched key: not the private key of {cert_flag} {name(cert_flag)}")
    if ca is not None:
        tls_file(ca_flag, name(ca_flag), "a PEM CA certificate", lambda: context.load_verify_locations(cafile=ca))


def tls_file(flag: str, path: str, expected: str, load, mismatch: str = "") -> None:
    """``load()`` the file; UserError naming it and what is wrong with it (``mismatch``: when OpenSSL
    says the key is not the certificate's)."""
    try:
        load()
    except ssl.SSLError as exc:
        problem = mismatch if mismatch and exc.reason == "KEY_VALUES_MISMATCH" else f"not {expected}"
        raise UserError(f"{flag} {path}: {problem}") from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def warn_expiry(cert: str) -> None:
    """Say when the server certificate is outside its validity dates: grpc serves it anyway, and clients
    refuse every handshake."""
    pem = re.search(r"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.+?)-----END", Path(cert).read_text("latin-1"),
                    re.S)
    try:
        not_before, not_after = validity(base64.b64decode(pem.group(1)))
    except (AttributeError, ValueError, IndexError):  # not the usual layout: OpenSSL read it, grpc will judge
        log.info("--tls-cert %s: its validity dates could not be read", cert)
        return
    now = datetime.now(timezone.utc)
    if now > not_after:
        log.warning("--tls-cert %s expired on %s (notAfter): clients that check it refuse every connection",
                    cert, f"{not_after:%Y-%m-%d %H:%M:%S} UTC")
    elif now < not_before:
        log.warning("--tls-cert %s is not valid before %s (notBefore): clients that check it refuse every "
                    "connection until then", cert, f"{not_before:%Y-%m-%d %H:%M:%S} UTC")


def validity(der: bytes) -> tuple[datetime, datetime]:
    """notBefore and notAfter of a DER X.509 certificate (RFC 5280 4.1: Certificate > TBSCertificate >
    Validity), read without a dependency beyond the standard library, which has no public parser."""
    def element(at: int) -> tuple[int, int, int]:  # tag, start and end of the content of the element at ``at``
        tag, size, at = der[at], der[at + 1], at + 2
        if size & 0x80:  # long form: the next size & 0x7f bytes hold the length
            count = size & 0x7F
            size, at = int.from_bytes(der[at:at + count], "big"), at + count
        return tag, at, at + size

    at = element(element(0)[1])[1]  # into the certificate, then into its TBSCertificate
    if der[at] == 0xA0:  # [0] version, absent from version 1 certificates
        at = element(at)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        at = element(at)[2]
    at = element(at)[1]  # into Validity
    times = []
    for _ in range(2):
        tag, start, at = element(at)
        text = der[start:at].decode("ascii")
        if tag == 0x17:  # UTCTime, two-digit years: 50-99 are 19xx (RFC 5280 4.1.2.5.1)
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        times.append(datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc))
    return times[0], times[1]
