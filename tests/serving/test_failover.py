"""Replicas sharing sessions through a real Redis: three `batchrl serve` processes, one SIGKILLed
mid-run, and 30 Decision Transformer episodes that all finish as if nothing had happened."""
import contextlib
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from batchrl.protos.sequence import RollingContext
from batchrl.serving.client import Failover, PolicyClient
from batchrl.serving.runtime import load_model
from tests.serving import blackbox

EPISODES, STEPS = 30, 100


def scripts(episodes=EPISODES, steps=STEPS):
    """(observations, rewards, target return) of each episode, the same every time."""
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(steps, 3)).astype(np.float32), rng.normal(size=steps), float(rng.uniform(-800, -100)))
            for _ in range(episodes)]


def reference(repo, script):
    """The episode's actions with no server at all: the exported model in onnxruntime, one rolling context."""
    model = load_model("dt-a", 1, repo / "dt-a" / "1" / "model.onnx", ["CPUExecutionProvider"])
    observations, rewards, target = script
    context, actions = RollingContext(model.context_spec, target), []
    for t in range(len(observations)):
        reward = None if t == 0 else float(rewards[t - 1])
        action = model.run(context.inputs(observations[t], reward))[0]
        context.advance(observations[t], reward, action)
        actions.append(action)
    return np.stack(actions)


def run_with_a_kill(repo, redis_url, prefix, play):
    """Start three servers on one Redis, play every episode (``play(client, script, progress)``) from its own
    thread, each client starting at a different server, SIGKILL the first server once a third of the steps
    are done; returns (actions per episode, errors, retries, steps counted by each close)."""
    servers = [blackbox.start(repo, "--session-store", redis_url, "--session-key-prefix", prefix) for _ in range(3)]
    addresses = [s.address for s in servers]
    results, errors, retries, closed = [None] * EPISODES, [], [0] * EPISODES, [None] * EPISODES
    done, killed = [0], threading.Event()
    lock = threading.Lock()

    def progress():
        with lock:
            done[0] += 1
            if done[0] == EPISODES * STEPS // 3 and not killed.is_set():
                servers[0].proc.send_signal(signal.SIGKILL)
                killed.set()

    def episode(i, script):
        rotated = addresses[i % 3:] + addresses[:i % 3]
        try:
            with PolicyClient(rotated, failover=Failover(tries=6, backoff=0.05, deadline=20)) as client:
                results[i], closed[i] = play(client, script, progress)
                retries[i] = client.retries
        except Exception as exc:  # noqa: BLE001 - counted: none may reach the caller
            errors.append((i, repr(exc)))

    try:
        threads = [threading.Thread(target=episode, args=(i, s)) for i, s in enumerate(scripts())]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
    assert killed.is_set()
    return results, errors, retries, closed


def unary(client, script, progress):
    observations, rewards, target = script
    sid = client.open_session("dt-a", target_return=target).session_id
    actions = []
    for t in range(STEPS):
        actions.append(client.step(sid, observations[t], None if t == 0 else float(rewards[t - 1]), index=t))
        progress()
    return np.stack(actions), client.close_session(sid)


def streamed(client, script, progress):
    observations, rewards, target = script
    episode = client.episode("dt-a", target_return=target)
    actions = []
    for t in range(STEPS):
        actions.append(episode.step(observations[t], None if t == 0 else float(rewards[t - 1])))
        progress()
    return np.stack(actions), episode.close()


def check(dt_repository, results, errors, retries, closed):
    assert errors == []  # zero errors reached the caller
    assert sum(retries) > 0  # the episodes on the killed server moved, and that was counted
    assert closed == [STEPS] * EPISODES  # no step appended twice
    for i, script in enumerate(scripts()):
        np.testing.assert_array_equal(results[i], reference(dt_repository, script), err_msg=f"episode {i}")


def test_unary_sessions_survive_a_replica_killed_mid_run(dt_repository, redis_url, redis_prefix):
    check(dt_repository, *run_with_a_kill(dt_repository, redis_url, redis_prefix, unary))


def test_episode_streams_reattach_after_a_replica_is_killed(dt_repository, redis_url, redis_prefix):
    check(dt_repository, *run_with_a_kill(dt_repository, redis_url, redis_prefix, streamed))


def test_another_replica_is_tried_at_once_and_the_back_off_starts_after_every_address_failed():
    closed = []
    for _ in range(3):  # three loopback ports nobody listens on: each call is UNAVAILABLE at once
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed.append(f"127.0.0.1:{s.getsockname()[1]}")
    # A back-off (1 s) longer than the deadline: only retries that do not wait can happen.
    with PolicyClient(closed, failover=Failover(tries=5, backoff=1.0, deadline=0.5)) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert client.retries == 2  # the two other addresses, at once; the next retry would wait 1 s
    assert time.monotonic() - started < 0.5
