"""Issue 33's ranking rule on a sweep's runs: batchrl against each peer row of the same algorithm and steps.

The compared figure is each run's mean over the second half of its evaluations (`report.second_half`), per seed.
batchrl holds unless its mean over seeds is below the peer's by more than max(5 points, 2 × the standard error
of the difference of the two means), with the standard error sqrt(s_a²/n_a + s_b²/n_b) (5 points alone where a
side has fewer than two seeds). Beside each comparison: the rule's false-failure rate, the chance that the rule
fails two identical algorithms with these seed counts, drawing each seed's figure normal with the std of all the
comparison's per-seed figures (both sides; a real difference makes that std larger and the rate an upper bound).

    python -m benchmarks.rank benchmarks/sweeps/defaults-walker2d.yaml     # writes results/NAME-rank.md and .json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from batchrl.training.report import second_half
from batchrl.training.sweep import load_sweep

POINTS = 5.0


def standard_error(a, b):
    """The standard error of mean(a) - mean(b), seeds on the last axis; None where a side has one seed."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[-1] < 2 or b.shape[-1] < 2:
        return None
    se = np.sqrt(a.var(-1, ddof=1) / a.shape[-1] + b.var(-1, ddof=1) / b.shape[-1])
    return float(se) if se.ndim == 0 else se


def holds(a, b):
    """(difference of the means, margin, whether batchrl holds); seeds on the last axis (arrays for draws)."""
    se = standard_error(a, b)
    margin = POINTS if se is None else np.maximum(POINTS, 2.0 * se)
    difference = np.mean(a, -1) - np.mean(b, -1)
    return difference, margin, difference >= -margin


def false_failure(sigma: float, ours: int, peer: int, draws: int = 200_000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    _, _, ok = holds(rng.normal(0.0, sigma, (draws, ours)), rng.normal(0.0, sigma, (draws, peer)))
    return float(1.0 - np.mean(ok))


def figures(sweep) -> dict[tuple, dict]:
    """Per row of the sweep (dataset, library, algorithm, steps, settings): its label and its finished seeds' figures."""
    out: dict[tuple[str, str, str, int], dict] = {}
    for trial in sweep.trials:
        run = trial.run_dir(sweep.runs)
        if (run / "result.json").exists():
            row = out.setdefault((trial.dataset, trial.library, trial.algorithm, trial.steps, trial.settings),
                                 {"label": trial.label, "seeds": [], "figures": []})
            row["seeds"].append(trial.seed)
            row["figures"].append(second_half(run))
    return out


def rank(sweep, draws: int = 200_000) -> list[dict]:
    rows, out = figures(sweep), []
    for (dataset, library, algorithm, steps, settings), peer in sorted(rows.items()):
        ours = rows.get((dataset, "batchrl", algorithm, steps, ()))
        if library == "batchrl" or ours is None:
            continue
        a, b = ours["figures"], peer["figures"]
        difference, margin, ok = holds(a, b)
        sigma = float(np.std(a + b, ddof=1)) if len(a + b) > 1 else 0.0
        out.append({"dataset": dataset, "algorithm": ours["label"], "peer": peer["label"], "steps": steps,
                    "batchrl_per_seed": a, "peer_per_seed": b, "batchrl": float(np.mean(a)), "peer_mean": float(np.mean(b)),
                    "difference": float(difference), "margin": float(margin), "holds": bool(ok),
                    "false_failure_if_identical": false_failure(sigma, len(a), len(b), draws) if sigma else None})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--draws", type=int, default=200_000)
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    table = rank(sweep, args.draws)
    sweep.output.mkdir(parents=True, exist_ok=True)
    (sweep.output / f"{sweep.name}-rank.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = [f"# `{sweep.name}`: batchrl against each peer row (issue 33's rule)", "", __doc__.split("\n\n")[1], "",
             f"Reproduce: `python -m benchmarks.rank {args.sweep}`.", "",
             "| dataset | algorithm | peer | seeds (batchrl, peer) | batchrl per seed | peer per seed | batchrl − peer "
             "| margin | holds | P(fail) if identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in table:
        p = c["false_failure_if_identical"]
        lines.append(f"| {c['dataset']} | {c['algorithm']} | {c['peer']} | {len(c['batchrl_per_seed'])}, "
                     f"{len(c['peer_per_seed'])} | {', '.join(f'{x:.1f}' for x in c['batchrl_per_seed'])} | "
                     f"{', '.join(f'{x:.1f}' for x in c['peer_per_seed'])} | {c['batchrl']:.1f} − {c['peer_mean']:.1f}"
                     f" = {c['difference']:+.1f} | {c['margin']:.1f} | {'yes' if c['holds'] else '**no**'} | "
                     f"{'–' if p is None else f'{p:.3f}'} |")
    (sweep.output / f"{sweep.name}-rank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
