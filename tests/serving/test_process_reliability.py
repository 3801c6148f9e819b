"""The serving process at its edges (issue 31, items 3 and 13): `--workers` processes die with their
supervisor however it dies, TLS files grpc cannot use are named at start (not reported as a busy port),
a certificate outside its dates is warned about, and failed TLS handshakes do not flood the log."""
import datetime
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2

from tests.serving import blackbox


@pytest.fixture(scope="module")
def empty_repository(tmp_path_factory) -> Path:
    """No models: these tests are about the process, and it starts fastest with nothing to load."""
    return tmp_path_factory.mktemp("no-models")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has exited; it holds no port)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after ``timeout`` seconds (none, as soon as all have exited)."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def test_workers_die_with_their_killed_supervisor_and_free_the_port(empty_repository):
    server = blackbox.start(empty_repository, "--workers", "2", "--grace", "1")
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", server.log)]
    try:
        server.wait_log(r"2 workers serving", timeout=60)  # (start() returns once the first one serves)
        assert len(pids) == 2 and all(alive(p) for p in pids), server.log
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert wait_gone(pids, timeout=10) == [], f"workers outlived their SIGKILLed supervisor:\n{server.log}"
        time.sleep(0.1)  # the reader takes the workers' last lines
        assert server.log.count("SIGTERM: draining") == 2, server.log  # each drained, as on an operator's SIGTERM
        with blackbox.serving(empty_repository, "--address", server.address) as again:  # the port is free
            assert again.port == server.port
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_stops_when_its_link_to_the_supervisor_closes_or_the_supervisor_is_not_its_parent(
        empty_repository):
    """The fallbacks for when the death signal cannot come: here this test is the worker's parent and
    stays alive, so only the link's end-of-file, or the parent check, can stop the worker."""
    def worker(supervisor: int) -> tuple[socket.socket, subprocess.Popen]:
        mine, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(empty_repository),
                                 "--address", "127.0.0.1:0", "--grace", "1", "--worker-index", "0",
                                 "--ready-fd", str(theirs.fileno()), "--supervisor-pid", str(supervisor)],
                                pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=tempfile.gettempdir())
        theirs.close()
        return mine, proc

    (link, linked), (other, orphan) = worker(os.getpid()), worker(1)  # 1: not its parent
    try:
        link.settimeout(60)
        assert link.recv(1) == b"1", linked.communicate(timeout=10)[0]  # it serves
        link.close()  # as the supervisor's death closes it
        out = linked.communicate(timeout=10)[0]
        assert linked.returncode == 0 and "the supervisor" in out and "stopped" in out, out
        out = orphan.communicate(timeout=60)[0]
        assert orphan.returncode != 0 and "the supervisor (pid 1) that started this worker is gone" in out, out
        assert "Traceback" not in out and "serving 0 models" not in out, out
    finally:
        for proc in (linked, orphan):
            if proc.poll() is None:
                proc.kill()
        other.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    """Throwaway certificate authorities and the files the servers read."""
    root = tmp_path_factory.mktemp("pki")
    ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    files: dict[str, object] = {"ca": ca, "client_ca": client_ca, "stranger": stranger}

    def write(name: str, blob) -> str:
        blob.write_to_path(str(root / name))
        files[name] = str(root / name)
        return files[name]

    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("other", ca.issue_cert("127.0.0.1")),
                       ("expired", ca.issue_cert("127.0.0.1", not_before=datetime.datetime(2020, 1, 1),
                                                 not_after=datetime.datetime(2021, 3, 4, 5, 6, 7))),
                       ("future", ca.issue_cert("127.0.0.1", not_before=datetime.datetime(2098, 7, 6),
                                                not_after=datetime.datetime(2099, 1, 1)))):
        write(f"{name}.pem", cert.cert_chain_pems[0])
        write(f"{name}.key", cert.private_key_pem)
    write("client-ca.pem", client_ca.cert_pem)
    (root / "garbage.pem").write_text("this is not a certificate\n")
    files["garbage.pem"] = str(root / "garbage.pem")
    return files


def test_tls_files_grpc_cannot_use_are_named_at_start(empty_repository, pki):
    cert, key = ["--tls-cert", pki["server.pem"]], ["--tls-key", pki["server.key"]]
    cases = {  # arguments: what the one line must say
        ("--tls-cert", pki["server.pem"], "--tls-key", pki["other.key"]):
            f"--tls-key {pki['other.key']}: mismatched key: not the private key of --tls-cert {pki['server.pem']}",
        ("--tls-cert", pki["garbage.pem"], *key): f"--tls-cert {pki['garbage.pem']}: not a PEM certificate",
        (*cert, *key, "--client-ca", pki["garbage.pem"]): f"--client-ca {pki['garbage.pem']}: not a PEM CA certificate",
        (*cert, "--tls-key", pki["server.key"] + ".missing"):
            f"--tls-key {pki['server.key']}.missing: cannot read it (No such file or directory)",
        ("--workers", "2", "--tls-cert", pki["server.pem"], "--tls-key", pki["other.key"]):
            f"--tls-key {pki['other.key']}: mismatched key",
    }
    servers = {args: blackbox.start(empty_repository, *args, ready=False) for args in cases}  # all at once
    for args, server in servers.items():
        assert server.proc.wait(timeout=60) != 0, server.log
    time.sleep(0.1)  # the readers take the last lines
    for args, server in servers.items():
        assert cases[args] in server.log, server.log
        assert "port is in use" not in server.log and "Traceback" not in server.log, server.log
        assert "worker 0 started" not in server.log, server.log  # a supervisor checks before starting any


def test_a_certificate_outside_its_dates_is_warned_about(empty_repository, pki):
    expired = blackbox.start(empty_repository, "--tls-cert", pki["expired.pem"], "--tls-key", pki["expired.key"],
                             ready=False)
    future = blackbox.start(empty_repository, "--tls-cert", pki["future.pem"], "--tls-key", pki["future.key"],
                            ready=False)
    try:
        line = expired.wait_log(r"WARNING .*expired.*", timeout=60).group()
        assert pki["expired.pem"] in line and "2021-03-04 05:06:07 UTC" in line, line
        line = future.wait_log(r"WARNING .*not valid before.*", timeout=60).group()
        assert pki["future.pem"] in line and "2098-07-06 00:00:00 UTC" in line, line
        expired.wait_log(r"\(port \d+\)", timeout=60)  # it serves all the same: the clients decide
    finally:
        expired.stop()
        future.stop()


def test_failed_tls_handshakes_do_not_flood_the_log(empty_repository, pki):
    client = pki["client_ca"].issue_cert("controller-1")
    trusted = grpc.ssl_channel_credentials(pki["ca"].cert_pem.bytes(), client.private_key_pem.bytes(),
                                           client.cert_chain_pems[0].bytes())
    with blackbox.serving(empty_repository, "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                          "--client-ca", pki["client-ca.pem"], credentials=trusted) as server:
        stranger = pki["stranger"].issue_cert("intruder")
        bad = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bad.check_hostname, bad.verify_mode = False, ssl.CERT_NONE
        with tempfile.TemporaryDirectory() as folder:
            stranger.cert_chain_pems[0].write_to_path(f"{folder}/c.pem")
            stranger.private_key_pem.write_to_path(f"{folder}/k.pem")
            bad.load_cert_chain(f"{folder}/c.pem", f"{folder}/k.pem")
        before = len(server.log)
        for attempt in range(400):  # half in plaintext, half with a client certificate of an unknown CA
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                try:
                    if attempt % 2:
                        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                        raw.recv(64)
                    else:
                        with bad.wrap_socket(raw) as tls:
                            tls.recv(64)  # (TLS 1.3: the refusal of the client certificate comes after)
                except (ssl.SSLError, OSError):
                    pass
        time.sleep(0.5)  # grpc logs from its own threads
        grown = server.log[before:]
        assert len(grown) < 5000, f"{len(grown)} bytes of log for 400 failed handshakes:\n{grown[:2000]}"
        with server.channel() as channel:  # and the server serves its own clients as before
            assert server.health(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
