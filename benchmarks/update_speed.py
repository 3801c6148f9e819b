"""Gradient updates per second of every algorithm beside d3rlpy's same algorithm, one CPU thread each.

    python -m benchmarks.update_speed            # writes benchmarks/results/update_speed.{md,json}

A synthetic dataset (11-dim observations, 3-dim actions, 100 episodes of 1,000 steps: Hopper's
sizes) drawn by each library's own sampler (transitions, or the Decision Transformer's segments) at
batchrl's default networks and batch size; d3rlpy is configured to the same sizes (benchmarks/
peer_d3rlpy.py; the differences that remain are in the table) and runs in its own virtual
environment (benchmarks/.peer-venv, made on first use: it pins an older gymnasium) as a subprocess.
Per algorithm and round: batchrl, then d3rlpy, each in a fresh process, 20 warm-up updates each, then
timed updates (sampling included); ``--rounds`` rounds (3), medians reported, with the load average
before and after.

Beside each row: the FLOPs of one batchrl update (torch.utils.flop_counter), the machine's measured
matmul rate at that algorithm's own layer shapes (each of its trained linear layers as one
[4096, in] x [in, out] matmul, best of several; the total FLOPs over the total time), the ceiling
that rate puts on updates/s, the fraction of it reached, and the time per update spent outside that
rate (the fixed overhead: Python, optimiser steps, small ops).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.offline import RESULTS
from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.data import OfflineDataset
from batchrl.training.networks import EnsembleLinear
from batchrl.training.trainer import algorithm_config

# Timed updates per measurement (about 1-5 s each on one core of this machine's class).
UPDATES = {"bc": 400, "td3bc": 200, "iql": 150, "cql": 30, "bcq": 60, "dt": 20}
# What the peer does differently at these settings.
PEER_DIFFERENCES = {
    "bc": "none",
    "td3bc": "none",
    "iql": "d3rlpy's Gaussian actor head (log-std through a sigmoid) and one optimiser for Q and V",
    "cql": "d3rlpy samples the candidate actions with its own SAC head",
    "bcq": "d3rlpy draws n_action_samples (10) candidates when acting too (batchrl: 100), its VAE's own layout",
    "dt": "d3rlpy's position encoding (learned per position, not per timestep), Adam without weight decay",
}
MATMUL_ROWS = 4096


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


def update_flops(name: str, data: OfflineDataset) -> tuple[float, list[tuple[int, int]]]:
    """FLOPs of one update at the defaults (mean of 4), and the (in, out) shape of every trained linear layer."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    algo = ALGORITHMS[name][1](algorithm_config(name, {}), Context(data.obs_dim, data.act_dim, 100_000, 3000.0,
                                                                     torch.device("cpu")))
    mean, std = data.observation_stats()
    sampler = algo.sampler(data, mean, std, torch.device("cpu"), seed=0)
    batch = sampler.sample(algo.batch_size)
    algo.update(batch)  # (a first update may take other paths: lazy state)
    with FlopCounterMode(display=False) as counter:  # the mean of 4 (TD3+BC steps its actor every other one)
        for _ in range(4):
            algo.update(batch)
    shapes = []
    for key, module in algo.modules.items():
        if key.endswith("_target"):
            continue
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                shapes.append((layer.in_features, layer.out_features))
            elif isinstance(layer, EnsembleLinear):
                shapes += [tuple(layer.weight.shape[1:])] * layer.weight.shape[0]
    return counter.get_total_flops() / 4.0, shapes


def matmul_rate(shapes: list[tuple[int, int]], repeats: int = 5) -> float:
    """FLOP/s of one thread running each shape as a [MATMUL_ROWS, in] x [in, out] matmul (best of ``repeats``)."""
    total_flops = total_seconds = 0.0
    for d_in, d_out in sorted(set(shapes)):
        x, w = torch.randn(MATMUL_ROWS, d_in), torch.randn(d_in, d_out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, w)
            best = min(best, time.perf_counter() - start)
        count = shapes.count((d_in, d_out))
        total_flops += 2.0 * MATMUL_ROWS * d_in * d_out * count
        total_seconds += best * count
    return total_flops / total_seconds


def batchrl_rate(name: str, updates: int) -> float:
    """``updates_per_second`` in a fresh process, as the peer's: an algorithm measured after others in one
    process runs slower (measured: CQL 9.4 updates/s right after BC, IQL and TD3+BC, 10.7 on its second go)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.update_speed", "--one", name, str(updates)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"batchrl {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["updates_per_s"]


def peer_rate(name: str, updates: int) -> float:
    from benchmarks import peer

    settings = dataclasses.asdict(algorithm_config(name, {}))
    out = subprocess.run([str(peer.python()), str(peer.WORKER), "--speed", name, json.dumps(settings), str(updates)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"d3rlpy {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["updates_per_s"]


def measure(names: list[str], rounds: int, peer: bool) -> dict:
    data = synthetic_dataset()
    rows = {}
    for name in names:
        flops, shapes = update_flops(name, data)
        rate = matmul_rate(shapes)
        ours, theirs = [], []
        for r in range(rounds):
            ours.append(batchrl_rate(name, UPDATES[name]))
            if peer:
                theirs.append(peer_rate(name, UPDATES[name]))
            print(f"{name}, round {r + 1}: batchrl {ours[-1]:.1f}"
                  + (f", d3rlpy {theirs[-1]:.1f}" if peer else "") + " updates/s", flush=True)
        median = statistics.median(ours)
        ceiling = rate / flops
        rows[name] = {"batch": algorithm_config(name, {}).batch_size, "batchrl": ours, "d3rlpy": theirs,
                      "batchrl_median": median, "d3rlpy_median": statistics.median(theirs) if theirs else None,
                      "gflop_per_update": flops / 1e9, "matmul_gflops": rate / 1e9, "ceiling": ceiling,
                      "fraction_of_ceiling": median / ceiling,
                      "overhead_ms": max(0.0, 1e3 / median - 1e3 * flops / rate), "difference": PEER_DIFFERENCES[name]}
    return rows


def markdown(data: dict) -> str:
    lines = ["# Updates per second, one CPU thread, beside d3rlpy", "",
             f"Machine: {data['machine']}, torch {data['torch']}, d3rlpy 2.8.1 in its own environment. "
             f"Medians of {data['rounds']} rounds (batchrl, then d3rlpy, per algorithm and round); load average "
             f"{data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after. {data['note']}".rstrip(),
             f"Reproduce: `{data['command']}`.", "",
             "| algorithm | batch | batchrl updates/s | d3rlpy updates/s | batchrl / d3rlpy | GFLOP per update | "
             "matmul GFLOP/s at its layers | ceiling updates/s | fraction of ceiling | overhead ms per update | "
             "per round (batchrl; d3rlpy) | differences |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        peer = r["d3rlpy_median"]
        versus = "" if peer is None else f"{r['batchrl_median'] / peer:.2f}"
        lines.append(
            f"| {name} | {r['batch']} | {r['batchrl_median']:.1f} | {'' if peer is None else f'{peer:.1f}'} | "
            f"{versus} | {r['gflop_per_update']:.3f} | {r['matmul_gflops']:.0f} | {r['ceiling']:.1f} | "
            f"{r['fraction_of_ceiling']:.2f} | {r['overhead_ms']:.2f} | "
            f"{', '.join(f'{v:.1f}' for v in r['batchrl'])}; {', '.join(f'{v:.1f}' for v in r['d3rlpy'])} | "
            f"{r['difference']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two libraries (medians)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="batchrl only (no d3rlpy environment needed)")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else the machine ran)")
    parser.add_argument("--one", nargs=2, metavar=("ALGORITHM", "UPDATES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:  # one measurement, for the driver
        print(json.dumps({"updates_per_s": updates_per_second(args.one[0], int(args.one[1]))}))
        return 0
    before = os.getloadavg()
    rows = measure(args.algorithms.split(","), args.rounds, not args.no_peer)
    data = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "rounds": args.rounds, "load_before": before, "load_after": os.getloadavg(), "note": args.note,
            "command": "python -m benchmarks.update_speed" + ("" if args.rounds == 3 else f" --rounds {args.rounds}"),
            "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "update_speed.md").write_text(markdown(data))
    (RESULTS / "update_speed.json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
