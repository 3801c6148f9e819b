"""Resumable offline-RL benchmark: a grid of (algorithm, dataset, seed) runs and one table.

    MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.offline --suite slice --jobs 2

Each run trains in its own folder under benchmarks/runs/ (one process per job,
one torch thread each). A run whose result.json exists is skipped; one with a
checkpoint resumes from it. When every run is finished, the table is written to
benchmarks/results/<suite>.md and <suite>.json. ``--table-only`` rewrites the
table from whatever runs have finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
RESULTS = ROOT / "results"


@dataclass(frozen=True)
class Job:
    algorithm: str
    dataset: str
    seed: int
    steps: int
    settings: tuple[tuple[str, str], ...] = ()  # algorithm settings that differ from its defaults
    eval_every: int = 10_000
    eval_episodes: int = 10
    library: str = "batchrl"  # or "d3rlpy": the peer trial kind (benchmarks/peer.py)
    folder: str = ""  # a subfolder of runs/ for a suite whose runs must not mix with earlier ones

    @property
    def label(self) -> str:
        prefix = "" if self.library == "batchrl" else f"{self.library} "
        return prefix + self.algorithm + "".join(f" {k}={v}" for k, v in self.settings)

    @property
    def run_dir(self) -> Path:
        prefix = "" if self.library == "batchrl" else f"{self.library}-"
        variant = "".join(f"-{k}{v}" for k, v in self.settings)
        episodes = "" if self.eval_episodes == 10 else f"-e{self.eval_episodes}"
        return (RUNS / self.folder / self.dataset.replace("/", "_") /
                f"{prefix}{self.algorithm}{variant}-{self.steps // 1000}k{episodes}-s{self.seed}")


def grid(algorithms: dict[str, int], datasets: list[str], seeds: list[int],
         settings: tuple[tuple[str, str], ...] = (), eval_every: int = 10_000, eval_episodes: int = 10,
         library: str = "batchrl") -> list[Job]:
    # Seed-major order: with a limited budget every (algorithm, dataset) gets its first seed early.
    return [Job(a, d, s, steps, settings, eval_every, eval_episodes, library) for s in seeds
            for a, steps in algorithms.items() for d in datasets]


def variants(algorithm: str, steps: int, datasets: list[str], seeds: list[int], *settings: dict[str, str],
             library: str = "batchrl") -> list[Job]:
    """One job per (settings, dataset, seed), seed-major, under the peer protocol (20 episodes)."""
    return [Job(algorithm, d, s, steps, tuple(sorted(v.items())), 10_000, 20, library)
            for s in seeds for v in settings for d in datasets]


REPLAY = ["bench/hopper/medium-replay-v0", "bench/halfcheetah/medium-replay-v0"]
HOPPER_MEDIUM = ["bench/hopper/medium-v0"]
HOPPER = ["bench/hopper/medium-v0", "bench/hopper/medium-replay-v0"]
HALFCHEETAH = ["bench/halfcheetah/medium-v0", "bench/halfcheetah/medium-replay-v0"]
PEER_ALGORITHMS = {"bc": 100_000, "td3bc": 100_000, "iql": 100_000}


def peer_suite() -> list[Job]:
    """Issue 12's table: batchrl (3 seeds) beside d3rlpy (2 seeds) on both hopper sets, CQL at 25k steps on
    hopper/medium-replay, then the halfcheetah confirmations (1 seed each, no peer). Seed-major, batchrl
    and the peer interleaved, so a partial run already compares like with like."""
    jobs = []
    for seed in (0, 1, 2):
        for library in ("batchrl", "d3rlpy")[:2 if seed < 2 else 1]:
            jobs += grid(PEER_ALGORITHMS, HOPPER, [seed], eval_episodes=20, library=library)
            jobs += grid({"cql": 25_000}, ["bench/hopper/medium-replay-v0"], [seed], eval_episodes=20,
                         library=library)
    jobs += grid(PEER_ALGORITHMS, HALFCHEETAH, [0], eval_episodes=20)
    jobs += grid({"cql": 25_000}, ["bench/halfcheetah/medium-replay-v0"], [0], eval_episodes=20)
    # Its own folder: the ablation's runs of the same names were made by an earlier commit (and BC's
    # default policy changed since).
    return [dataclasses.replace(job, folder="peer") for job in jobs]


SUITES: dict[str, list[Job]] = {
    # Issue 2: the end-to-end slice, IQL with the paper's locomotion defaults.
    "slice": grid({"iql": 100_000, "bc": 100_000}, ["bench/hopper/medium-v0", "bench/halfcheetah/medium-v0"],
                  [0, 1]),
    # What was tried when default IQL stayed below BC on the medium sets: a flatter
    # advantage weighting (lower inverse temperature beta).
    "slice-beta": grid({"iql": 100_000}, ["bench/hopper/medium-v0", "bench/halfcheetah/medium-v0"], [0, 1],
                       (("beta", "1.0"),)),
    # Issue 3: the value-based algorithms on the replay sets, where offline RL must beat cloning.
    # CQL and BCQ run 25k steps (about 8-20 updates/s on one core), the rest 100k.
    "value-based": grid({"bc": 100_000, "cql": 25_000, "bcq": 25_000, "td3bc": 100_000, "iql": 100_000}, REPLAY,
                        [0, 1]),
    # Issue 4: the Decision Transformer (about 3 updates/s on one core: 10k steps, one seed,
    # evaluated every 2k steps for its learning curve) beside BC's runs of the value-based suite.
    "dt": grid({"dt": 10_000}, REPLAY, [0], eval_every=2_000) + grid({"bc": 100_000}, REPLAY, [0, 1]),
    # Issue 12: where batchrl's BC and IQL trail d3rlpy's on hopper/medium, what makes the difference.
    # Seed 0 of every variant first, then seed 1 (20 episodes per evaluation, every 10k steps).
    "peer-ablation": [job for seed in (0, 1) for job in (
        variants("bc", 100_000, HOPPER_MEDIUM, [seed], {}, {"policy": "deterministic"})
        + variants("bc", 100_000, HOPPER_MEDIUM, [seed], {"policy": "deterministic"}, library="d3rlpy")
        + variants("iql", 100_000, HOPPER_MEDIUM, [seed], {}, {"actor": "deterministic"}, {"actor_lr_horizon": "0"},
                   {"normalize_rewards": "false"})
        + variants("iql", 100_000, HOPPER_MEDIUM, [seed], {}, library="d3rlpy")
        + variants("bc", 100_000, HOPPER_MEDIUM, [seed], {"policy": "deterministic", "lr": "0.001"})
        + variants("iql", 100_000, HOPPER_MEDIUM, [seed], {"actor_lr_horizon": "1000000"}))],
    # Issue 12's acceptance table (run it from a worktree pinned at one commit).
    "peer": peer_suite(),
    # Issue 16: the value-based suite's hopper/medium-replay TD3+BC row rerun on 3 seeds after the batched
    # critics and fused optimiser steps (its mean must stay within max(5, 2 pooled std) of the committed one).
    "rerun-16": [dataclasses.replace(job, folder="rerun-16")
                 for job in grid({"td3bc": 100_000}, ["bench/hopper/medium-replay-v0"], [0, 1, 2])],
}


def run_job(job: Job) -> str:
    import torch

    torch.set_num_threads(1)
    from batchrl.training.trainer import CHECKPOINT, RESULT, TrainConfig, Trainer, lock_run

    if (job.run_dir / RESULT).exists():
        return f"skip {job.run_dir.relative_to(ROOT)} (finished)"
    if job.library != "batchrl":
        from benchmarks import peer

        try:
            result = peer.run(job.run_dir, job.algorithm, job.dataset, job.seed, job.steps, job.eval_every,
                              job.eval_episodes, dict(job.settings))
        except RuntimeError as exc:  # the run is being trained by another process
            return f"skip {job.run_dir.relative_to(ROOT)} ({exc})"
        return (f"done {job.run_dir.relative_to(ROOT)}: normalised {result['normalized_score']:.1f}, "
                f"{result['updates_per_s']:.1f} updates/s")
    try:
        if (job.run_dir / CHECKPOINT).exists():
            trainer = Trainer(job.run_dir, progress=False)
        else:
            if job.run_dir.exists():  # started, but stopped before its first checkpoint: start again
                with lock_run(job.run_dir):  # unless another process is training it
                    shutil.rmtree(job.run_dir)
            config = TrainConfig(algorithm=job.algorithm, dataset=job.dataset, seed=job.seed, steps=job.steps,
                                 eval_every=job.eval_every, eval_episodes=job.eval_episodes,
                                 checkpoint_every=min(5_000, job.eval_every), device="cpu", algo=dict(job.settings))
            trainer = Trainer(job.run_dir, config, progress=False)
    except RuntimeError as exc:  # the run is being trained by another process
        return f"skip {job.run_dir.relative_to(ROOT)} ({exc})"
    result = trainer.run()
    return (f"done {job.run_dir.relative_to(ROOT)}: normalised {result['normalized_score']:.1f}, "
            f"{result['updates_per_s']:.1f} updates/s")


def last_evaluations(run_dir: Path, n: int = 3) -> float:
    """The mean normalised score of a run's last ``n`` evaluations (one final evaluation cannot rank)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = sorted((r["step"], r["normalized_score"]) for r in rows if r["kind"] == "eval")
    return float(np.mean([score for _, score in evals[-n:]]))


def write_table(suite: str, jobs: list[Job]) -> Path:
    groups: dict[tuple[str, str, int], list[tuple[Job, dict]]] = {}
    for job in jobs:
        path = job.run_dir / "result.json"
        if path.exists():
            groups.setdefault((job.dataset, job.label, job.steps), []).append((job, json.loads(path.read_text())))
    rows = []
    for (dataset, algorithm, steps), runs in groups.items():
        results = [r for _, r in runs]
        scores = np.array([r["normalized_score"] for r in results])
        last3 = np.array([last_evaluations(job.run_dir) for job, _ in runs])
        job = runs[0][0]
        rows.append({
            "dataset": dataset, "algorithm": algorithm, "steps": steps, "seeds": [r["seed"] for r in results],
            "library": job.library, "base": (job.algorithm, tuple(job.settings)),
            "eval_episodes_per_seed": results[0]["eval_episodes"],
            "normalized_mean": float(scores.mean()), "normalized_std": float(scores.std()),
            "per_seed": [float(s) for s in scores],
            "last3_mean": float(last3.mean()), "last3_std": float(last3.std()),
            "last3_per_seed": [float(s) for s in last3],
            "peer_difference": results[0].get("peer_difference"),
            "peer_dropped_transitions": results[0].get("peer_dropped_transitions"),
            "return_mean": float(np.mean([r["return_mean"] for r in results])),
            "updates_per_s": float(np.mean([r["updates_per_s"] for r in results])),
            "wall_s_per_run": float(np.mean([r["train_seconds"] for r in results])),
        })
    from batchrl.training.data import load_dataset

    for dataset in sorted({job.dataset for job in jobs}):
        data = load_dataset(dataset)
        returns = data.episode_returns
        scores = np.asarray(data.normalized_score(returns))
        rows.append({"dataset": dataset, "algorithm": "behaviour (dataset episodes)", "steps": 0,
                     "seeds": [], "library": "", "base": ("", ()), "eval_episodes_per_seed": len(returns),
                     "normalized_mean": float(scores.mean()), "normalized_std": float(scores.std()), "per_seed": [],
                     "last3_mean": None, "last3_std": None, "last3_per_seed": [], "peer_difference": None,
                     "peer_dropped_transitions": None, "return_mean": float(returns.mean()),
                     "updates_per_s": None, "wall_s_per_run": None})
    RESULTS.mkdir(parents=True, exist_ok=True)
    unfinished = [str(job.run_dir.relative_to(RUNS)) for job in jobs if not (job.run_dir / "result.json").exists()]
    meta = {"suite": suite, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unfinished": unfinished,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads_per_run": 1, "policy": "final (last step) and mean of the last three evaluations",
            "rows": rows}
    (RESULTS / f"{suite}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# Benchmark `{suite}`", "",
             "Normalised score 100·(R − ref_min)/(ref_max − ref_min): mean ± std over seeds of each seed's "
             "mean over its evaluation episodes, for the final policy and for the mean of each run's last "
             "three evaluations (10k steps apart); one CPU thread per run. The behaviour row scores the "
             "dataset's own episodes (mean ± std over episodes). Rows named `d3rlpy ...` are the peer "
             "(d3rlpy 2.8.1, benchmarks/peer.py) with batchrl's settings, evaluated by batchrl's code on the "
             "same episode seeds; its differences are listed under the table.", "",
             f"Reproduce: `MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.offline --suite {suite}`", "",
             "| dataset | algorithm | steps | seeds | episodes/seed | final | per seed | last 3 evals | per seed "
             "| mean return | updates/s | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["steps"] > 0, r["base"], r["library"] != "batchrl",
                                         r["algorithm"])):
        speed = "–" if r["updates_per_s"] is None else f"{r['updates_per_s']:.1f}"
        wall = "–" if r["wall_s_per_run"] is None else f"{r['wall_s_per_run']:.0f}"
        steps = f"{r['steps']:,}" if r["steps"] else "–"
        last3 = "–" if r["last3_mean"] is None else f"{r['last3_mean']:.1f} ± {r['last3_std']:.1f}"
        lines.append(f"| {r['dataset']} | {r['algorithm']} | {steps} | {len(r['seeds']) or '–'} | "
                     f"{r['eval_episodes_per_seed']} | {r['normalized_mean']:.1f} ± {r['normalized_std']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['per_seed'])} | {last3} | "
                     f"{', '.join(f'{s:.1f}' for s in r['last3_per_seed'])} | {r['return_mean']:.1f} | {speed} | "
                     f"{wall} |")
    peers = {r["algorithm"]: r for r in rows if r["library"] not in ("batchrl", "")}
    if peers:
        lines += ["", "Peer differences (beyond the settings, which are batchrl's):"]
        lines += [f"- `{name}`: {r['peer_difference']}; d3rlpy drops the last transition of each episode that did "
                  f"not terminate ({r['peer_dropped_transitions']} transitions here)" for name, r in sorted(peers.items())]
    if unfinished:
        lines += ["", f"**Partial:** {len(jobs) - len(unfinished)} of {len(jobs)} runs finished; not yet: "
                  + ", ".join(f"`{m}`" for m in unfinished) + ". Rerun the command to finish them (it resumes)."]
    path = RESULTS / f"{suite}.md"
    if plot_curves(suite, jobs):
        lines += ["", f"Learning curves (mean over seeds, shaded: min to max): `{suite}.png`."]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_curves(suite: str, jobs: list[Job]) -> bool:
    """One panel per dataset: each algorithm's evaluation score over training, averaged over seeds."""
    curves: dict[str, dict[str, list[dict[int, float]]]] = {}
    for job in jobs:
        path = job.run_dir / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        points = {r["step"]: r["normalized_score"] for r in rows if r["kind"] == "eval"}
        if points:
            curves.setdefault(job.dataset, {}).setdefault(job.label, []).append(points)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (dataset, by_label) in zip(axes[0], sorted(curves.items())):
        for label, runs in sorted(by_label.items()):
            steps = sorted(set.intersection(*(set(r) for r in runs)))
            values = np.array([[r[s] for s in steps] for r in runs])
            ax.plot(steps, values.mean(0), marker="o", label=f"{label} ({len(runs)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
        ax.set_title(dataset)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("normalised score")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{suite}.png", dpi=80)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a resumable offline-RL benchmark suite.")
    parser.add_argument("--suite", choices=sorted(SUITES), default="slice")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="runs in parallel, one CPU thread each (default: the number of cores)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from finished runs")
    args = parser.parse_args(argv)
    if not os.environ.get("MINARI_DATASETS_PATH"):
        print("set MINARI_DATASETS_PATH to the Minari root (e.g. ../shared/datasets)", file=sys.stderr)
        return 2
    jobs = SUITES[args.suite]
    if not args.table_only:
        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for i, message in enumerate(pool.imap_unordered(run_job, jobs), 1):
                print(f"[{i}/{len(jobs)}] {message}", flush=True)
    print(f"table: {write_table(args.suite, jobs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
