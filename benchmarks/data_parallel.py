"""Data-parallel training speed: updates/s of `batchrl train --nproc N` against one process, per algorithm.

    MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.data_parallel [--nprocs 1,2] [--rounds 1]

Each run trains the algorithm's default networks and batch on bench/hopper/medium-replay-v0 for a fixed number of
steps (one evaluation episode at the end, outside the timed training) with one thread per process, and reports
result.json's updates/s (training time only). Writes benchmarks/results/data_parallel.{md,json}. Measure on a quiet
machine: N processes need N idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS

STEPS = {"bc": 4000, "td3bc": 2000, "iql": 2000, "cql": 300, "bcq": 600, "dt": 100}
DATASET = "bench/hopper/medium-replay-v0"


def measure(algorithm: str, nproc: int, steps: int, dataset: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "MASTER_ADDR": "127.0.0.1"}
        command = [sys.executable, "-m", "batchrl.cli", "train", "--nproc", str(nproc), "--algo", algorithm,
                   "--dataset", dataset, "--steps", str(steps), "--eval-every", str(steps), "--eval-episodes", "1",
                   "--log-every", str(steps), "--checkpoint-every", str(steps), "--device", "cpu",
                   "--run-dir", str(run_dir)]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads((run_dir / "result.json").read_text())["updates_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="1,2", help="process counts to compare")
    parser.add_argument("--algorithms", default=",".join(STEPS))
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (the table gives the best)")
    parser.add_argument("--dataset", default=DATASET)
    args = parser.parse_args(argv)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    rows = []
    for algorithm in args.algorithms.split(","):
        rates = {n: max(measure(algorithm, n, STEPS[algorithm], args.dataset) for _ in range(args.rounds))
                 for n in nprocs}
        rows.append({"algorithm": algorithm, "steps": STEPS[algorithm], "updates_per_s": rates,
                     "speedup": {n: rates[n] / rates[nprocs[0]] for n in nprocs}})
        print(algorithm, {n: round(r, 1) for n, r in rates.items()}, flush=True)
    meta = {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset": args.dataset,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "rounds": args.rounds, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_parallel.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# Data-parallel training speed", "",
             f"`batchrl train --nproc N` on {args.dataset}, default networks and batch (each process draws "
             "batch_size / N), one thread per process, updates/s of training time (evaluation excluded), best of "
             f"{args.rounds} run(s); {meta['machine']}, {meta['written']}.", "",
             "Reproduce: `MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.data_parallel`", "",
             "| algorithm | steps | " + " | ".join(f"{n} proc updates/s" for n in nprocs) + " | " +
             " | ".join(f"speed-up ×{n}" for n in nprocs[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(nprocs) - 1)]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['steps']} | " +
                     " | ".join(f"{r['updates_per_s'][n]:.1f}" for n in nprocs) + " | " +
                     " | ".join(f"{r['speedup'][n]:.2f}" for n in nprocs[1:]) + " |")
    (RESULTS / "data_parallel.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
