"""Shared fixtures: small Minari datasets built here (never ../shared), a tiny trained run
and a model repository holding its export."""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

PENDULUM_REF = (-1200.0, -150.0)


@contextlib.contextmanager
def environment(name: str, value: str):
    """The environment variable ``name`` set to ``value`` inside, as it was after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def write_dataset(root: Path, dataset_id: str, episodes: list[dict], env: str = "Pendulum-v1",
                  ref: tuple[float, float] | None = PENDULUM_REF) -> None:
    """Write a Minari dataset under ``root`` from episode dicts of numpy arrays
    (observations [N+1, d], actions [N, k], rewards, terminations, truncations [N])."""
    from minari import create_dataset_from_buffers
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, observations=list(ep["observations"]), actions=list(ep["actions"]),
                             rewards=list(ep["rewards"]), terminations=list(ep["terminations"]),
                             truncations=list(ep["truncations"]), infos={})
               for i, ep in enumerate(episodes)]
    with environment("MINARI_DATASETS_PATH", str(root)):
        create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env, algorithm_name="test", author="batchrl tests", author_email="tests@batchrl.invalid",
                                    description="built by the batchrl test suite", code_permalink="tests/conftest.py",
                                    ref_min_score=ref[0] if ref else None, ref_max_score=ref[1] if ref else None,
                                    num_episodes_average_score=1)


def play(env, act, n_episodes: int | None, seed: int, steps: int | None = None) -> list[dict]:
    """``n_episodes`` whole episodes of ``env`` (episode i reset with seed seed * 1000 + i) played by
    ``act(obs)``, or with ``steps``, as many as it takes to pass that many steps; as write_dataset's episode
    dicts."""
    episodes, total, i = [], 0, 0
    while (n_episodes is None or i < n_episodes) and (steps is None or total < steps):
        obs, _ = env.reset(seed=seed * 1000 + i)
        ep = {k: [] for k in ("observations", "actions", "rewards", "terminations", "truncations")}
        ep["observations"].append(obs)
        done = False
        while not done:
            action = np.asarray(act(obs), dtype=np.float32)
            obs, reward, term, trunc, _ = env.step(action)
            for key, value in (("observations", obs), ("actions", action), ("rewards", reward),
                               ("terminations", term), ("truncations", trunc)):
                ep[key].append(value)
            done = term or trunc
        episodes.append({k: np.asarray(v) for k, v in ep.items()})
        total, i = total + len(ep["actions"]), i + 1
    return episodes


def pendulum_episodes(n_episodes: int, length: int, seed: int = 0) -> list[dict]:
    """Episodes of Pendulum-v1 played by a noisy energy-pumping controller, truncated at ``length``."""
    import gymnasium as gym

    rng = np.random.default_rng(seed)

    def controller(obs):
        cos, sin, vel = obs
        return np.clip(np.array([np.sign(vel) * 1.5 - 2.0 * sin + rng.normal(0, 0.5)]), -2, 2)

    return play(gym.make("Pendulum-v1", max_episode_steps=length), controller, n_episodes, seed)


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory) -> Path:
    """The tests' own dataset cache (BATCHRL_CACHE), never the user's; subprocesses inherit it."""
    root = tmp_path_factory.mktemp("batchrl-cache")
    with environment("BATCHRL_CACHE", str(root)):
        yield root


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minari")
    write_dataset(root, "test/pendulum/play-v0", pendulum_episodes(8, 100))
    with environment("MINARI_DATASETS_PATH", str(root)):
        yield root


@pytest.fixture(scope="session")
def trained_run(minari_root, tmp_path_factory) -> Path:
    """A small IQL run on the pendulum dataset (finished, with result.json)."""
    from batchrl.training.trainer import TrainConfig, Trainer

    run_dir = tmp_path_factory.mktemp("runs") / "iql"
    config = TrainConfig(algorithm="iql", dataset="test/pendulum/play-v0", steps=300, eval_every=150,
                         eval_episodes=1, log_every=50, checkpoint_every=150, device="cpu",
                         algo={"hidden": (32, 32), "batch_size": 64})
    Trainer(run_dir, config, progress=False).run()
    return run_dir


@pytest.fixture(scope="session")
def repository(trained_run, tmp_path_factory) -> Path:
    """A model repository with the trained run exported twice (versions 1 and 2) as 'pendulum'."""
    from batchrl.training.export import export_run

    repo = tmp_path_factory.mktemp("models")
    export_run(trained_run, "pendulum", repo)
    export_run(trained_run, "pendulum", repo)
    return repo


DT_SETTINGS = {"embed": 32, "layers": 2, "heads": 2, "context_length": 8, "warmup_steps": 20, "batch_size": 32}


@pytest.fixture(scope="session")
def dt_runs(minari_root, tmp_path_factory) -> list[Path]:
    """Two small Decision Transformer runs (seeds 0 and 1) on the pendulum dataset."""
    from batchrl.training.trainer import TrainConfig, Trainer

    runs = []
    for seed in (0, 1):
        run_dir = tmp_path_factory.mktemp("runs") / f"dt-s{seed}"
        config = TrainConfig(algorithm="dt", dataset="test/pendulum/play-v0", steps=200, seed=seed, eval_every=200,
                             eval_episodes=1, log_every=50, checkpoint_every=200, device="cpu", algo=DT_SETTINGS)
        Trainer(run_dir, config, progress=False).run()
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="session")
def dt_repository(dt_runs, repository, tmp_path_factory) -> Path:
    """A repository with the two DT runs as 'dt-a' and 'dt-b' and the IQL policy as 'pendulum'."""
    import shutil

    from batchrl.training.export import export_run

    repo = tmp_path_factory.mktemp("dt-models")
    shutil.copytree(repository / "pendulum", repo / "pendulum")
    export_run(dt_runs[0], "dt-a", repo)
    export_run(dt_runs[1], "dt-b", repo)
    return repo



# Threads that belong to a server a fixture owns: a gRPC server's worker pool grows on demand while
# a test calls it, and its threads end when the fixture stops the server. tqdm_monitor is tqdm's one
# process-wide helper, started by the first progress bar made (a disabled one too) and kept.
POOL_THREAD = re.compile(r"(batchrl|ThreadPoolExecutor-\d+)_\d+$|tqdm_monitor$")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Every thread a test body starts is stopped by the test (a server, a stream, an HTTP endpoint)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive() and not POOL_THREAD.match(t.name)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"{item.nodeid} left threads running: {[t.name for t in left]}"


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: the one at $REDIS_URL (.ci/run sets it), else a private redis-server started here on
    a free loopback port (no persistence) and stopped at the end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from tests import redis_server

    proc, url = redis_server.start()
    try:
        yield url
    finally:
        redis_server.stop(proc)


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test's own; its keys are deleted afterwards (never the whole server)."""
    import uuid

    import redis

    prefix = f"batchrl-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def session_store(request):
    """A function (registry, **limits) -> a session store: in-process, or Redis (a test's own prefix)."""
    from batchrl.serving.sessions import RedisSessionStore, SessionStore

    if request.param == "memory":
        return lambda registry, **limits: SessionStore(**limits)
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    return lambda registry, **limits: RedisSessionStore(url, registry.get, prefix=prefix, **limits)
