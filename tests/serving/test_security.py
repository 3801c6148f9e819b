"""TLS and mutual TLS. (The per-client limit, stream limits and tokens: test_hardening.py; the fuzz
run of malformed requests beside valid traffic: test_fuzz.py.)"""
import grpc
import numpy as np
import pytest
import trustme

from batchrl.serving.client import PolicyClient
from batchrl.serving.server import ServerOptions
from tests.serving.running import running


def works(client):
    try:
        client.wait_ready(timeout=3)
        return client.act("pendulum", np.ones((1, 3), np.float32)).shape == (1, 1)
    except (grpc.RpcError, ConnectionError):  # wait_ready: ConnectionError when the channel never connects
        return False


def write(tmp_path, name, blob):
    path = tmp_path / name
    blob.write_to_path(str(path))
    return str(path)


def test_tls_and_mutual_tls(repository, tmp_path):
    ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = write(tmp_path, "cert.pem", server_cert.cert_chain_pems[0]), write(tmp_path, "key.pem",
                                                                                   server_cert.private_key_pem)
    trusted = ca.cert_pem.bytes()
    with running(repository, ServerOptions(tls_cert=cert, tls_key=key), connect=False) as srv:
        with PolicyClient(srv.address) as plain:
            assert not works(plain)  # plaintext is refused
        with PolicyClient(srv.address, tls_ca=trusted) as secure:
            assert works(secure)
    with running(repository, ServerOptions(tls_cert=cert, tls_key=key,
                                           client_ca=write(tmp_path, "client-ca.pem", client_ca.cert_pem)),
                 connect=False) as srv:
        with PolicyClient(srv.address, tls_ca=trusted) as anonymous:
            assert not works(anonymous)  # no client certificate
        for issuer, accepted in ((client_ca, True), (stranger, False)):
            mine = issuer.issue_cert("controller-7")
            with PolicyClient(srv.address, tls_ca=trusted, client_cert=mine.cert_chain_pems[0].bytes(),
                              client_key=mine.private_key_pem.bytes()) as client:
                assert works(client) is accepted
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerOptions(tls_cert=cert).credentials()
