"""Minari datasets as flat float32 transition arrays plus episode ranges, mapped from the dataset cache.

A Minari episode of N steps holds N+1 observations and N actions, rewards,
terminations and truncations. Each episode is cut separately into
observations[:-1] / observations[1:] so that next observations never drift
across an episode boundary.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchrl.training import dataset_cache


@dataclass(frozen=True)
class OfflineDataset:
    dataset_id: str
    env_id: str
    observations: np.ndarray        # [T, obs_dim] float32
    actions: np.ndarray             # [T, act_dim] float32, raw (environment units)
    rewards: np.ndarray             # [T] float32
    next_observations: np.ndarray   # [T, obs_dim] float32
    terminations: np.ndarray        # [T] float32: 1 where the step ended the episode by termination
    truncations: np.ndarray         # [T] float32: 1 where the step ended the episode by truncation
    episode_starts: np.ndarray      # [E] int64, index of each episode's first step
    episode_lengths: np.ndarray     # [E] int64
    action_low: np.ndarray          # [act_dim] float32
    action_high: np.ndarray         # [act_dim] float32
    ref_min_score: float | None
    ref_max_score: float | None
    # float64 mean and std of the observations, when computed ahead (the dataset cache stores them):
    # observation_stats then reads no observation, which for a mapped dataset would fault every page in
    observation_moments: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def size(self) -> int:
        return self.observations.shape[0]

    @property
    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)

    def observation_stats(self, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (floored at ``eps``) of the observations."""
        if self.observation_moments is not None:
            mean, std = self.observation_moments
        else:
            mean = self.observations.mean(axis=0, dtype=np.float64)
            std = self.observations.std(axis=0, dtype=np.float64)
        return mean.astype(np.float32), np.maximum(std, eps).astype(np.float32)

    def normalized_score(self, mean_return: float) -> float | None:
        if self.ref_min_score is None or self.ref_max_score is None:
            return None
        return normalized_score(mean_return, self.ref_min_score, self.ref_max_score)


def synthetic_dataset(obs_dim: int = 11, act_dim: int = 3, episodes: int = 100, length: int = 1000,
                      seed: int = 0) -> OfflineDataset:
    """Random transitions in episodes of ``length`` steps (default: Hopper's sizes), for measuring updates and
    checking devices where no Minari dataset is at hand (it teaches nothing)."""
    rng = np.random.default_rng(seed)
    size = episodes * length
    obs = rng.normal(size=(size, obs_dim)).astype(np.float32)
    ends = np.zeros(size, np.float32)
    ends[length - 1::length] = 1.0
    return OfflineDataset(
        dataset_id="synthetic", env_id="", observations=obs, next_observations=np.roll(obs, -1, axis=0),
        actions=rng.uniform(-1, 1, size=(size, act_dim)).astype(np.float32),
        rewards=rng.random(size).astype(np.float32), terminations=np.zeros(size, np.float32), truncations=ends,
        episode_starts=np.arange(0, size, length, dtype=np.int64),
        episode_lengths=np.full(episodes, length, dtype=np.int64), action_low=-np.ones(act_dim, np.float32),
        action_high=np.ones(act_dim, np.float32), ref_min_score=None, ref_max_score=None)


def normalized_score(mean_return, ref_min: float, ref_max: float):
    """D4RL-style score: 0 is the random policy, 100 the expert reference."""
    return 100.0 * (mean_return - ref_min) / (ref_max - ref_min)


def open_minari(dataset: str):
    """A Minari dataset by id (under MINARI_DATASETS_PATH) or by path: a dataset's folder or its data/ folder."""
    import minari
    from minari.dataset.minari_dataset import MinariDataset

    path = Path(dataset).expanduser()
    if os.sep in dataset and path.is_dir():
        data = path / "data" if (path / "data").is_dir() else path
        if not (data / "metadata.json").is_file():
            raise FileNotFoundError(f"{dataset} is not a Minari dataset folder: no metadata.json in {data}")
        return MinariDataset(data)
    try:
        return minari.load_dataset(dataset)
    except FileNotFoundError:  # Minari's own hint (download=True) is for its Python API
        root = os.environ.get("MINARI_DATASETS_PATH")
        where = f"under MINARI_DATASETS_PATH={root}" if root else "(MINARI_DATASETS_PATH is not set)"
        local = sorted(minari.list_local_datasets())
        shown = ", ".join(local[:8]) + (f" and {len(local) - 8} more" if len(local) > 8 else "") or "none"
        raise FileNotFoundError(f"Minari dataset {dataset!r} not found {where} (nor is it a folder); datasets "
                                f"there: {shown}; get one with `minari download DATASET_ID`") from None


def load_dataset(dataset: str) -> OfflineDataset:
    """A Minari dataset (by id or path, see ``open_minari``) as flat arrays mapped read-only from the machine's
    dataset cache (``dataset_cache``), converted there on first use."""
    source = open_minari(dataset)
    folder = dataset_cache.entry(source.spec.dataset_id, Path(source.storage.data_path),
                                 lambda out: convert(source, dataset_cache.Writer(out)))
    arrays, meta = dataset_cache.read(folder)
    return OfflineDataset(
        dataset_id=meta["dataset_id"], env_id=meta["env_id"], ref_min_score=meta["ref_min_score"],
        ref_max_score=meta["ref_max_score"], observation_moments=(arrays.pop("observation_mean"),
                                                                  arrays.pop("observation_std")), **arrays)


def convert(ds, out: dataset_cache.Writer) -> None:
    """Write a Minari dataset's transitions episode by episode into ``out`` (never all in memory)."""
    import gymnasium as gym

    name = ds.spec.dataset_id
    if not isinstance(ds.action_space, gym.spaces.Box):
        raise ValueError(f"dataset {name!r}: action space {ds.action_space} is not a continuous Box")
    if not isinstance(ds.observation_space, gym.spaces.Box):
        raise ValueError(f"dataset {name!r}: observation space {ds.observation_space} is not a Box")
    low = np.asarray(ds.action_space.low, dtype=np.float32).reshape(-1)
    high = np.asarray(ds.action_space.high, dtype=np.float32).reshape(-1)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ValueError(f"dataset {name!r}: action bounds must be finite, got {low} .. {high}")
    total, episodes = int(ds.total_steps), int(ds.total_episodes)
    if total == 0 or episodes == 0:
        raise ValueError(f"dataset {name!r} holds no episodes")
    obs_dim = int(np.prod(ds.observation_space.shape))
    arrays = {"observations": out.array("observations", (total, obs_dim), np.float32),
              "next_observations": out.array("next_observations", (total, obs_dim), np.float32),
              "actions": out.array("actions", (total, low.size), np.float32)}
    for key in ("rewards", "terminations", "truncations"):
        arrays[key] = out.array(key, (total,), np.float32)
    lengths = []
    at = 0
    for ep in ds.iterate_episodes():
        n = len(ep.actions)
        if len(ep.observations) != n + 1:
            raise ValueError(
                f"episode {ep.id}: {len(ep.observations)} observations for {n} actions (expected {n + 1})"
            )
        for key, arr in (("rewards", ep.rewards), ("terminations", ep.terminations), ("truncations", ep.truncations)):
            if len(arr) != n:
                raise ValueError(f"episode {ep.id}: {len(arr)} {key} for {n} actions")
        if at + n > total:
            raise ValueError(f"dataset {name!r}: its episodes hold more than the {total} steps its metadata states")
        o = np.asarray(ep.observations, dtype=np.float32).reshape(n + 1, -1)
        term = np.asarray(ep.terminations, dtype=bool)
        # A step flagged both terminated and truncated ended by termination: never bootstrap it.
        trunc = np.asarray(ep.truncations, dtype=bool) & ~term
        step = slice(at, at + n)
        arrays["observations"][step] = o[:-1]
        arrays["next_observations"][step] = o[1:]
        arrays["actions"][step] = np.asarray(ep.actions, dtype=np.float32).reshape(n, -1)
        arrays["rewards"][step] = np.asarray(ep.rewards, dtype=np.float32)
        arrays["terminations"][step] = term
        arrays["truncations"][step] = trunc
        lengths.append(n)
        at += n
    if at != total:
        raise ValueError(f"dataset {name!r}: its episodes hold {at} steps, its metadata states {total}")
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    out.save("episode_lengths", lengths_arr)
    out.save("episode_starts", np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64))
    out.save("action_low", low)
    out.save("action_high", high)
    obs = arrays["observations"]
    out.save("observation_mean", obs.mean(axis=0, dtype=np.float64))
    out.save("observation_std", obs.std(axis=0, dtype=np.float64))
    meta = ds.storage.metadata
    env_id = _env_id(meta.get("eval_env_spec")) or (ds.spec.env_spec.id if ds.spec.env_spec is not None else "")
    out.finish({"dataset_id": name, "env_id": env_id, "ref_min_score": _optional_float(meta.get("ref_min_score")),
                "ref_max_score": _optional_float(meta.get("ref_max_score")), "source": str(ds.storage.data_path),
                "format": dataset_cache.FORMAT})


def _env_id(spec_json) -> str:
    if not spec_json:
        return ""
    return str(json.loads(spec_json).get("id", "")) if isinstance(spec_json, str) else str(spec_json.id)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
