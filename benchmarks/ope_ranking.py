"""Does FQE rank policies right? `batchrl ope`'s estimate beside each policy's true discounted return.

    MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.ope_ranking [--quick] [--shard K/N]

Policies of spread-out quality on bench/hopper/medium-replay-v0: the shipped feed-forward models (models/),
BC, IQL and TD3+BC trained here for a few step counts (early and late policies, exported like any model), and
a uniformly random policy. For each: the true discounted return (γ = 0.99) over 50 episodes of the dataset's
evaluation environment (episode i reset with seed i), and FQE's estimate with its bootstrap interval (the
defaults of `batchrl ope`: 20,000 steps per fit, B = 10). Resumable: each policy's figures are kept in
benchmarks/runs/ope-ranking/<policy>.json and a finished policy is skipped. Writes
benchmarks/results/ope_ranking.{md,json,png}: the table, the Spearman rank correlation between estimate and
truth (target ≥ 0.8), and the estimate against the truth with the intervals. FQE takes about 20 minutes of one
core per policy: `--shard K/N` runs every N-th policy from the K-th (one process per core, K = 0..N-1); the
process that finds every policy's figures written writes the results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import RESULTS

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "ope-ranking"
DATASET = "bench/hopper/medium-replay-v0"
SHIPPED = ["hopper-iql/1", "hopper-iql/2", "hopper-td3bc/1", "hopper-cql/1", "hopper-bcq/1"]
TRAINED = [("bc", 2_000), ("bc", 50_000), ("iql", 5_000), ("iql", 50_000), ("td3bc", 2_000), ("td3bc", 30_000)]
GAMMA = 0.99


def onnx_policy(path: Path):
    from batchrl.serving.runtime import load_model

    model = load_model(path.parent.parent.name, int(path.parent.name), path, ["CPUExecutionProvider"])
    return lambda obs: model.run({"observations": obs})


def label(algorithm: str, steps: int) -> str:
    return f"{algorithm}-{steps // 1000}k" if steps % 1000 == 0 else f"{algorithm}-{steps}"


def trained_model(algorithm: str, steps: int, runs: Path) -> Path:
    """Train (or resume) the run and export it once into runs/models."""
    from batchrl.training.export import export_run
    from batchrl.training.trainer import TrainConfig, Trainer

    name = label(algorithm, steps)
    model = runs / "models" / name / "1" / "model.onnx"
    if model.exists():
        return model
    run_dir = runs / "train" / name
    if not (run_dir / "result.json").exists():
        trainer = (Trainer(run_dir, progress=False) if (run_dir / "checkpoint.pt").exists() else
                   Trainer(run_dir, TrainConfig(algorithm=algorithm, dataset=DATASET, steps=steps, seed=0,
                                                eval_every=steps, eval_episodes=1, checkpoint_every=5_000,
                                                device="cpu"), progress=False))
        trainer.run()
    export_run(run_dir, name, runs / "models")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 policies, 2 episodes, 500 FQE steps, B = 2 (figures meaningless)")
    parser.add_argument("--shard", default="0/1", metavar="K/N", help="run every N-th policy, from the K-th")
    args = parser.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        parser.error(f"--shard {args.shard}: expected K/N with 0 <= K < N")
    import torch

    torch.set_num_threads(1)
    from batchrl.training.data import load_dataset
    from batchrl.training.evaluation import make_eval_env, run_episodes, stateless
    from batchrl.training.ope import FQEConfig, estimate

    runs = RUNS / "quick" if args.quick else RUNS
    episodes = 2 if args.quick else 50
    config = FQEConfig(gamma=GAMMA, steps=500, bootstrap=2) if args.quick else FQEConfig(gamma=GAMMA)
    data = load_dataset(DATASET)
    env = make_eval_env(DATASET)
    rng = np.random.default_rng(0)
    low, high = data.action_low, data.action_high
    policies = {"random": lambda obs: rng.uniform(low, high, size=(len(obs), len(low))).astype(np.float32)}
    for name in SHIPPED[:1] if args.quick else SHIPPED:
        policies[name.replace("/", "-v")] = onnx_policy(ROOT.parent / "models" / name / "model.onnx")
    for algorithm, steps in ([("bc", 500)] if args.quick else TRAINED):
        policies[label(algorithm, steps)] = onnx_policy(trained_model(algorithm, steps, runs))
    runs.mkdir(parents=True, exist_ok=True)
    for index, (name, policy) in enumerate(policies.items()):
        path = runs / f"{name}.json"
        if path.exists() or index % shards != shard:
            continue
        start = time.perf_counter()
        truth, _ = run_episodes(env, stateless(lambda obs: policy(obs[None])[0]), episodes, 0, gamma=GAMMA)
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        result = estimate(data, policy, config, progress=False)
        row = {"policy": name, "true_mean": float(np.mean(truth)), "true_sem": float(np.std(truth) / np.sqrt(len(truth))),
               "episodes": episodes, "estimate": result.value, "low": result.low, "high": result.high,
               "replicates": result.replicates, "method": result.method, "gamma": GAMMA,
               "steps_per_fit": config.steps, "rollout_s": rollout_s, "fqe_s": time.perf_counter() - start}
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(f"{name}: true {row['true_mean']:.1f}, FQE {row['estimate']:.1f} [{row['low']:.1f}, {row['high']:.1f}]",
              flush=True)
    missing = [name for name in policies if not (runs / f"{name}.json").exists()]
    if missing:
        print(f"results not written: other shards still owe {', '.join(missing)}")
        return 0
    report([json.loads((runs / f"{name}.json").read_text()) for name in policies],
           "ope_ranking_quick" if args.quick else "ope_ranking", config)
    return 0


def spearman(a, b) -> float:
    ranks = lambda x: np.argsort(np.argsort(x)).astype(float)  # noqa: E731 (no ties in continuous figures)
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def report(rows: list[dict], stem: str, config) -> None:
    rho = spearman([r["true_mean"] for r in rows], [r["estimate"] for r in rows])
    covered = sum(r["low"] <= r["true_mean"] <= r["high"] for r in rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"spearman": rho, "covered": covered, "dataset": DATASET,
                                                      "rows": rows}, indent=2) + "\n")
    lines = ["# FQE against the truth", "",
             f"Dataset {DATASET}; γ = {GAMMA}; truth: mean discounted return over {rows[0]['episodes']} episodes "
             f"(± standard error); FQE: `batchrl ope` defaults ({config.steps} steps per fit, {rows[0]['method']}).",
             "", f"**Spearman rank correlation (estimate vs truth): {rho:.2f}** over {len(rows)} policies "
             f"(target ≥ 0.8). The bootstrap interval holds the true value for {covered} of {len(rows)} policies: "
             "it measures the estimate's spread over resampled data, not FQE's bias.", "",
             "Reproduce: `MINARI_DATASETS_PATH=../shared/datasets python -m benchmarks.ope_ranking`", "",
             "| policy | true discounted return | FQE estimate | interval | rollout s | FQE s |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["true_mean"]):
        lines.append(f"| {r['policy']} | {r['true_mean']:.1f} ± {r['true_sem']:.1f} | {r['estimate']:.1f} | "
                     f"[{r['low']:.1f}, {r['high']:.1f}] | {r['rollout_s']:.0f} | {r['fqe_s']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in rows:  # the point is the fit on all the data; the bar, the bootstrap interval (which may miss it)
        ax.vlines(r["true_mean"], r["low"], r["high"], alpha=0.6)
        ax.errorbar(r["true_mean"], r["estimate"], xerr=r["true_sem"], fmt="o", capsize=3)
        ax.annotate(r["policy"], (r["true_mean"], r["estimate"]), fontsize=7)
    lims = [min(min(r["true_mean"], r["low"]) for r in rows), max(max(r["true_mean"], r["high"]) for r in rows)]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel(f"true discounted return (γ = {GAMMA})")
    ax.set_ylabel("FQE estimate (interval)")
    ax.set_title(f"{DATASET}: Spearman {rho:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
