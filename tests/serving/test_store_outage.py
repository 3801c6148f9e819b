"""Black-box tests of a Redis session store that hangs or fails: a spawned `batchrl serve` on a private
redis-server (with a password) that the tests SIGSTOP, raw gRPC calls, the metrics endpoint and the log.
A hung store costs session calls only: they fail fast (short timeout, bounded calls in flight, circuit
breaker), health and Act always answer, the sweeper lives on, and the password is never shown."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2

from tests import redis_server
from tests.serving import blackbox
from tests.serving.blackbox import policy_pb2

MODELS = Path(__file__).resolve().parents[2] / "models"
SEQUENCE, FEED_FORWARD = "hopper-dt", "hopper-iql"  # the checkout's models: nothing to train
PASSWORD = "s3cret-Pa55word"
OBS = np.linspace(-0.5, 0.5, 11, dtype=np.float32)  # hopper: 11-dim observations
CLIENTS = 200
SESSION_TIMEOUT = 1.0  # the sweeper runs every half second


def tensor(array) -> policy_pb2.Tensor:
    array = np.asarray(array, np.float32)
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


@pytest.fixture(scope="module")
def store():
    """(the redis-server process, a URL with its password in the query: the form the issue found leaking)."""
    proc, url = redis_server.start()
    try:
        client = redis.Redis.from_url(url)
        client.config_set("requirepass", PASSWORD)
        client.close()
        yield proc, f"{url}?password={PASSWORD}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process does not act on SIGTERM
        redis_server.stop(proc)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """A Decision Transformer (sessions) and a feed-forward policy (Act) in one repository."""
    repo = tmp_path_factory.mktemp("store-outage-models")
    for name in (SEQUENCE, FEED_FORWARD):
        shutil.copytree(MODELS / name / "1", repo / name / "1")
    return repo


@pytest.fixture(scope="module")
def server(repository, store):
    """One server for the module: the default gRPC threads (64); a short store timeout and cool-down, so that
    outages are short; few store calls in flight, so that 200 clients surely meet that cap before the
    breaker opens."""
    _, url = store
    srv = blackbox.start(repository, "--session-store", url, "--session-timeout", str(SESSION_TIMEOUT),
                         "--store-timeout", "0.2", "--store-max-in-flight", "8", "--store-breaker-failures", "3",
                         "--store-breaker-cooldown", "0.5", metrics=True)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def hung(proc):
    """Redis stopped, not closed: its connections stay open and nothing answers."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def code_of(call, request, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def open_when_back(stub, within: float = 10.0) -> str:
    """A session opened as soon as the store answers again (the breaker's probe closes it)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return stub.OpenSession(policy_pb2.OpenSessionRequest(model=SEQUENCE), timeout=5).session_id
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_hung_store_fails_session_calls_fast_while_health_and_act_answer(server, store):
    proc, _ = store
    channels = [server.channel() for _ in range(8)]  # 200 clients over 8 connections, as many as a few hosts
    probe = server.channel()
    try:
        stubs = [server.policy(channel) for channel in channels]
        sessions = [stubs[0].OpenSession(policy_pb2.OpenSessionRequest(model=SEQUENCE), timeout=10).session_id
                    for _ in range(4)]
        answers: list[tuple[grpc.StatusCode, float, str]] = []  # (code, seconds, details) of every session call
        lock, stop = threading.Lock(), threading.Event()

        def client(i: int) -> None:
            """Steps a session, or opens one, again and again, backing off a little after each answer."""
            stub = stubs[i % len(stubs)]
            step = policy_pb2.StepRequest(session_id=sessions[i % len(sessions)], observation=tensor(OBS), index=0)
            while not stop.is_set():
                call, request = ((stub.Step, step) if i % 2 else
                                 (stub.OpenSession, policy_pb2.OpenSessionRequest(model=SEQUENCE)))
                start = time.monotonic()
                code, details = code_of(call, request)
                with lock:
                    answers.append((code, time.monotonic() - start, details))
                stop.wait(0.2)

        slow: list[str] = []  # health or Act answers that took over a second, or failed
        with hung(proc):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            health, policy = server.health(probe), server.policy(probe)
            act = policy_pb2.ActRequest(model=FEED_FORWARD, observations=tensor(OBS[None]))
            deadline = time.monotonic() + 3.0
            checks = 0
            while time.monotonic() < deadline:  # the 200 clients hammer the hung store meanwhile
                for name, call, request in (("health", health.Check, health_pb2.HealthCheckRequest()),
                                            ("Act", policy.Act, act)):
                    start = time.monotonic()
                    code, details = code_of(call, request, timeout=1.0)
                    if code != grpc.StatusCode.OK:
                        slow.append(f"{name}: {code.name} after {time.monotonic() - start:.2f} s {details}")
                checks += 1
                time.sleep(0.05)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not slow, slow  # health and Act answered within 1 s every time
        assert checks >= 10
        codes = {code for code, _, _ in answers}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
        seconds = sorted(s for _, s, _ in answers)
        assert len(seconds) >= CLIENTS  # every client was answered, at least once
        # Fast: at most the store timeout (0.2 s) when a call reaches the store, at once when it is refused.
        assert statistics.median(seconds) < 0.25 and seconds[-1] < 2.0, (statistics.median(seconds), seconds[-1])
        details = {d.split(":")[0] for _, _, d in answers}
        assert all("session store at redis://127.0.0.1:" in d for _, _, d in answers), details
        # Both refusals were counted: calls beyond the in-flight cap, then calls while the breaker was open.
        assert server.metric("batchrl_store_refused_calls_total", reason="in_flight_cap") > 0
        assert server.metric("batchrl_store_refused_calls_total", reason="breaker_open") > 0
        assert server.metric("batchrl_store_failed_calls_total", reason="timeout") > 0
        # The store is back: the breaker's next probe closes it, and sessions work again.
        session_id = open_when_back(stubs[0])
        answer = stubs[0].Step(policy_pb2.StepRequest(session_id=session_id, observation=tensor(OBS), index=0),
                               timeout=10)
        assert answer.timestep == 0
        server.wait_log(r"session store at redis://127\.0\.0\.1:\d+/0 answers again")
    finally:
        for channel in (*channels, probe):
            channel.close()


def test_the_store_password_reaches_neither_clients_nor_the_log(server, store):
    proc, _ = store
    stub = server.policy()
    session_id = open_when_back(stub)
    with hung(proc):
        details = [code_of(stub.Step, policy_pb2.StepRequest(session_id=session_id, observation=tensor(OBS),
                                                             index=0)),
                   code_of(stub.OpenSession, policy_pb2.OpenSessionRequest(model=SEQUENCE)),
                   code_of(stub.CloseSession, policy_pb2.CloseSessionRequest(session_id=session_id))]
        time.sleep(SESSION_TIMEOUT / 2 + 0.5)  # a sweeper pass fails meanwhile, and logs it
    for code, text in details:
        assert code == grpc.StatusCode.UNAVAILABLE, (code, text)
        assert re.search(r"session store at redis://127\.0\.0\.1:\d+/0 ", text), text  # host, port and db only
        assert PASSWORD not in text and "password" not in text, text
    server.wait_log(r"session sweeper: ")
    assert PASSWORD not in server.log and "password=" not in server.log


def test_the_sweeper_outlives_an_outage(server, store):
    proc, _ = store
    stub = server.policy()
    open_when_back(stub)
    before = len(server.log)
    with hung(proc):
        time.sleep(2.5 * SESSION_TIMEOUT / 2)  # two or three sweeper passes fail
    during = server.log[before:]
    assert len(re.findall(r"session sweeper: ", during)) <= 1, during  # once per outage, not once per pass
    assert "Traceback" not in server.log
    opened = [open_when_back(stub) for _ in range(3)]
    after = len(server.log)
    # The sweeper still runs: the three sessions go idle, and its next pass evicts them.
    deadline = time.monotonic() + SESSION_TIMEOUT + 6.0
    while not re.search(r"evicted \d+ idle session", server.log[after:]):
        assert time.monotonic() < deadline, f"no eviction of {opened} after the outage; log:\n{server.log}"
        time.sleep(0.1)


def refusal(repository: Path, url: str) -> str:
    """The one line `batchrl serve --session-store url` exits with (status 1). (tests.test_cli has the same
    check, but importing it imports torch: seconds this module does without.)"""
    result = subprocess.run([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repository), "--session-store",
                             url], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_a_db_the_redis_server_lacks_and_a_socket_url_are_one_line_without_the_password(repository, store):
    _, url = store
    urls = (url.replace("/0?", "/99?"), f"unix:///nonexistent/redis.sock?db=0&password={PASSWORD}")
    with ThreadPoolExecutor(len(urls)) as pool:  # two start-ups at once: half the wait
        lacking, socket = pool.map(lambda u: refusal(repository, u), urls)
    assert "db 99" in lacking and "redis://127.0.0.1:" in lacking, lacking
    assert "unix:///nonexistent/redis.sock" in socket and "unreachable" in socket, socket
    for line in (lacking, socket):
        assert PASSWORD not in line and "password" not in line and "Traceback" not in line, line
