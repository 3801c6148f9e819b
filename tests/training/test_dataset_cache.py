"""The dataset cache: converted once per machine, mapped read-only by every process, normalised per batch."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import pendulum_episodes, write_dataset
from batchrl.training import dataset_cache
from batchrl.training.data import load_dataset
from batchrl.training.sampling import ReplaySampler, SegmentSampler

ROOT = Path(__file__).resolve().parents[2]


def entries(cache: Path) -> list[Path]:
    folder = cache / "datasets"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(dataset_cache.CACHE_ENV, str(cache))
    return cache


def test_converted_once_then_mapped_read_only(minari_root, own_cache):
    first = load_dataset("test/pendulum/play-v0")
    (entry,) = entries(own_cache)
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    second = load_dataset("test/pendulum/play-v0")
    assert entries(own_cache) == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps  # not written again
    for data in (first, second):
        assert isinstance(data.observations, np.memmap)
        assert Path(data.observations.filename) == entry / "observations.npy"
        with pytest.raises(ValueError, match="read-only"):
            data.observations[0, 0] = 1.0
    np.testing.assert_array_equal(first.next_observations, second.next_observations)
    assert first.size == 8 * 100 and first.episode_lengths.tolist() == [100] * 8
    # The statistics were computed at conversion, from the same arrays, to the same bits.
    mean, std = first.observation_stats()
    np.testing.assert_array_equal(mean, np.asarray(first.observations).mean(0, dtype=np.float64).astype(np.float32))
    np.testing.assert_array_equal(std, np.maximum(np.asarray(first.observations).std(0, dtype=np.float64),
                                                  1e-3).astype(np.float32))


def test_a_changed_source_is_a_new_entry(tmp_path, own_cache, monkeypatch):
    root = tmp_path / "minari"
    write_dataset(root, "test/changing/play-v0", pendulum_episodes(2, 20, seed=1))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    before = load_dataset("test/changing/play-v0")
    shutil.rmtree(root / "test/changing/play-v0")  # replaced by a new version under the same id
    write_dataset(root, "test/changing/play-v0", pendulum_episodes(3, 20, seed=2))
    after = load_dataset("test/changing/play-v0")
    assert len(entries(own_cache)) == 2
    assert (before.size, after.size) == (40, 60)


def _load(dataset: str, root: str, cache: str) -> float:
    os.environ["MINARI_DATASETS_PATH"], os.environ[dataset_cache.CACHE_ENV] = root, cache
    return float(load_dataset(dataset).observations.sum(dtype=np.float64))


def test_concurrent_processes_convert_once(tmp_path, own_cache):
    root = tmp_path / "minari"
    write_dataset(root, "test/shared/play-v0", pendulum_episodes(6, 100, seed=3))
    with mp.get_context("spawn").Pool(3) as pool:
        sums = pool.starmap(_load, [("test/shared/play-v0", str(root), str(own_cache))] * 3)
    assert len(set(sums)) == 1
    (entry,) = entries(own_cache)
    assert [p.name for p in (own_cache / "datasets").iterdir() if ".tmp" in p.name] == []


def test_a_failed_conversion_leaves_nothing(tmp_path, own_cache):
    source = tmp_path / "source"
    source.mkdir()
    (source / "metadata.json").write_text("{}")

    def broken(folder: Path) -> None:
        dataset_cache.Writer(folder).array("observations", (10, 3), np.float32)
        raise RuntimeError("stopped midway")

    with pytest.raises(RuntimeError, match="stopped midway"):
        dataset_cache.entry("test/broken", source, broken)
    assert sorted(p.name for p in (own_cache / "datasets").iterdir()) == [".test_broken-"
                                                                         f"{dataset_cache.source_key(source)}.lock"]


def test_an_unwritable_cache_names_the_variable(minari_root, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(dataset_cache.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(OSError, match=f"cannot write the dataset cache {blocker}/cache/datasets.*BATCHRL_CACHE"):
        load_dataset("test/pendulum/play-v0")


def test_a_dataset_outside_the_minari_root_loads_by_path(tmp_path, own_cache, monkeypatch):
    root = tmp_path / "elsewhere"
    write_dataset(root, "test/apart/play-v0", pendulum_episodes(2, 30, seed=4))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty-root"))
    with pytest.raises(FileNotFoundError, match="test/apart/play-v0"):
        load_dataset("test/apart/play-v0")
    for path in (root / "test/apart/play-v0", root / "test/apart/play-v0/data"):
        data = load_dataset(str(path))
        assert (data.dataset_id, data.size, data.env_id) == ("test/apart/play-v0", 60, "Pendulum-v1")
    with pytest.raises(FileNotFoundError, match="not a Minari dataset folder"):
        load_dataset(str(tmp_path))
    # and trains and evaluates by path (the evaluation environment is recovered from the same folder)
    from batchrl.training.trainer import TrainConfig, Trainer

    config = TrainConfig(algorithm="bc", dataset=str(root / "test/apart/play-v0"), steps=20, eval_every=20,
                         eval_episodes=1, log_every=10, device="cpu", algo={"hidden": (16,)})
    result = Trainer(tmp_path / "run", config, progress=False).run()
    assert result["steps"] == 20 and result["normalized_score"] is not None


def test_batches_are_normalised_as_the_whole_array_was(minari_root):
    """Per-batch normalisation gives the bits of normalising every row first (what samplers used to hold)."""
    data = load_dataset("test/pendulum/play-v0")
    mean, std = data.observation_stats()
    obs = (np.asarray(data.observations) - mean) / std
    next_obs = (np.asarray(data.next_observations) - mean) / std
    low, high = data.action_low, data.action_high
    actions = np.clip(2.0 * (np.asarray(data.actions) - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)
    sampler = ReplaySampler(data, mean, std, torch.device("cpu"), seed=5)
    assert sampler.obs.data_ptr() == data.observations.ctypes.data  # the mapping itself, not a copy
    batch = sampler.sample(512)
    idx = torch.randint(data.size, (512,), generator=torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_array_equal(batch.observations.numpy(), obs[idx])
    np.testing.assert_array_equal(batch.next_observations.numpy(), next_obs[idx])
    np.testing.assert_array_equal(batch.actions.numpy(), actions[idx])
    np.testing.assert_array_equal(batch.rewards.numpy(), data.rewards[idx])
    segments = SegmentSampler(data, mean, std, torch.device("cpu"), seed=5, context_length=8, max_timestep=1000,
                              return_scale=100.0).sample(64)
    keep = segments.mask.numpy().astype(bool)
    # Every unpadded state and action is, bit for bit, a row of the array normalised as a whole.
    state_rows, action_rows = {row.tobytes() for row in obs}, {row.tobytes() for row in actions}
    assert all(row.tobytes() in state_rows for row in segments.states.numpy()[keep])
    assert all(row.tobytes() in action_rows for row in segments.actions.numpy()[keep])
    assert not segments.states.numpy()[~keep].any()


def memory(pid: int, folder: Path) -> dict[str, int]:
    """kB: a process's private memory (USS, smaps_rollup) and the PSS of its mappings of files under ``folder``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[key] = int(rest.split()[0])
    mapped, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header: address range, perms, ...
            inside = len(head) >= 6 and head[5].startswith(str(folder))
        elif inside and line.startswith("Pss:"):
            mapped += int(head[1])
    return {"uss": fields["Private_Clean"] + fields["Private_Dirty"], "mapped_pss": mapped}


def test_two_processes_hold_the_dataset_once(tmp_path, own_cache, monkeypatch):
    """A second process training on the same dataset adds < 10% of its size: the PSS of the mapped dataset
    summed over both processes stays that of one (RSS would count the shared pages in each), and the second
    process's private memory (USS) grows by < 10% of it when it loads, samples and reads every page."""
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(40):
        n = 1000
        episodes.append({"observations": rng.normal(size=(n + 1, 96)).astype(np.float32),
                         "actions": rng.uniform(-1, 1, size=(n, 4)).astype(np.float32),
                         "rewards": rng.random(n), "terminations": np.zeros(n, bool),
                         "truncations": np.arange(n) == n - 1})
    root = tmp_path / "minari"
    import gymnasium as gym
    from minari import create_dataset_from_buffers
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    buffers = [EpisodeBuffer(id=i, observations=list(ep["observations"]), actions=list(ep["actions"]),
                             rewards=list(ep["rewards"]), terminations=list(ep["terminations"]),
                             truncations=list(ep["truncations"]), infos={}) for i, ep in enumerate(episodes)]
    create_dataset_from_buffers("test/big/random-v0", buffers, algorithm_name="random", author="batchrl tests",
                                author_email="tests@batchrl.invalid", code_permalink="tests", description="memory",
                                observation_space=gym.spaces.Box(-np.inf, np.inf, (96,), np.float32),
                                action_space=gym.spaces.Box(-1, 1, (4,), np.float32))
    data = load_dataset("test/big/random-v0")  # converted here, before any measurement
    size_kb = sum(a.nbytes for a in (data.observations, data.next_observations, data.actions, data.rewards,
                                     data.terminations)) / 1024
    del data

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "tests.training.map_dataset", "test/big/random-v0"], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        before = json.loads(proc.stdout.readline())
        after = json.loads(proc.stdout.readline())
        return proc, before, after

    procs = []
    try:
        first, _, first_after = start()
        procs.append(first)
        alone = memory(first.pid, own_cache)["mapped_pss"]
        assert alone > 0.95 * size_kb, (alone, size_kb)  # every page was read and is counted
        second, second_before, second_after = start()
        procs.append(second)
        assert second_after["checksum"] == first_after["checksum"]
        both = memory(first.pid, own_cache)["mapped_pss"] + memory(second.pid, own_cache)["mapped_pss"]
        private = memory(second.pid, own_cache)["uss"] - second_before["uss"]
        print(f"dataset {size_kb:.0f} kB; PSS of its mapping: {alone} kB in one process, {both} kB in two; "
              f"USS added by the second process: {private} kB")
        assert both - alone < 0.1 * size_kb, (both, alone, size_kb)
        assert private < 0.1 * size_kb, (private, size_kb)
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=30)
