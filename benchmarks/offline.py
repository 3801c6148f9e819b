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
import json
import multiprocessing as mp
import os
import platform
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

    @property
    def label(self) -> str:
        return self.algorithm + "".join(f" {k}={v}" for k, v in self.settings)

    @property
    def run_dir(self) -> Path:
        variant = "".join(f"-{k}{v}" for k, v in self.settings)
        return RUNS / self.dataset.replace("/", "_") / f"{self.algorithm}{variant}-{self.steps // 1000}k-s{self.seed}"


def grid(algorithms: dict[str, int], datasets: list[str], seeds: list[int],
         settings: tuple[tuple[str, str], ...] = (), eval_every: int = 10_000) -> list[Job]:
    # Seed-major order: with a limited budget every (algorithm, dataset) gets its first seed early.
    return [Job(a, d, s, steps, settings, eval_every) for s in seeds for a, steps in algorithms.items()
            for d in datasets]


REPLAY = ["bench/hopper/medium-replay-v0", "bench/halfcheetah/medium-replay-v0"]


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
}


def run_job(job: Job) -> str:
    import torch

    torch.set_num_threads(1)
    from training.trainer import CHECKPOINT, RESULT, TrainConfig, Trainer

    if (job.run_dir / RESULT).exists():
        return f"skip {job.run_dir.relative_to(ROOT)} (finished)"
    try:
        if (job.run_dir / CHECKPOINT).exists():
            trainer = Trainer(job.run_dir, progress=False)
        else:
            config = TrainConfig(algorithm=job.algorithm, dataset=job.dataset, seed=job.seed, steps=job.steps,
                                 eval_every=job.eval_every, eval_episodes=10,
                                 checkpoint_every=min(5_000, job.eval_every), device="cpu", algo=dict(job.settings))
            trainer = Trainer(job.run_dir, config, progress=False)
    except RuntimeError as exc:  # the run is being trained by another process
        return f"skip {job.run_dir.relative_to(ROOT)} ({exc})"
    result = trainer.run()
    return (f"done {job.run_dir.relative_to(ROOT)}: normalised {result['normalized_score']:.1f}, "
            f"{result['updates_per_s']:.1f} updates/s")


def write_table(suite: str, jobs: list[Job]) -> Path:
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for job in jobs:
        path = job.run_dir / "result.json"
        if path.exists():
            groups.setdefault((job.dataset, job.label, job.steps), []).append(json.loads(path.read_text()))
    rows = []
    for (dataset, algorithm, steps), results in groups.items():
        scores = np.array([r["normalized_score"] for r in results])
        rows.append({
            "dataset": dataset, "algorithm": algorithm, "steps": steps, "seeds": [r["seed"] for r in results],
            "eval_episodes_per_seed": results[0]["eval_episodes"],
            "normalized_mean": float(scores.mean()), "normalized_std": float(scores.std()),
            "per_seed": [float(s) for s in scores],
            "return_mean": float(np.mean([r["return_mean"] for r in results])),
            "updates_per_s": float(np.mean([r["updates_per_s"] for r in results])),
            "wall_s_per_run": float(np.mean([r["train_seconds"] for r in results])),
        })
    from training.data import load_dataset

    for dataset in sorted({job.dataset for job in jobs}):
        data = load_dataset(dataset)
        returns = data.episode_returns
        scores = np.asarray(data.normalized_score(returns))
        rows.append({"dataset": dataset, "algorithm": "behaviour (dataset episodes)", "steps": 0,
                     "seeds": [], "eval_episodes_per_seed": len(returns), "normalized_mean": float(scores.mean()),
                     "normalized_std": float(scores.std()), "per_seed": [], "return_mean": float(returns.mean()),
                     "updates_per_s": None, "wall_s_per_run": None})
    RESULTS.mkdir(parents=True, exist_ok=True)
    unfinished = [str(job.run_dir.relative_to(RUNS)) for job in jobs if not (job.run_dir / "result.json").exists()]
    meta = {"suite": suite, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unfinished": unfinished,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads_per_run": 1, "policy": "final (last step)", "rows": rows}
    (RESULTS / f"{suite}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# Benchmark `{suite}`", "",
             "Normalised score 100·(R − ref_min)/(ref_max − ref_min): mean ± std over seeds of each seed's "
             "mean over its evaluation episodes; final policy; one CPU thread per run. The behaviour row "
             "scores the dataset's own episodes (mean ± std over episodes).", "",
             f"Reproduce: `MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.offline --suite {suite}`", "",
             "| dataset | algorithm | steps | seeds | episodes/seed | normalised score | per seed | mean return "
             "| updates/s | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["steps"] > 0, r["algorithm"])):
        speed = "–" if r["updates_per_s"] is None else f"{r['updates_per_s']:.1f}"
        wall = "–" if r["wall_s_per_run"] is None else f"{r['wall_s_per_run']:.0f}"
        steps = f"{r['steps']:,}" if r["steps"] else "–"
        lines.append(f"| {r['dataset']} | {r['algorithm']} | {steps} | {len(r['seeds']) or '–'} | "
                     f"{r['eval_episodes_per_seed']} | {r['normalized_mean']:.1f} ± {r['normalized_std']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['per_seed'])} | {r['return_mean']:.1f} | {speed} | {wall} |")
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
        ax.set_ylabel("normalised score (10 episodes)")
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
