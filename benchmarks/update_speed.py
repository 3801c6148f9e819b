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

from benchmarks import RESULTS
from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.data import OfflineDataset, synthetic_dataset
from batchrl.training.memory import keep_freed_memory
from batchrl.training.networks import EnsembleLinear
from batchrl.training.trainer import algorithm_config, compile_networks

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
CUDA_UPDATES = 300
MATMUL_ROWS = 4096


def updates_per_second(name: str, updates: int, data: OfflineDataset | None = None, warmup: int = 20,
                       compiled: bool = False, device: str = "cpu") -> float:
    """Updates per second of ``name`` at its defaults, batches drawn by its own sampler (and the host memory
    setting the trainer makes); ``compiled``: as ``batchrl train --compile`` (compiled during the warm-up)."""
    keep_freed_memory()
    data = synthetic_dataset() if data is None else data
    algo, sampler = build(name, data, device)
    if compiled:
        compile_networks(algo)
    for _ in range(warmup):
        algo.update(sampler.sample(algo.batch_size))
    synchronize(sampler.device)
    start = time.perf_counter()
    for _ in range(updates):
        algo.update(sampler.sample(algo.batch_size))
    synchronize(sampler.device)
    return updates / (time.perf_counter() - start)


def build(name: str, data: OfflineDataset, device: str):
    """``name`` at its defaults (seed 0) and its own sampler over ``data`` on ``device``."""
    torch.manual_seed(0)
    device = torch.device(device)
    algo = ALGORITHMS[name][1](algorithm_config(name, {}), Context(data.obs_dim, data.act_dim, 100_000, 3000.0, device))
    mean, std = data.observation_stats()
    return algo, algo.sampler(data, mean, std, device, seed=0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA update returns before it has run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def update_flops(name: str, data: OfflineDataset, device: str = "cpu") -> tuple[float, list[tuple[int, int]]]:
    """FLOPs of one update at the defaults (mean of 4), and the (in, out) shape of every trained linear layer."""
    from torch.utils.flop_counter import FlopCounterMode

    algo, sampler = build(name, data, device)
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


def matmul_rate(shapes: list[tuple[int, int]], repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of one thread running each shape as a [MATMUL_ROWS, in] x [in, out] matmul (best of ``repeats``)."""
    total_flops = total_seconds = 0.0
    for d_in, d_out in sorted(set(shapes)):
        x, w = torch.randn(MATMUL_ROWS, d_in, device=device), torch.randn(d_in, d_out, device=device)
        best = float("inf")
        for _ in range(repeats):
            synchronize(x.device)
            start = time.perf_counter()
            torch.mm(x, w)
            synchronize(x.device)
            best = min(best, time.perf_counter() - start)
        count = shapes.count((d_in, d_out))
        total_flops += 2.0 * MATMUL_ROWS * d_in * d_out * count
        total_seconds += best * count
    return total_flops / total_seconds


def batchrl_rate(name: str, updates: int, compiled: bool = False, device: str = "cpu") -> float:
    """``updates_per_second`` in a fresh process, as the peer's: an algorithm measured after others in one
    process runs slower (measured: CQL 9.4 updates/s right after BC, IQL and TD3+BC, 10.7 on its second go)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.update_speed", "--one", name, str(updates), "--device",
                          device] + (["--compile"] if compiled else []),
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


def measure(names: list[str], rounds: int, peer: bool, compile_too: bool, device: str = "cpu") -> dict:
    data = synthetic_dataset()
    rows = {}
    for name in names:
        flops, shapes = update_flops(name, data, device)
        rate = matmul_rate(shapes, device=device)
        updates = UPDATES[name] if device == "cpu" else CUDA_UPDATES
        ours, theirs, compiled = [], [], []
        for r in range(rounds):
            ours.append(batchrl_rate(name, updates, device=device))
            if compile_too:
                compiled.append(batchrl_rate(name, updates, compiled=True, device=device))
            if peer:
                theirs.append(peer_rate(name, updates))
            print(f"{name}, round {r + 1}: batchrl {ours[-1]:.1f}"
                  + (f", compiled {compiled[-1]:.1f}" if compile_too else "")
                  + (f", d3rlpy {theirs[-1]:.1f}" if peer else "") + " updates/s", flush=True)
        median = statistics.median(ours)
        ceiling = rate / flops
        rows[name] = {"batch": algorithm_config(name, {}).batch_size, "batchrl": ours, "d3rlpy": theirs,
                      "batchrl_median": median, "d3rlpy_median": statistics.median(theirs) if theirs else None,
                      "compiled": compiled, "compiled_median": statistics.median(compiled) if compiled else None,
                      "gflop_per_update": flops / 1e9, "matmul_gflops": rate / 1e9, "ceiling": ceiling,
                      "fraction_of_ceiling": median / ceiling,
                      "overhead_ms": max(0.0, 1e3 / median - 1e3 * flops / rate), "difference": PEER_DIFFERENCES[name]}
    return rows


def measured(rows: dict) -> str:
    kinds = ["batchrl"] + ["batchrl with `--compile`"] * any(r.get("compiled") for r in rows.values()) \
        + ["d3rlpy"] * any(r["d3rlpy"] for r in rows.values())
    return ", then ".join(kinds)


def markdown(data: dict) -> str:
    cpu = data.get("device", "cpu") == "cpu"
    peer = any(r["d3rlpy"] for r in data["rows"].values())
    lines = [f"# Updates per second, {'one CPU thread' if cpu else data['device']}{' beside d3rlpy' * peer}", "",
             f"Machine: {data['machine']}, torch {data['torch']}"
             + (", d3rlpy 2.8.1 in its own environment. " if peer else ". ")
             + f"Medians of {data['rounds']} rounds (per algorithm and round: {measured(data['rows'])}, each in a "
             f"fresh process); load average {data['load_before'][0]:.2f} before, "
             f"{data['load_after'][0]:.2f} after. {data['note']}".rstrip(),
             f"Reproduce: `{data['command']}`.", "",
             "| algorithm | batch | batchrl updates/s | d3rlpy updates/s | batchrl / d3rlpy | --compile updates/s | "
             "--compile / eager | GFLOP per update | matmul GFLOP/s at its layers | ceiling updates/s | "
             "fraction of ceiling | overhead ms per update | per round (batchrl; --compile; d3rlpy) | differences |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value):
        return "" if value is None else f"{value:.1f}"

    for name, r in data["rows"].items():
        theirs, compiled = r["d3rlpy_median"], r.get("compiled_median")
        versus = "" if theirs is None else f"{r['batchrl_median'] / theirs:.2f}"
        gain = "" if compiled is None else f"{compiled / r['batchrl_median']:.2f}"
        rounds = "; ".join(", ".join(f"{v:.1f}" for v in r[key]) for key in ("batchrl", "compiled", "d3rlpy"))
        lines.append(
            f"| {name} | {r['batch']} | {r['batchrl_median']:.1f} | {cell(theirs)} | {versus} | {cell(compiled)} | "
            f"{gain} | {r['gflop_per_update']:.3f} | {r['matmul_gflops']:.0f} | {r['ceiling']:.1f} | "
            f"{r['fraction_of_ceiling']:.2f} | {r['overhead_ms']:.2f} | {rounds} | {r['difference']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two libraries (medians)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="batchrl only (no d3rlpy environment needed)")
    parser.add_argument("--no-compile", action="store_true", help="skip the --compile measurements")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # with --one
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: synthetic batches on the GPU, no peer, results in update_speed_cuda.*")
    parser.add_argument("--out", default=None, help="results file stem under benchmarks/results/ (default: "
                                                     "update_speed, or update_speed_cuda on CUDA)")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else the machine ran)")
    parser.add_argument("--one", nargs=2, metavar=("ALGORITHM", "UPDATES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:  # one measurement, for the driver
        print(json.dumps({"updates_per_s": updates_per_second(args.one[0], int(args.one[1]),
                                                                  compiled=args.compile, device=args.device)}))
        return 0
    cuda = args.device != "cpu"
    before = os.getloadavg()
    rows = measure(args.algorithms.split(","), args.rounds, not (args.no_peer or cuda), not args.no_compile,
                   args.device)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    if cuda:
        machine += f", {torch.cuda.get_device_name(torch.device(args.device))}"
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # (the note is the report's, not the command's)
        del shown[shown.index("--note"):shown.index("--note") + 2]
    command = " ".join(["python -m benchmarks.update_speed", *shown])
    data = {"machine": machine, "device": args.device, "torch": torch.__version__, "rounds": args.rounds,
            "load_before": before, "load_after": os.getloadavg(), "note": args.note, "command": command.strip(),
            "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("update_speed" if not cuda else "update_speed_cuda")
    (RESULTS / f"{stem}.md").write_text(markdown(data))
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
