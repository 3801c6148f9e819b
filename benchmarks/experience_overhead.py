"""What the experience log costs: session Step throughput of `batchrl serve` with `--log-experience` on, as a
fraction of the same server with it off, in one run.

    python -m benchmarks.experience_overhead [--model hopper-iql] [--clients 8] [--seconds 10] [--rounds 3]

Rounds alternate off and on (a fresh server each time, one model, CPU, one onnxruntime thread); in each, CLIENTS
threads of this process run episodes over Episode streams (one session each, 200 steps, closed with the episode's
end) for SECONDS, and the steps answered per second are counted. The ratio is the mean "on" rate over the mean
"off" rate. Writes benchmarks/results/experience_overhead.{md,json}. Measure on a quiet machine (pause background
jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from batchrl.serving.client import PolicyClient
from benchmarks import RESULTS

MODELS = Path(__file__).resolve().parents[1] / "models"
EPISODE = 200


def serve(repo: Path, log_dir: Path | None) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repo), "--address", "127.0.0.1:0",
               "--device", "cpu", "--max-sessions", "4096"]
    if log_dir is not None:
        command += ["--log-experience", str(log_dir)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"the server exited ({proc.wait()})")
        if m := re.search(r"\(port (\d+)\)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
            return proc, int(m.group(1))


def measure(port: int, model: str, obs_dim: int, clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with PolicyClient(f"127.0.0.1:{port}") as c:
            while time.monotonic() < stop:
                with c.episode(model) as episode:
                    reward = None
                    for _ in range(EPISODE):
                        episode.step(rng.normal(size=obs_dim).astype(np.float32), reward)
                        counts[i] += 1
                        reward = 1.0
                        if time.monotonic() >= stop:
                            break
                    episode.close(rng.normal(size=obs_dim).astype(np.float32), 1.0, "truncated")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hopper-iql", help="a model of models/")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(MODELS / args.model, repo / args.model)
        rates = {"off": [], "on": []}
        rows_logged = 0
        for r in range(args.rounds):
            for mode in ("off", "on"):
                log_dir = Path(tmp) / f"experience-{r}" if mode == "on" else None
                proc, port = serve(repo, log_dir)
                try:
                    with PolicyClient(f"127.0.0.1:{port}") as c:
                        c.wait_ready()
                        info = next(m for m in c.list_models() if m.name == args.model)
                        obs_dim = int(np.prod(info.versions[-1].manifest.observation_space.shape))
                    rate = measure(port, args.model, obs_dim, args.clients, args.seconds)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                if log_dir is not None:
                    import pyarrow.parquet as pq

                    rows_logged += sum(pq.read_metadata(p).num_rows for p in log_dir.glob("experience-*.parquet"))
                rates[mode].append(rate)
                print(f"round {r + 1} logging {mode}: {rate:.0f} steps/s", flush=True)
    off, on = float(np.mean(rates["off"])), float(np.mean(rates["on"]))
    result = {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
              "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "steps_per_s": rates,
              "mean_off": off, "mean_on": on, "ratio": on / off, "rows_logged": rows_logged}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "experience_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Experience log overhead", "",
             f"Session Step throughput of `batchrl serve` ({args.model}, CPU, 1 onnxruntime thread) with "
             f"`--log-experience` on and off, {args.clients} client threads on Episode streams ({EPISODE}-step "
             f"episodes closed with their end), {args.seconds:g} s per measurement, {args.rounds} alternating "
             f"rounds, a fresh server each ({result['machine']}, {result['written']}).", "",
             "| logging | steps/s per round | mean |", "|---|---|---|",
             f"| off | {', '.join(f'{x:.0f}' for x in rates['off'])} | {off:.0f} |",
             f"| on | {', '.join(f'{x:.0f}' for x in rates['on'])} | {on:.0f} |", "",
             f"Ratio on/off: **{on / off:.3f}** (target >= 0.9). Rows written by the logging servers: {rows_logged}.",
             "", "Reproduce: `python -m benchmarks.experience_overhead` (background jobs paused)."]
    (RESULTS / "experience_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"ratio {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
