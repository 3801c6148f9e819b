"""Gradient updates per second of each algorithm on one CPU thread, at Hopper's sizes.

    python -m benchmarks.update_speed            # writes benchmarks/results/update_speed.md

Synthetic transitions (11-dim observations, 3-dim actions) at each algorithm's
default networks and batch size; 20 warm-up updates, then timed updates. No
evaluation or I/O is included.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from benchmarks.offline import RESULTS
from batchrl.training.algorithms import ALGORITHMS, Batch, Context
from batchrl.training.trainer import algorithm_config


def updates_per_second(name: str, updates: int, obs_dim: int = 11, act_dim: int = 3, size: int = 100_000) -> float:
    torch.manual_seed(0)
    obs, act = torch.randn(size, obs_dim), torch.rand(size, act_dim) * 2 - 1
    rew, term = torch.rand(size), torch.zeros(size)
    algo = ALGORITHMS[name][1](algorithm_config(name, {}),
                               Context(obs_dim, act_dim, 100_000, 3000.0, torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)

    def batch() -> Batch:
        idx = torch.randint(size, (algo.batch_size,), generator=gen)
        return Batch(obs[idx], act[idx], rew[idx], obs[idx], term[idx])

    for _ in range(20):
        algo.update(batch())
    start = time.perf_counter()
    for _ in range(updates):
        algo.update(batch())
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
    for name in ALGORITHMS:
        rate = updates_per_second(name, args.updates)
        batch = algorithm_config(name, {}).batch_size
        print(f"{name}: {rate:.1f} updates/s", flush=True)
        lines.append(f"| {name} | {batch} | {rate:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "update_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
