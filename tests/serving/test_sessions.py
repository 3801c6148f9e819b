"""Decision Transformer sessions over a real gRPC server on 127.0.0.1."""
import threading
import time

import grpc
import gymnasium as gym
import numpy as np
import onnxruntime as ort
import pytest
import torch

from batchrl.protos.batchrl.v1 import policy_pb2
from batchrl.protos.sequence import SEQUENCE_INPUTS
from batchrl.rollout import rollout
from batchrl.serving.client import step_request
from batchrl.serving.tensors import decode, encode
from batchrl.serving.runtime import load_model
from tests.serving.running import running
from batchrl.training.evaluation import run_episodes, sequence_agent
from batchrl.training.trainer import load_policy


def in_process_agent(repo, name, record=None):
    """The exported model in onnxruntime, driven by the same rolling context as the server."""
    model = load_model(name, 1, repo / name / "1" / "model.onnx", ["CPUExecutionProvider"])

    def run(feeds):
        out = model.run(feeds)
        if record is not None:
            record.append((feeds, out[0].copy()))
        return out

    return sequence_agent(run, model.context_spec, model.manifest.default_target_return)


def test_served_episode_equals_in_process_evaluation(dt_repository, dt_runs):
    recorded = []
    local_returns, _ = run_episodes(gym.make("Pendulum-v1"), in_process_agent(dt_repository, "dt-a", recorded), 2, 3)
    with running(dt_repository) as srv:
        client, store = srv.client, srv.sessions
        served = rollout(srv.address, "dt-a", "Pendulum-v1", episodes=2, seed=3, print_fn=lambda _: None)
        # the same first episode step by step through unary sessions: the same actions, bit for bit
        env = gym.make("Pendulum-v1")
        obs, _ = env.reset(seed=3)
        session = client.open_session("dt-a")
        served_actions, reward, done = [], None, False
        while not done:
            action = client.step(session.session_id, np.asarray(obs, np.float32), reward)
            served_actions.append(action)
            obs, reward, term, trunc, _ = env.step(action)
            reward, done = float(reward), term or trunc
        assert client.close_session(session.session_id) == len(served_actions)
        assert len(store) == 0  # rollout's streams closed their sessions too
    assert served.returns == local_returns
    local_actions = np.stack([a for _, a in recorded[:len(served_actions)]])
    np.testing.assert_array_equal(np.stack(served_actions), local_actions)
    # per step, the ONNX action matches torch on the recorded contexts
    _, policy, _ = load_policy(dt_runs[0])
    feeds = {k: np.concatenate([f[k] for f, _ in recorded]) for k in SEQUENCE_INPUTS}
    with torch.no_grad():
        want = policy(*(torch.from_numpy(feeds[k]) for k in SEQUENCE_INPUTS)).numpy()
    assert np.abs(np.stack([a for _, a in recorded]) - want).max() <= 1e-5
    assert set(feeds["attention_mask"].sum(1).tolist()) == set(range(1, 9))  # every context length was used


def client_script(i, steps=15):
    rng = np.random.default_rng(i)
    return ("dt-a" if i % 2 == 0 else "dt-b", rng.normal(size=(steps, 3)).astype(np.float32),
            rng.normal(size=steps), float(rng.uniform(-800, -100)))


def play(client, script):
    model, observations, rewards, target = script
    session = client.open_session(model, target_return=target).session_id
    actions = [client.step(session, observations[0], index=0)]
    for t in range(1, len(observations)):
        actions.append(client.step(session, observations[t], float(rewards[t - 1]), index=t))
    client.close_session(session)
    return np.stack(actions)


def test_64_concurrent_sessions_over_two_models_match_each_run_alone(dt_repository, session_store):
    scripts = [client_script(i) for i in range(64)]
    with running(dt_repository, sessions=session_store) as srv:
        client, registry = srv.client, srv.registry
        alone = [play(client, s) for s in scripts]
        batchers = [registry.get(name).batcher for name in ("dt-a", "dt-b")]
        runs_before = sum(b.runs for b in batchers)
        together = [None] * 64
        start = threading.Barrier(64)

        def worker(i):
            start.wait()
            together[i] = play(client, scripts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        runs = sum(b.runs for b in batchers) - runs_before
    for i in range(64):
        np.testing.assert_array_equal(together[i], alone[i], err_msg=f"client {i}")
    assert runs < 64 * 15  # steps of different sessions shared model runs


def test_idle_sessions_expire(dt_repository, session_store):
    with running(dt_repository, sessions=lambda registry: session_store(registry, idle_timeout=0.3)) as srv:
        client, store = srv.client, srv.sessions
        session = client.open_session("dt-a").session_id
        client.step(session, np.zeros(3, np.float32), index=0)
        time.sleep(0.6)
        with pytest.raises(grpc.RpcError) as info:
            client.step(session, np.zeros(3, np.float32), 0.0, index=1)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in info.value.details()
        assert len(store) == 0
        with pytest.raises(grpc.RpcError) as info:
            client.step("no-such-session", np.zeros(3, np.float32), index=0)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in info.value.details()


def test_session_limit(dt_repository, session_store):
    with running(dt_repository, sessions=lambda registry: session_store(registry, max_sessions=2)) as srv:
        client = srv.client
        first = client.open_session("dt-a").session_id
        client.open_session("dt-b")
        with pytest.raises(grpc.RpcError) as info:
            client.open_session("dt-a")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum is 2" in info.value.details()
        client.close_session(first)
        client.open_session("dt-a")  # room again


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_episode_stream_equals_unary_session_and_a_cancelled_stream_frees_its_session(dt_repository, session_store):
    script = client_script(5)
    with running(dt_repository, sessions=session_store) as srv:
        client, store = srv.client, srv.sessions
        unary = play(client, script)
        model, observations, rewards, target = script
        with client.episode(model, target_return=target) as episode:
            assert episode.opened.context_length == 8 and episode.opened.version == 1
            streamed = [episode.step(observations[0])]
            streamed += [episode.step(observations[t], float(rewards[t - 1])) for t in range(1, len(observations))]
            assert len(store) == 1
        np.testing.assert_array_equal(np.stack(streamed), unary)
        assert wait_for(lambda: len(store) == 0)  # the stream ended: its session closed

        episode = client.episode("dt-a")
        episode.step(observations[0])
        episode.step(observations[1], 0.5)
        assert len(store) == 1
        episode.cancel()  # mid-episode: to the server, a broken stream
        if not store.shared:
            assert wait_for(lambda: len(store) == 0)
            return
        # a shared store keeps the session for a new stream (here or at another server) to attach to
        time.sleep(0.5)
        assert len(store) == 1
        sid = episode.opened.session_id
        attached = client.stub.Episode(iter([
            policy_pb2.EpisodeRequest(step=step_request(observations[2], 0.25, sid, index=2)),
            policy_pb2.EpisodeRequest(close=policy_pb2.CloseSessionRequest())]))
        assert next(attached).step.timestep == 2
        assert next(attached).closed.steps == 3  # `close` ends the episode
        assert len(store) == 0


def test_a_stream_orders_its_steps_without_indices(dt_repository, session_store):
    """A stream is ordered: steps that carry no index take the next one, on either store (the Redis store
    refuses an unindexed unary Step), and a retry-free episode is the same as with explicit indices."""
    model, observations, rewards, target = script = client_script(7)
    with running(dt_repository, sessions=session_store) as srv:
        unary = play(srv.client, script)
        messages = [policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model=model, target_return=target)),
                    policy_pb2.EpisodeRequest(step=step_request(observations[0], None))]
        messages += [policy_pb2.EpisodeRequest(step=step_request(observations[t], float(rewards[t - 1])))
                     for t in range(1, len(observations))]
        messages.append(policy_pb2.EpisodeRequest(close=policy_pb2.CloseSessionRequest()))
        answers = list(srv.client.stub.Episode(iter(messages)))
    steps = [a.step for a in answers if a.HasField("step")]
    assert [s.timestep for s in steps] == list(range(len(observations)))
    assert answers[-1].closed.steps == len(observations)
    np.testing.assert_array_equal(np.stack([decode(s.action, "action") for s in steps]), unary)


def expect(code, call, match):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()


def test_misuse_gets_a_clear_status_and_leaves_the_session_intact(dt_repository):
    script = client_script(9, steps=4)
    with running(dt_repository) as srv:
        client = srv.client
        clean = play(client, script)
        model, observations, rewards, target = script
        expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: client.act("dt-a", observations[:2]), "open a session")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.open_session("pendulum", target_return=1.0),
               "applies only to sequence policies")
        expect(grpc.StatusCode.NOT_FOUND, lambda: client.open_session("nope"), "not loaded")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.open_session("dt-a", target_return=float("nan")),
               "finite")
        sid = client.open_session(model, target_return=target).session_id
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(sid, observations[0], 1.0), "first step")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(sid, observations[:2]), "expects [3]")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(sid, np.array([0, np.inf, 0], np.float32)),
               "element 1 is inf")
        actions = [client.step(sid, observations[0])]
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(sid, observations[1]), "reward")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(sid, observations[1], float("nan")), "finite")
        actions += [client.step(sid, observations[t], float(rewards[t - 1])) for t in range(1, 4)]
        np.testing.assert_array_equal(np.stack(actions), clean)  # the rejected steps changed nothing
        close = client.stub.CloseSession
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: close(policy_pb2.CloseSessionRequest(
            session_id=sid, reward=1.0)), "must carry the final_observation")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: close(policy_pb2.CloseSessionRequest(
            session_id=sid, final_observation=encode(observations[0]), reward=1.0)), "TERMINATED (1) or TRUNCATED")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.close_session(sid, observations[:2], 1.0, "truncated"),
               "expects [3]")
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.close_session(sid, observations[0], None, "terminated"),
               "after 4 steps: step 4: the reward earned by the previous action is required")
        assert client.step(sid, observations[0], 0.5, index=4) is not None  # the refused closes left it open
        episode = client.stub.Episode(iter([policy_pb2.EpisodeRequest(step={"observation": {"shape": [3]}})]))
        expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: next(episode), "must be `open`")
