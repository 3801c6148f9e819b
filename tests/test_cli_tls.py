"""The client commands (`batchrl models`, `batchrl rollout`) and PolicyClient against a TLS and a mutual-TLS
server: they connect with --tls-ca / --client-cert / --client-key (files; PolicyClient also takes bytes), and
a connection that fails for a TLS reason is one line saying so, at once, not "no server answered".

Each CLI case runs the real `batchrl` command in a subprocess, outside the checkout; the servers are spawned
`batchrl serve` processes (one per kind for the module)."""
import os
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme

from batchrl.serving.client import PolicyClient
from tests.serving import blackbox

ADMIN, DATA = "admin-secret-1234", "data-secret-5678"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    """Throwaway CAs (server, client, stranger) and the PEM files the commands read, by name."""
    root = tmp_path_factory.mktemp("pki")
    ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    files: dict[str, object] = {"ca": ca, "client_ca": client_ca}
    server, client, intruder = ca.issue_cert("127.0.0.1"), client_ca.issue_cert("rollout-1"), stranger.issue_cert("x")
    for name, blob in (("ca.pem", ca.cert_pem), ("stranger-ca.pem", stranger.cert_pem),
                       ("client-ca.pem", client_ca.cert_pem),
                       ("server.pem", server.cert_chain_pems[0]), ("server.key", server.private_key_pem),
                       ("client.pem", client.cert_chain_pems[0]), ("client.key", client.private_key_pem),
                       ("intruder.pem", intruder.cert_chain_pems[0]), ("intruder.key", intruder.private_key_pem)):
        blob.write_to_path(str(root / name))
        files[name] = str(root / name)
    (root / "garbage.pem").write_text("not a certificate\n")
    files["garbage.pem"] = str(root / "garbage.pem")
    for name, token in (("admin.token", ADMIN), ("data.token", DATA)):
        (root / name).write_text(token + "\n")
        files[name] = str(root / name)
    return files


@pytest.fixture(scope="module")
def tls_server(repository, pki):
    """TLS, with model management (the admin token)."""
    with blackbox.serving(repository, "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                          env={"BATCHRL_ADMIN_TOKEN": ADMIN},
                          credentials=grpc.ssl_channel_credentials(pki["ca"].cert_pem.bytes())) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(repository, pki):
    """Mutual TLS, and a data-plane token on every call."""
    client = pki["client_ca"].issue_cert("fixture")
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert_pem.bytes(), client.private_key_pem.bytes(),
                                               client.cert_chain_pems[0].bytes())
    with blackbox.serving(repository, "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                          "--client-ca", pki["client-ca.pem"], "--data-token-file", pki["data.token"],
                          credentials=credentials) as server:
        yield server


@pytest.fixture(scope="module")
def plaintext_address():
    """A plaintext gRPC server (no services: the handshake is all that is asked of it)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def batchrl(*args) -> subprocess.Popen:
    """The real command, started (several run at once); outside the checkout, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHRL_ADMIN_TOKEN", "BATCHRL_DATA_TOKEN")}
    return subprocess.Popen([sys.executable, "-m", "batchrl.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Failed (status 1) in one line on stderr holding every fragment, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_models_over_tls_and_mutual_tls(tls_server, mtls_server, pki):
    mine = ["--client-cert", pki["client.pem"], "--client-key", pki["client.key"]]
    runs = {
        "list": batchrl("models", "list", "--server", tls_server.address, "--tls-ca", pki["ca.pem"]),
        "load": batchrl("models", "load", "pendulum", "--server", tls_server.address, "--tls-ca", pki["ca.pem"],
                        "--admin-token-file", pki["admin.token"]),
        "unload-old-name": batchrl("models", "unload", "no-such-model", "--server", tls_server.address,
                                   "--tls-ca", pki["ca.pem"], "--token-file", pki["admin.token"]),
        "mtls": batchrl("models", "list", "--server", mtls_server.address, "--tls-ca", pki["ca.pem"], *mine,
                        "--data-token-file", pki["data.token"]),
        "mtls-no-token": batchrl("models", "list", "--server", mtls_server.address, "--tls-ca", pki["ca.pem"], *mine),
    }
    results = {name: finish(proc) for name, proc in runs.items()}
    for name in ("list", "mtls"):
        assert results[name].returncode == 0, results[name].stderr
        assert "pendulum version 2" in results[name].stdout, results[name].stdout
    assert results["load"].returncode == 0 and "pendulum: loaded" in results["load"].stdout, results["load"].stderr
    # --token-file is still the admin token's: the server checked it and answered about the model
    one_line(results["unload-old-name"], "NOT_FOUND", "no-such-model")
    one_line(results["mtls-no-token"], "UNAUTHENTICATED", "data token")  # connected; the token is missing


def test_tls_mistakes_are_one_line_naming_tls(tls_server, mtls_server, plaintext_address, pki):
    tls, mtls = tls_server.address, mtls_server.address
    cases = {  # arguments: what the one line must say
        ("models", "list", "--server", tls): [f"cannot reach {tls}", "speaks TLS", "--tls-ca"],
        ("models", "list", "--server", tls, "--tls-ca", pki["stranger-ca.pem"]):
            [f"cannot reach {tls} over TLS", f"not signed by --tls-ca {pki['stranger-ca.pem']}"],
        ("models", "list", "--server", plaintext_address, "--tls-ca", pki["ca.pem"]):
            [f"cannot reach {plaintext_address} over TLS", "does not speak TLS"],
        ("models", "list", "--server", mtls, "--tls-ca", pki["ca.pem"]):
            [f"cannot reach {mtls} over TLS", "requires a client certificate", "--client-cert"],
        ("models", "list", "--server", mtls, "--tls-ca", pki["ca.pem"], "--client-cert", pki["intruder.pem"],
         "--client-key", pki["intruder.key"]):
            [f"cannot reach {mtls} over TLS", f"did not accept --client-cert {pki['intruder.pem']}"],
        ("models", "list", "--server", tls, "--tls-ca", pki["garbage.pem"]):
            [f"--tls-ca {pki['garbage.pem']}: not a PEM CA certificate"],
        ("models", "list", "--server", tls, "--tls-ca", pki["ca.pem"] + ".missing"):
            [f"--tls-ca {pki['ca.pem']}.missing: cannot read it (No such file or directory)"],
        ("models", "list", "--server", mtls, "--tls-ca", pki["ca.pem"], "--client-cert", pki["client.pem"],
         "--client-key", pki["intruder.key"]):
            [f"--client-key {pki['intruder.key']}: mismatched key: not the private key of --client-cert "
             f"{pki['client.pem']}"],
        ("rollout", "--model", "pendulum", "--server", mtls, "--tls-ca", pki["ca.pem"], "--client-cert",
         pki["client.pem"]): ["--client-cert and --client-key", "go together"],
    }
    runs = {args: batchrl(*args) for args in cases}  # all at once
    for args, proc in runs.items():
        line = one_line(finish(proc), *cases[args])
        assert "no server answered" not in line, line


def test_rollout_over_mutual_tls_with_a_data_token(mtls_server, pki):
    result = finish(batchrl("rollout", "--model", "pendulum", "--env", "Pendulum-v1", "--episodes", "1",
                            "--server", mtls_server.address, "--tls-ca", pki["ca.pem"],
                            "--client-cert", pki["client.pem"], "--client-key", pki["client.key"],
                            "--token-file", pki["data.token"]))
    assert result.returncode == 0, result.stderr
    assert "episode 1/1 (seed 0): return" in result.stdout, result.stdout


def test_policy_client_takes_paths_or_bytes(tls_server, mtls_server, pki):
    ca = pki["ca.pem"]
    for given in (ca, Path(ca), Path(ca).read_bytes()):
        with PolicyClient(tls_server.address, tls_ca=given) as client:
            client.wait_ready(10)
            assert [m.name for m in client.list_models()] == ["pendulum"]
    for cert, key in ((pki["client.pem"], pki["client.key"]),
                      (Path(pki["client.pem"]).read_bytes(), Path(pki["client.key"]).read_bytes())):
        with PolicyClient(mtls_server.address, tls_ca=Path(ca), client_cert=cert, client_key=key,
                          token=DATA) as client:
            client.wait_ready(10)
            assert [m.name for m in client.list_models()] == ["pendulum"]
    with PolicyClient(tls_server.address, tls_ca=Path(pki["stranger-ca.pem"]).read_bytes()) as client:
        with pytest.raises(ConnectionError, match="over TLS: the server's certificate is not signed by "
                                                  "--tls-ca <bytes>"):
            client.wait_ready(10)
