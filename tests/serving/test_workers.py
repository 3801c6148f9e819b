"""`batchrl serve --workers N`: several server processes on one port (SO_REUSEPORT) under one supervisor,
sharing Decision Transformer sessions through a real Redis, with one metrics endpoint for all."""
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest

from batchrl.serving.client import Failover, PolicyClient
from tests.serving import blackbox
from tests.serving.test_failover import reference, scripts

CLIENTS, STEPS = 16, 40
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # every client its own TCP connection


def play_all(address, episodes, on_step=lambda: None):
    """Each episode from its own thread and connection, through the failover client; returns
    (actions per episode, errors, retries)."""
    results, errors, retries = [None] * len(episodes), [], [0] * len(episodes)

    def play(i, script):
        observations, rewards, target = script
        try:
            with PolicyClient(address, failover=Failover(tries=8, backoff=0.05, deadline=30),
                              channel_options=OWN_CONNECTION) as client:
                sid = client.open_session("dt-a", target_return=target).session_id
                actions = []
                for t in range(len(observations)):
                    reward = None if t == 0 else float(rewards[t - 1])
                    actions.append(client.step(sid, observations[t], reward, index=t))
                    on_step()
                client.close_session(sid)
                results[i], retries[i] = np.stack(actions), client.retries
        except Exception as exc:  # noqa: BLE001 - counted: none may reach the caller
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=play, args=(i, s)) for i, s in enumerate(episodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results, errors, retries


def steps_by_worker(server):
    return {w: server.metric("batchrl_requests_total", model="dt-a", rpc="Step", code="OK", worker=w)
            for w in ("0", "1")}


def test_two_workers_share_one_port_and_a_killed_worker_is_restarted(dt_repository, redis_url, redis_prefix):
    server = blackbox.start(dt_repository, "--workers", "2", "--session-store", redis_url,
                            "--session-key-prefix", redis_prefix, metrics=True)
    try:
        pids = {int(i): int(p) for i, p in re.findall(r"worker (\d) started \(pid (\d+)\)", server.log)}
        assert sorted(pids) == [0, 1], server.log
        episodes = scripts(CLIENTS, STEPS)

        # 1. 16 connections: every step answered, as a lone process would, and both workers took some.
        results, errors, _ = play_all(server.address, episodes)
        assert errors == []
        for i, script in enumerate(episodes):
            np.testing.assert_array_equal(results[i], reference(dt_repository, script), err_msg=f"episode {i}")
        before = steps_by_worker(server)
        assert sum(before.values()) == CLIENTS * STEPS
        assert min(before.values()) > 0, f"one worker took every connection: {before}"

        # 2. SIGKILL worker 1 a third of the way through: its clients move to worker 0 (the sessions are in
        # Redis), nothing reaches the caller, and the supervisor starts worker 1 again.
        done, lock = [0], threading.Lock()

        def kill_at_a_third():
            with lock:
                done[0] += 1
                if done[0] == CLIENTS * STEPS // 3:
                    os.kill(pids[1], signal.SIGKILL)

        results, errors, retries = play_all(server.address, episodes, kill_at_a_third)
        assert errors == []
        for i, script in enumerate(episodes):
            np.testing.assert_array_equal(results[i], reference(dt_repository, script), err_msg=f"episode {i}")
        restarted = server.wait_log(r"worker 1 \(pid (\d+)\) serving again", timeout=60)
        assert int(restarted.group(1)) != pids[1]
        assert re.search(rf"worker 1 \(pid {pids[1]}\) exited with status -9; restarting it", server.log)

        assert sum(retries) > 0  # the moved steps were retried, and counted

        # 3. The restarted worker takes new connections again; the live gauges add up over the workers.
        before = steps_by_worker(server)
        results, errors, _ = play_all(server.address, episodes)
        assert errors == []
        after = steps_by_worker(server)
        assert after["1"] > before["1"], (before, after)
        assert sum(after.values()) - sum(before.values()) == CLIENTS * STEPS
        # One session open in Redis: each worker counts it, the endpoint shows it once (a live max, not a sum).
        with PolicyClient(server.address) as client:
            sid = client.open_session("dt-a").session_id
            assert wait_gauge(server, "batchrl_open_sessions", 1)
            client.close_session(sid)
        assert wait_gauge(server, "batchrl_open_sessions", 0)
        assert server.metric("batchrl_model_versions_loaded", model="dt-a") == 1
    finally:
        code = server.stop()
    assert code == 0, server.log
    assert "stopped (1 worker restart(s) while serving)" in server.log


def wait_gauge(server, name, value, timeout=5.0, **labels):
    """Whether the gauge reads ``value`` within ``timeout`` (workers publish theirs every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric(name, **labels) == value:
            return True
        time.sleep(0.1)
    return False


def test_sequence_policies_with_several_workers_need_the_shared_store(dt_repository):
    server = blackbox.start(dt_repository, "--workers", "2", ready=False)
    assert server.proc.wait(timeout=120) != 0
    time.sleep(0.1)
    assert "--session-store redis://" in server.log and "dt-a" in server.log, server.log


def test_a_port_in_use_is_refused_before_any_worker_starts(repository):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = blackbox.start(repository, "--workers", "2", "--address", f"127.0.0.1:{port}", ready=False)
        assert server.proc.wait(timeout=60) != 0
    time.sleep(0.1)
    assert f"cannot listen on 127.0.0.1:{port}" in server.log and "worker 0 started" not in server.log, server.log


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_is_refused(repository, workers):
    server = blackbox.start(repository, "--workers", workers, ready=False)
    assert server.proc.wait(timeout=60) != 0
    time.sleep(0.1)
    assert f"--workers {workers}: expected 1 or more" in server.log


def test_a_session_opened_later_on_the_in_process_store_of_a_worker_group_is_refused():
    """(A sequence policy loaded after start, by LoadModel or a poll, finds the same refusal.)"""
    from batchrl.serving.errors import FailedPrecondition
    from batchrl.serving.sessions import open_session_store

    store = open_session_store("memory", lambda name, version: None, processes=3)
    with pytest.raises(FailedPrecondition, match="--workers 3.*--session-store redis://"):
        store.open(None, 0.0)
    assert open_session_store("memory", lambda name, version: None).refuse is None
