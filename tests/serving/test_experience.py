"""Sessions for every policy and the experience log (`serve --log-experience`): what the server records,
that a SIGTERM loses none of it, and that a failing or stalled writer never holds a request up."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq

from batchrl.serving.experience import ExperienceLog
from batchrl.serving.metrics import Metrics
from batchrl.serving.sessions import RedisSessionStore
from tests.serving.running import running


def shard_rows(folder) -> list[dict]:
    return [row for path in sorted(folder.glob("experience-*.parquet")) for row in pq.read_table(path).to_pylist()]


def counter(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_feed_forward_sessions_share_a_redis_store_exactly_once(repository, redis_url, redis_prefix):
    """A feed-forward policy's session is stepped on two servers sharing Redis: the same actions as the
    model run directly, a retried index gets its first answer on the other server, noise is seeded."""
    model = ort.InferenceSession(str(repository / "pendulum" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    store = lambda registry: RedisSessionStore(redis_url, registry.get, prefix=redis_prefix)  # noqa: E731
    observations = np.random.default_rng(0).uniform(-1, 1, size=(4, 3)).astype(np.float32)
    with running(repository, sessions=store) as a, running(repository, sessions=store) as b:
        sid = a.client.open_session("pendulum").session_id
        actions = [(a, b)[t % 2].client.step(sid, observations[t], None if t == 0 else 0.5, index=t) for t in range(3)]
        np.testing.assert_array_equal(np.stack(actions), model.run(None, {"observations": observations[:3]})[0])
        np.testing.assert_array_equal(a.client.step(sid, observations[3], 0.5, index=2), actions[2])  # a retry
        noisy = b.client.step(sid, observations[3], 0.5, index=3, noise_std=0.3, seed=7)
        assert not np.array_equal(noisy, model.run(None, {"observations": observations[3:]})[0][0])
        np.testing.assert_array_equal(a.client.step(sid, observations[3], 0.5, index=3), noisy)  # its first answer
        assert b.client.close_session(sid, observations[0], 1.0, "truncated") == 4


def test_sigterm_during_logging_loses_nothing(repository, tmp_path):
    """Clients step and close episodes until the server stops: every step and end a client got an answer
    for is in the shards, with the action it received (the flush interval is far longer than the run,
    so only the drain writes them), and the shards are readable by the server's user only."""
    logs = tmp_path / "experience"
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repository), "--address",
                             "127.0.0.1:0", "--grace", "5", "--log-experience", str(logs),
                             "--log-flush-seconds", "600"], stderr=subprocess.PIPE, text=True)
    answered, ended, log = [], [], []
    try:
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line, "".join(log)
            log.append(line)
            if m := re.search(r"\(port (\d+)\)", line):
                port = int(m.group(1))
        from batchrl.serving.client import PolicyClient

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with PolicyClient(f"127.0.0.1:{port}", timeout=10) as c:
                try:
                    while True:
                        sid = c.open_session("pendulum").session_id
                        for t in range(5):
                            obs = rng.normal(size=3).astype(np.float32)
                            action = c.step(sid, obs, None if t == 0 else float(t), index=t)
                            answered.append((sid, t, obs.tobytes(), action.tobytes()))
                        final = rng.normal(size=3).astype(np.float32)
                        c.close_session(sid, final, 9.0, "terminated" if seed % 2 else "truncated")
                        ended.append((sid, 5, final.tobytes()))
                except grpc.RpcError:
                    return  # the server stopped taking calls

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(ended) >= 8, timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.append(proc.stderr.read())
    rows = {(r["session_id"], r["step"]): r for r in shard_rows(logs)}
    for sid, t, obs, action in answered:
        row = rows[(sid, t)]
        assert np.asarray(row["observation"], np.float32).tobytes() == obs
        assert np.asarray(row["action"], np.float32).tobytes() == action
        assert row["reward"] == (None if t == 0 else float(t)) and row["ending"] is None
        assert (row["model"], row["version"]) == ("pendulum", 2)
    for sid, t, final in ended:
        row = rows[(sid, t)]
        assert np.asarray(row["observation"], np.float32).tobytes() == final
        assert row["action"] is None and row["reward"] == 9.0 and row["ending"] in ("terminated", "truncated")
    # at most one answer per client thread was lost in transit when the server stopped
    assert len(answered) + len(ended) <= len(rows) <= len(answered) + len(ended) + len(threads)
    assert "experience log closed" in "".join(log)
    for path in logs.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700


def play_episode(client, steps: int = 3) -> None:
    sid = client.open_session("pendulum").session_id
    for t in range(steps):
        client.step(sid, np.zeros(3, np.float32), None if t == 0 else 1.0, index=t)
    client.close_session(sid, np.ones(3, np.float32), 1.0, "truncated")


def test_an_unwritable_log_folder_keeps_serving_and_counts_the_error(repository, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    metrics = Metrics()
    experience = ExperienceLog(tmp_path / "file" / "experience", flush_seconds=0.05, metrics=metrics)
    try:
        with running(repository, metrics=metrics, experience=experience) as srv:
            play_episode(srv.client)
            play_episode(srv.client)
            wait_for(lambda: counter(metrics, "batchrl_experience_rows_dropped_total", reason="write_error") == 8)
        assert counter(metrics, "batchrl_experience_write_errors_total", reason="ENOTDIR") >= 2  # folder, shard
        assert counter(metrics, "batchrl_experience_rows_written_total") == 0
        assert counter(metrics, "batchrl_requests_total", model="pendulum", rpc="Step", code="OK", worker="0") == 6
    finally:
        experience.close()


def test_a_stalled_writer_drops_and_counts_rather_than_blocking(repository, tmp_path):
    """The writer hangs opening its first shard (a FIFO nobody reads stands where it writes, as a hung
    disk would): steps are answered at once, 4 rows wait in the buffer and the rest are dropped and counted;
    the rows that waited are written once the writer can go on."""
    metrics = Metrics()
    folder = tmp_path / "experience"
    experience = ExperienceLog(folder, flush_seconds=0.01, buffer_rows=4, metrics=metrics)
    staging = folder / f".{experience.series}-000000.parquet.tmp"
    os.mkfifo(staging)
    try:
        with running(repository, metrics=metrics, experience=experience) as srv:
            sid = srv.client.open_session("pendulum").session_id
            srv.client.step(sid, np.zeros(3, np.float32), index=0)
            wait_for(lambda: experience.buffer.qsize() == 0)  # the writer holds row 0 and hangs on the FIFO
            time.sleep(0.1)
            started = time.monotonic()
            for t in range(1, 51):
                srv.client.step(sid, np.zeros(3, np.float32), 1.0, index=t)
            elapsed = time.monotonic() - started
        assert counter(metrics, "batchrl_experience_rows_dropped_total", reason="buffer_full") == 46
        assert elapsed < 10, elapsed  # nothing waited for the writer
    finally:
        reader = threading.Thread(target=lambda: open(staging, "rb").read())  # unblock the writer
        reader.start()
        experience.close()
        reader.join(timeout=10)
    assert [r["step"] for r in pq.read_table(folder / f"{experience.series}-000001.parquet").to_pylist()] == \
        [1, 2, 3, 4]  # the first rows that found room were kept


def test_served_episodes_import_as_what_the_client_sent_and_received(dt_repository, tmp_path, monkeypatch):
    """Three episodes served with the log on (a feed-forward policy on an Episode stream with sampling noise, a
    Decision Transformer over unary Steps, one over the Open Inference Protocol whose end request carries the
    ending), imported by `batchrl data import`: every array equals what the client sent and received, step for
    step, with the final observation and the ending right."""
    import tritonclient.grpc as triton

    from batchrl.training.experience_import import import_experience
    from batchrl.training.data import open_minari

    rng = np.random.default_rng(5)
    sent = []  # per episode: observations (N+1), actions received (N), rewards sent (N), terminated

    def script(steps: int):
        # rewards exact in float32: the OIP's reward input is FP32
        return (rng.normal(size=(steps + 1, 3)).astype(np.float32),
                rng.normal(size=steps).astype(np.float32).astype(np.float64))

    experience = ExperienceLog(tmp_path / "experience", flush_seconds=0.05)
    try:
        with running(dt_repository, experience=experience) as srv:
            obs, rewards = script(6)  # feed-forward, Episode stream, noise
            with srv.client.episode("pendulum") as episode:
                actions = [episode.step(obs[t], None if t == 0 else rewards[t - 1], noise_std=0.5, seed=t)
                           for t in range(6)]
                episode.close(obs[6], rewards[5], "truncated")
            sent.append((obs, np.stack(actions), rewards, False))
            obs, rewards = script(5)  # DT, unary Steps, a retried step
            sid = srv.client.open_session("dt-b").session_id
            actions = [srv.client.step(sid, obs[t], None if t == 0 else rewards[t - 1], index=t) for t in range(5)]
            np.testing.assert_array_equal(srv.client.step(sid, obs[4], rewards[3], index=4), actions[4])
            srv.client.close_session(sid, obs[5], rewards[4], "terminated")
            sent.append((obs, np.stack(actions), rewards, True))
            obs, rewards = script(4)  # DT over the OIP: the end request carries the final observation
            oip = triton.InferenceServerClient(srv.address)
            actions = []
            for t in range(5):
                inputs = [triton.InferInput("observation", [1, 3], "FP32")]
                inputs[0].set_data_from_numpy(obs[t][None])
                if t:
                    inputs.append(triton.InferInput("reward", [1, 1], "FP32"))
                    inputs[1].set_data_from_numpy(np.array([[rewards[t - 1]]], np.float32))
                params = {"step_index": t, **({"ending": "truncated"} if t == 4 else {})}
                answer = oip.infer("dt-a", inputs, sequence_id="oip-episode", sequence_start=t == 0,
                                   sequence_end=t == 4, parameters=params)
                actions.append(answer.as_numpy("action")[0])
            oip.close()
            assert len(srv.sessions) == 0
            sent.append((obs, np.stack(actions[:4]), rewards, False))
    finally:
        experience.close()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    summary = import_experience([str(tmp_path / "experience")], str(tmp_path / "served"),
                                model=dt_repository / "pendulum" / "2" / "model.onnx", progress=False)
    assert (summary.counts["episodes"], summary.counts["duplicates"], summary.counts["unfinished"]) == (3, 1, 0)
    episodes = list(open_minari(str(tmp_path / "served")).iterate_episodes())
    assert len(episodes) == 3
    for got, (obs, actions, rewards, terminated) in zip(episodes, sent):
        np.testing.assert_array_equal(got.observations, obs)
        np.testing.assert_array_equal(got.actions, actions)
        np.testing.assert_array_equal(got.rewards, rewards)
        n = len(rewards)
        assert got.terminations.tolist() == [False] * (n - 1) + [terminated]
        assert got.truncations.tolist() == [False] * (n - 1) + [not terminated]


def test_old_shards_and_those_beyond_the_disk_cap_are_deleted_oldest_first(tmp_path):
    folder = tmp_path / "experience"
    folder.mkdir()
    old = folder / "experience-otherhost-1-20260101T000000Z-000000.parquet"  # another process's, 8 days old
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 8 * 86_400,) * 2)
    metrics = Metrics()
    experience = ExperienceLog(folder, flush_seconds=0.01, retention_seconds=7 * 86_400, max_bytes=6_000,
                               metrics=metrics)
    try:
        for shard in range(6):  # one shard each (each a little over 2 kB)
            for t in range(4):
                experience.step("s", "m", 1, 4 * shard + t, np.zeros(3, np.float32), np.zeros(1, np.float32), 1.0)
            wait_for(lambda: counter(metrics, "batchrl_experience_shards_written_total") == shard + 1)
    finally:
        experience.close()
    assert not old.exists()
    assert counter(metrics, "batchrl_experience_shards_deleted_total", reason="age") == 1
    left = sorted(folder.glob("experience-*.parquet"))
    assert sum(p.stat().st_size for p in left) <= 6_000
    deleted = counter(metrics, "batchrl_experience_shards_deleted_total", reason="disk_cap")
    assert deleted >= 3 and len(left) == 6 - deleted
    assert [p.name[-14:-8] for p in left] == [f"{i:06d}" for i in range(6 - len(left), 6)]  # the newest kept
