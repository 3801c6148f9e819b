"""The peer trial kind of the benchmark sweeps: d3rlpy's same algorithm on the same data.

A peer run is a folder like a batchrl run (metrics.jsonl eval rows, result.json), made in three steps:
1. Data: batchrl's own loader gives the transitions; they are written for d3rlpy as its episodes
   (observations, actions, rewards, terminals, timeouts), with batchrl's observation statistics,
   action bounds and return range, so both libraries normalise alike. The one difference: d3rlpy
   stores N observations per episode and so drops the last transition of every episode that did not
   terminate; the count is in result.json ("peer_dropped_transitions").
2. Training: benchmarks/peer_d3rlpy.py in the peer's own virtual environment (benchmarks/.peer-venv,
   made on first use from benchmarks/peer-requirements.txt with this environment's torch), with the
   settings translated from batchrl's resolved defaults. It checkpoints at every evaluation point and
   resumes from the last one.
3. Evaluation: each saved TorchScript policy is evaluated here, with batchrl's evaluation code, in the
   dataset's evaluation environment, on the same episode seeds as batchrl's runs.

d3rlpy is a benchmark dependency only: training/ and serving/ never import it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".peer-venv"
REQUIREMENTS = ROOT / "peer-requirements.txt"
WORKER = ROOT / "peer_d3rlpy.py"
PEER = "d3rlpy"
# What the peer cannot match, per algorithm (the tables print it).
DIFFERENCES = {
    "bc": "none beyond the data difference",
    "bc-gaussian": "d3rlpy's stochastic BC regresses a sampled action instead of maximising the likelihood",
    "iql": "one learning rate serves d3rlpy's IQL Q and V networks; no deterministic actor",
    "iql-clamp": "d3rlpy's Gaussian actor maps its log-std through a sigmoid into [-5, 2], starting at -1.5 "
                 "(batchrl's actor_std=sigmoid)",
    "iql-reference": "d3rlpy backs its IQL Q up onto V(s') of before the step's V update (batchrl's update_order=joint)",
    "td3bc": "none beyond the data difference",
    "cql": "d3rlpy's CQL samples its candidate actions with its own SAC policy head",
    "cql-sample": "d3rlpy backs up at its policy's mean action at s' (batchrl's backup=mean), not at a sampled one",
}


def difference(algorithm: str, settings: dict) -> str:
    if algorithm == "bc" and settings["policy"] == "gaussian":
        return DIFFERENCES["bc-gaussian"]
    if algorithm == "cql" and settings["backup"] == "sample":
        return f"{DIFFERENCES['cql']}; {DIFFERENCES['cql-sample']}"
    if algorithm == "iql":
        parts = [DIFFERENCES["iql-clamp"]] if settings["actor_std"] == "clamp" else []
        parts += [DIFFERENCES["iql-reference"]] if settings["update_order"] == "reference" else []
        return "; ".join(parts + [DIFFERENCES["iql"]])
    return DIFFERENCES.get(algorithm, "")


def python() -> Path:
    """The peer environment's interpreter, made on first use (the torch build is this environment's).

    Made under a lock and marked complete last, so parallel runs wait for one maker instead of using a
    half-installed environment (an interrupted make is redone)."""
    import fcntl
    import shutil

    exe, done = VENV / "bin" / "python", VENV / ".complete"
    if done.exists():
        return exe
    with open(ROOT / ".peer-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return exe
        import torch

        version = torch.__version__.split("+")[0]
        print(f"making the peer environment {VENV} (d3rlpy, torch {version})", flush=True)
        shutil.rmtree(VENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        pip = [str(exe), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={version}"], check=True)
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        done.touch()
    return exe


def write_dataset(dataset_id: str, path: Path) -> int:
    """The dataset as d3rlpy episodes; returns how many transitions d3rlpy will drop."""
    from batchrl.training.data import load_dataset

    data = load_dataset(dataset_id)
    obs_mean, obs_std = data.observation_stats()
    ends = data.episode_starts + data.episode_lengths - 1
    timeouts = data.truncations.copy()
    timeouts[ends] = np.where(data.terminations[ends] > 0, 0.0, 1.0)  # every episode ends in one or the other
    returns = data.episode_returns
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, observations=data.observations, actions=data.actions, rewards=data.rewards,
             terminals=data.terminations, timeouts=timeouts, obs_mean=obs_mean, obs_std=obs_std,
             action_low=data.action_low, action_high=data.action_high, return_max=returns.max(),
             return_min=returns.min(), next_observations=data.next_observations)  # (the last: for check_data)
    os.replace(tmp, path)
    return int((data.terminations[ends] == 0).sum())


def evaluate_policies(run_dir: Path, dataset_id: str, episodes: int, seed: int = 0) -> list[dict]:
    """Evaluate every saved policy not yet in metrics.jsonl; returns all eval rows, in step order."""
    import torch

    from batchrl.training.data import load_dataset
    from batchrl.training.evaluation import evaluate, make_eval_env, stateless

    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    done = {r["step"] for r in rows}
    data = load_dataset(dataset_id)
    env = None
    for path in sorted(run_dir.glob("policy-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
        step = int(path.stem.split("-")[1])
        if step in done:
            continue
        env = env or make_eval_env(dataset_id)
        policy = torch.jit.load(str(path))
        with torch.no_grad():
            act = stateless(lambda obs: policy(torch.from_numpy(obs[None]))[0].numpy())
            result = evaluate(env, act, episodes, seed, data.ref_min_score, data.ref_max_score)
        row = {"kind": "eval", "step": step, "return_mean": result.mean_return, "return_std": result.std_return,
               "normalized_score": result.normalized_score, "normalized_std": result.normalized_std}
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


OWN = {"minari": "d3rlpy's own defaults and its own get_minari pipeline (2.8.1: episode k's observations shifted k "
               "steps against its actions)",
       "aligned": "d3rlpy's own defaults on its own episodes from Minari, each episode's final observation left out"}


def run(trial, run_dir: Path) -> dict:
    """The peer trial kind of `batchrl sweep` (a grid's ``trainer: benchmarks.peer:run``): train (or resume) and
    evaluate one peer run of a sweep ``Trial`` with batchrl's settings translated and batchrl's arrays; writes
    and returns result.json's content."""
    return peer_run(trial, run_dir)


def run_own(trial, run_dir: Path) -> dict:
    """``trainer: benchmarks.peer:run_own``: d3rlpy with its own defaults through its own get_minari."""
    return peer_run(trial, run_dir, own="minari")


def run_own_aligned(trial, run_dir: Path) -> dict:
    """``trainer: benchmarks.peer:run_own_aligned``: d3rlpy's own defaults on correctly built episodes."""
    return peer_run(trial, run_dir, own="aligned")


def peer_run(trial, run_dir: Path, own: str | None = None) -> dict:
    import dataclasses

    from batchrl.training.trainer import algorithm_config, lock_run

    algorithm, dataset_id, seed, steps = trial.algorithm, trial.dataset, trial.seed, trial.steps
    eval_every, episodes, overrides = trial.eval_every, trial.eval_episodes, dict(trial.settings)
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    if own and overrides:
        raise ValueError(f"d3rlpy's own defaults take no settings, got {overrides}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run(run_dir)  # RuntimeError when another runner trains this one
    settings = {} if own else dataclasses.asdict(algorithm_config(algorithm, overrides))  # batchrl's resolved
    job = {"algorithm": algorithm, "dataset": dataset_id, "seed": seed, "steps": steps, "eval_every": eval_every,
           "settings": settings, "own": own}
    (run_dir / "peer.json").write_text(json.dumps(job, indent=2) + "\n")
    dropped = None if own else write_dataset(dataset_id, run_dir / "dataset.npz")
    log = open(run_dir / "peer.log", "a")
    subprocess.run([str(python()), str(WORKER), str(run_dir)], check=True, stdout=log, stderr=subprocess.STDOUT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    rows = evaluate_policies(run_dir, dataset_id, episodes)
    progress = json.loads((run_dir / "progress.json").read_text())
    final = rows[-1]
    result = {"algorithm": algorithm, "library": PEER, "dataset": dataset_id, "seed": seed, "steps": steps,
              "eval_episodes": episodes, "return_mean": final["return_mean"], "return_std": final["return_std"],
              "normalized_score": final["normalized_score"], "normalized_std": final["normalized_std"],
              "train_seconds": progress["train_seconds"], "updates_per_s": steps / max(progress["train_seconds"], 1e-9),
              "peer_dropped_transitions": dropped,
              "peer_difference": OWN[own] if own else difference(algorithm, settings)}
    (run_dir / "dataset.npz").unlink(missing_ok=True)  # rebuilt on resume; kept out of the run folder
    tmp = run_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, run_dir / "result.json")
    lock.close()
    return result


def check_data(dataset_id: str) -> dict:
    """Every transition d3rlpy samples from the peer's arrays, against batchrl's: the counts that differ."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.npz"
        dropped = write_dataset(dataset_id, path)
        out = subprocess.run([str(python()), str(WORKER), "--check-data", str(path)], check=True,
                             capture_output=True, text=True).stdout
    return {"dataset": dataset_id, "dropped": dropped, **json.loads(out.strip().splitlines()[-1])}


if __name__ == "__main__":  # make the environment: python -m benchmarks.peer [check|check-own DATASET ...]
    if sys.argv[1:2] == ["check"]:  # d3rlpy's transitions against batchrl's, field by field
        for dataset_id in sys.argv[2:]:
            print(json.dumps(check_data(dataset_id)), flush=True)
    elif sys.argv[1:2] == ["check-own"]:  # d3rlpy's own get_minari episodes against Minari's
        for dataset_id in sys.argv[2:]:
            subprocess.run([str(python()), str(WORKER), "--check-own", dataset_id], check=True)
    else:
        print(python())
    sys.exit(0)
