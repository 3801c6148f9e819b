"""The closed loop end to end: served episodes become the next dataset, a new version is trained, judged by FQE
and promoted only when it is better, while a client keeps sending requests.

    MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.closed_loop [--steps 50000] [--episodes 20]

Stages (each timed; a stage whose output exists is skipped, so a stopped run resumes):
1. serve: `batchrl serve` of a copy of models/hopper-iql (deployed: its highest version) with --log-experience and
   --poll, then `batchrl rollout` of EPISODES episodes with sampling noise (--noise-std) through sessions;
2. import: `batchrl data import` of the logged shards, merged with bench/hopper/medium-replay-v0 (the deployed
   version's training data), spaces, environment and reference scores from the served model's manifest;
3. train: `batchrl train --algo iql` on the merged dataset for STEPS steps;
4. ope: `batchrl ope` of the candidate (exported) on the merged dataset;
5. promote: `batchrl promote hopper-iql --candidate ...` on the merged dataset while a client thread sends an Act
   request every 10 ms; if the gate passes, the client runs on until the server answers with the new
   version (its repository poll loads it), and every failed request is counted.
Writes benchmarks/results/closed_loop.{md,json} (working files in benchmarks/runs/closed-loop/).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from batchrl.serving.client import PolicyClient, act_request
from benchmarks import RESULTS

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "runs" / "closed-loop"
MODEL, BASE = "hopper-iql", "bench/hopper/medium-replay-v0"


def batchrl(*args: str, log: Path) -> str:
    """Run a batchrl command, its output written to ``log``; returns its stdout (raises on failure; a refused
    promote, exit 1, is an outcome)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # one core per job
    done = subprocess.run([sys.executable, "-m", "batchrl.cli", *args], env=env, capture_output=True, text=True)
    stderr = "\n".join(line for line in done.stderr.splitlines() if "%|" not in line)  # no progress bars
    log.write_text(f"$ batchrl {' '.join(args)}\n{done.stdout}\n--- stderr ---\n{stderr}\n")
    if done.returncode not in (0, 1) or (done.returncode == 1 and args[0] != "promote"):
        raise RuntimeError(f"batchrl {args[0]} failed ({done.returncode}): see {log}")
    return done.stdout if done.returncode == 0 else done.stdout + done.stderr.strip().splitlines()[-1]


def start_server(repo: Path, logs: Path, stage_log: Path) -> tuple[subprocess.Popen, int]:
    out = open(stage_log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repo), "--address",
                             "127.0.0.1:0", "--device", "cpu", "--poll", "1", "--log-experience", str(logs),
                             "--log-flush-seconds", "2"], stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"the server exited ({proc.wait()}): see {stage_log}")
        out.write(line)
        if m := re.search(r"\(port (\d+)\)", line):
            def drain():
                for rest in proc.stderr:
                    out.write(rest)
                    out.flush()
            threading.Thread(target=drain, daemon=True).start()
            return proc, int(m.group(1))


def logged_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in folder.glob("experience-*.parquet"))


class Traffic:
    """A client sending an Act request every 10 ms (a controller's tick); counts answers per version and
    failures."""

    def __init__(self, port: int, obs_dim: int):
        self.port, self.obs_dim = port, obs_dim
        self.versions: dict[int, int] = {}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        rng = np.random.default_rng(0)
        with PolicyClient(f"127.0.0.1:{self.port}") as client:
            while not self.stop.is_set():
                request_obs = rng.normal(size=(1, self.obs_dim)).astype(np.float32)
                try:
                    answer = client.stub.Act(act_request(MODEL, request_obs, None), timeout=10)
                    self.versions[answer.version] = self.versions.get(answer.version, 0) + 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                self.stop.wait(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--noise-std", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=50_000, help="IQL training steps of the candidate")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    state_file = WORK / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"seconds": {}}
    state.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime()))  # the day the run began

    def timed(stage: str, fn):
        if stage in state["seconds"]:
            print(f"{stage}: done before ({state['seconds'][stage]:.0f} s)", flush=True)
            return
        started = time.monotonic()
        fn()
        state["seconds"][stage] = time.monotonic() - started
        state_file.write_text(json.dumps(state, indent=2) + "\n")
        print(f"{stage}: {state['seconds'][stage]:.0f} s", flush=True)

    repo, logs, dataset = WORK / "models", WORK / "experience", WORK / "dataset"
    if not repo.exists():
        shutil.copytree(ROOT / "models" / MODEL, repo / MODEL)
    deployed = max(int(v.name) for v in (repo / MODEL).iterdir() if v.name.isdigit())
    state.setdefault("deployed_version", deployed)
    served_model = repo / MODEL / str(state["deployed_version"]) / "model.onnx"
    proc, port = start_server(repo, logs, WORK / "serve.log")
    try:
        def serve_and_rollout():
            out = batchrl("rollout", "--model", MODEL, "--episodes", str(args.episodes), "--noise-std",
                          str(args.noise_std), "--seed", "0", "--server", f"127.0.0.1:{port}", log=WORK / "rollout.log")
            lengths = [int(n) for n in re.findall(r"over (\d+) steps", out)]
            state["rollout"] = {"episodes": len(lengths), "steps": sum(lengths), "summary": out.strip().splitlines()[-1]}
            expected = sum(lengths) + len(lengths)  # every step, and one end row per episode
            deadline = time.monotonic() + 60
            while logged_rows(logs) < expected:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{logged_rows(logs)} rows logged, expected {expected}")
                time.sleep(0.5)
            state["rollout"]["rows_logged"] = logged_rows(logs)

        timed("serve+rollout", serve_and_rollout)
        timed("import", lambda: state.__setitem__("import", batchrl(
            "data", "import", str(logs), "--output", str(dataset), "--merge", BASE, "--model", str(served_model),
            "--overwrite", log=WORK / "import.log").strip().splitlines()[:-1]))  # the summary but its last hint
        run = WORK / "iql"
        timed("train", lambda: batchrl("train", "--algo", "iql", "--dataset", str(dataset), "--steps", str(args.steps),
                                       "--eval-every", str(args.steps), "--eval-episodes", "10", "--run-dir", str(run),
                                       "--device", "cpu", log=WORK / "train.log"))
        state["train"] = json.loads((run / "result.json").read_text())
        candidate = WORK / "candidate"
        if not (candidate / "candidate").exists():
            batchrl("export", str(run), "--name", "candidate", "--repository", str(candidate), log=WORK / "export.log")
        candidate_model = candidate / "candidate" / "1" / "model.onnx"
        timed("ope", lambda: state.__setitem__("ope", json.loads(batchrl(
            "ope", str(candidate_model), "--dataset", str(dataset), "--json", log=WORK / "ope.log"))))

        def promote():
            with PolicyClient(f"127.0.0.1:{port}") as client:
                obs_dim = int(np.prod(client.list_models()[0].versions[-1].manifest.observation_space.shape))
            traffic = Traffic(port, obs_dim)
            try:
                out = batchrl("promote", MODEL, "--candidate", str(candidate_model), "--dataset", str(dataset),
                              "--repository", str(repo), log=WORK / "promote.log")
                promoted = any(line.startswith("promoted:") for line in out.splitlines())
                if promoted:  # the server's poll loads the new version; traffic runs until it answers
                    deadline = time.monotonic() + 120
                    while max(traffic.versions, default=0) <= state["deployed_version"]:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the server did not load the promoted version within 120 s")
                        time.sleep(0.2)
                    time.sleep(2.0)
            finally:
                traffic.finish()
            state["promote"] = {"promoted": promoted, "figures": next(line for line in out.splitlines()
                                                                      if line.startswith("candidate ")),
                                "outcome": out.strip().splitlines()[-1], "requests": traffic.versions,
                                "failed_requests": len(traffic.failures), "failures": traffic.failures[:5]}

        timed("promote", promote)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    write_results(state, args)
    return 0


def write_results(state: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "closed_loop.json").write_text(json.dumps(state, indent=2) + "\n")
    overhead = RESULTS / "experience_overhead.json"
    ranking = RESULTS / "ope_ranking.json"
    ope, promote, train = state["ope"], state["promote"], state["train"]
    lines = ["# The closed loop, end to end", "",
             f"`MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.closed_loop --steps {args.steps} "
             f"--episodes {args.episodes}` (run begun {state['date']}, CPU).", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in state["seconds"].items()]
    lines += ["", "One core per stage (OMP_NUM_THREADS=1); the machine's other core ran the FQE ranking benchmark "
              "meanwhile. FQE is compute-bound here (about 190 steps/s of a 256-256 network, batch 256, on one core): "
              "`ope` is 11 fits of 20,000 steps, `promote` 22."]
    lines += ["", f"1. Served {MODEL} version {state['deployed_version']} with `--log-experience`; `batchrl rollout` of "
              f"{state['rollout']['episodes']} episodes with noise std {args.noise_std}: {state['rollout']['summary']}; "
              f"{state['rollout']['rows_logged']} rows logged ({state['rollout']['steps']} steps + one end row per "
              "episode).",
              f"2. Imported, merged with {BASE}: " + "; ".join(state["import"]) + ".",
              f"3. IQL, {args.steps} steps on the merged dataset: final normalised score "
              f"{train['normalized_score']:.1f} (return {train['return_mean']:.1f}, "
              "10 episodes).",
              f"4. `batchrl ope` of the candidate: {ope['value']:.2f} ({ope['method']}; [{ope['low']:.2f}, "
              f"{ope['high']:.2f}], gamma {ope['gamma']}, {ope['steps_per_fit']} steps per fit).",
              f"5. `batchrl promote`: {promote['figures']}. Outcome: {promote['outcome']}. " +
              (f"Requests during the gate and swap, by answering version: {promote['requests']}; failed: "
               f"{promote['failed_requests']}." if promote.get("requests") is not None else promote["note"])]
    if overhead.exists():
        o = json.loads(overhead.read_text())
        lines.append(f"\nLogging overhead (benchmarks/results/experience_overhead.md): Step throughput with logging "
                     f"on / off = {o['ratio']:.3f}.")
    if ranking.exists():
        r = json.loads(ranking.read_text())
        lines.append(f"FQE ranking benchmark (benchmarks/results/ope_ranking.md): Spearman "
                     f"{r.get('spearman', float('nan')):.2f} over {len(r['rows'])} policies.")
    (RESULTS / "closed_loop.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
