"""How often issue 12's test fails two libraries that run the same algorithm.

The test: batchrl's mean over its seeds is at least the peer's mean minus max(5 points, the pooled std), with
each comparison's own seed counts (the protocol: 3 batchrl seeds, at least 2 for the peer). Where both
libraries run the same algorithm, each seed's score is a draw from one distribution; this estimates, per
comparison of the peer table, the chance that such draws fail the test, taking the seeds' scores as normal
with the std of all that comparison's per-seed scores (both libraries together; a real difference between
the libraries makes that std larger, and the estimate an upper bound).

    python -m benchmarks.peer_gate_noise            # reads results/peer.json, writes results/peer-gate-noise.md

The file's second table reads the suite's runs (sweeps/peer.yaml) for a lower-noise view of the same comparisons:
each run's mean over all its evaluations rather than the final one or the last three. It is not the test.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from batchrl.training.report import GATE_POINTS, last_evaluations, pooled_std
from batchrl.training.sweep import Sweep, load_sweep

HERE = Path(__file__).resolve().parent


def false_failure(sigma: float, ours: int, peer: int, draws: int, rng: np.random.Generator) -> float:
    """P(mean(ours) - mean(peer) < -max(GATE_POINTS, pooled std)) for i.i.d. N(0, sigma) per-seed scores."""
    a, b = rng.normal(0.0, sigma, (draws, ours)), rng.normal(0.0, sigma, (draws, peer))
    pooled = pooled_std(a, b)
    margin = GATE_POINTS if pooled is None else np.maximum(GATE_POINTS, pooled)
    return float(np.mean(a.mean(1) - b.mean(1) < -margin))


def every_evaluation(sweep: Sweep, dataset: str, label: str, steps: int) -> list[float]:
    """Per finished seed of one row of the sweep: the run's mean score over all its evaluations."""
    runs = [t.run_dir(sweep.runs) for t in sweep.trials if (t.dataset, t.label, t.steps) == (dataset, label, steps)]
    return [last_evaluations(run, None) for run in runs if (run / "result.json").exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=HERE / "results" / "peer.json")
    parser.add_argument("--sweep", type=Path, default=HERE / "sweeps" / "peer.yaml")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peer-gate-noise.md")
    parser.add_argument("--draws", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meta = json.loads(args.table.read_text())
    rows = {(r["dataset"], r["library"], r["algorithm"]): r for r in meta["rows"]}
    rng = np.random.default_rng(args.seed)
    lines = ["# Issue 12's test on identical algorithms", "",
             f"From `{args.table.name}` (written {meta['written']}). Per comparison: the std of all its per-seed "
             "scores (both libraries), and the chance that as many batchrl and peer seeds of one algorithm, drawn "
             f"normal with that std, fail the test (mean difference below −max({GATE_POINTS:g}, pooled std)); "
             f"{args.draws:,} draws each.", "",
             f"Reproduce: `python -m benchmarks.peer_gate_noise` (seed {args.seed}).", "",
             "| dataset | algorithm | seeds (batchrl, peer) | figure | batchrl − peer | std of all seeds "
             "| P(fail) if identical | fails |",
             "|---|---|---|---|---|---|---|---|"]
    p_pass = {"final": 1.0, "last3": 1.0}
    for c in meta["peer_comparison"]:
        ours = rows[(c["dataset"], "batchrl", c["algorithm"])]
        peer = rows[(c["dataset"], "d3rlpy", c["peer"])]
        for key, per_seed in (("final", "per_seed"), ("last3", "last3_per_seed")):
            scores = np.array(ours[per_seed] + peer[per_seed])
            sigma = float(scores.std(ddof=1))
            p = false_failure(sigma, *c["seeds"], args.draws, rng)
            p_pass[key] *= 1.0 - p
            lines.append(f"| {c['dataset']} | {c['algorithm']} | {c['seeds'][0]}, {c['seeds'][1]} | {key} "
                         f"| {c[key]['difference']:+.1f} | {sigma:.1f} | {p:.3f} "
                         f"| {'**yes**' if not c[key]['holds'] else 'no'} |")
    lines += ["", "If every comparison's algorithms were identical (independent comparisons): P(every final "
              f"comparison holds) = {p_pass['final']:.2f}, P(every last-3 comparison holds) = {p_pass['last3']:.2f}, "
              f"P(all {2 * len(meta['peer_comparison'])} hold) = {p_pass['final'] * p_pass['last3']:.2f}.", "",
              "## The same runs over all their evaluations", "",
              "Each run's mean score over every evaluation it made (every 10k steps, 20 episodes each), from the "
              f"run folders of `{args.sweep.name}`: ten times the episodes of a final score for a 100k-step run "
              "(CQL's 25k-step runs evaluate three times), at the cost of counting the early policies too. Not "
              "issue 12's test; a reading with less noise of whether the two libraries differ.", "",
              "| dataset | algorithm | batchrl per seed | peer per seed | batchrl − peer | pooled std |",
              "|---|---|---|---|---|---|"]
    sweep = load_sweep(args.sweep)
    for c in meta["peer_comparison"]:
        ours = rows[(c["dataset"], "batchrl", c["algorithm"])]
        a, b = (every_evaluation(sweep, c["dataset"], r["algorithm"], r["steps"])
                for r in (ours, rows[(c["dataset"], "d3rlpy", c["peer"])]))
        pooled = pooled_std(a, b)
        lines.append(f"| {c['dataset']} | {c['algorithm']} | {', '.join(f'{x:.1f}' for x in a)} | "
                     f"{', '.join(f'{x:.1f}' for x in b)} | {np.mean(a) - np.mean(b):+.1f} | "
                     f"{'–' if pooled is None else f'{pooled:.1f}'} |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
