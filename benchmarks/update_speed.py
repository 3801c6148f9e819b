"""Gradient updates per second of each algorithm on one CPU thread, at Hopper's sizes.

    python -m benchmarks.update_speed            # writes benchmarks/results/update_speed.md

A synthetic dataset (11-dim observations, 3-dim actions, 100 episodes of 1,000
steps) drawn by each algorithm's own sampler (transitions, or the Decision
Transformer's segments) at its default networks and batch size; 20 warm-up
updates, then timed updates. Sampling is included, evaluation and I/O are not.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from benchmarks.offline import RESULTS
from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.data import OfflineDataset
from batchrl.training.trainer import algorithm_config


def synthetic_dataset(obs_dim: int = 11, act_dim: int = 3, episodes: int = 100, length: int = 1000) -> OfflineDataset:
    rng = np.random.default_rng(0)
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


def updates_per_second(name: str, updates: int, data: OfflineDataset | None = None, warmup: int = 20) -> float:
    """Updates per second of ``name`` at its defaults, batches drawn by its own sampler."""
    torch.manual_seed(0)
    data = synthetic_dataset() if data is None else data
    device = torch.device("cpu")
    algo = ALGORITHMS[name][1](algorithm_config(name, {}), Context(data.obs_dim, data.act_dim, 100_000, 3000.0, device))
    mean, std = data.observation_stats()
    sampler = algo.sampler(data, mean, std, device, seed=0)
    for _ in range(warmup):
        algo.update(sampler.sample(algo.batch_size))
    start = time.perf_counter()
    for _ in range(updates):
        algo.update(sampler.sample(algo.batch_size))
    return updates / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200, help="timed updates per algorithm")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# Updates per second, one CPU thread", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}. "
             "Reproduce: `python -m benchmarks.update_speed`.", "",
             "| algorithm | batch | updates/s |", "|---|---|---|"]
    data = synthetic_dataset()
    for name in ALGORITHMS:
        rate = updates_per_second(name, args.updates, data)
        batch = algorithm_config(name, {}).batch_size
        print(f"{name}: {rate:.1f} updates/s", flush=True)
        lines.append(f"| {name} | {batch} | {rate:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "update_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
