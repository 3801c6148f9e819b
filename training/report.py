"""A sweep's table and learning curves: per dataset, each algorithm's normalised score over seeds (final and
mean of the last three evaluations), beside the dataset's behaviour score and BC."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from batchrl.training.sweep import Sweep, Trial


def last_evaluations(run_dir: Path, n: int | None = 3) -> float:
    """The mean normalised score of a run's last ``n`` evaluations, or of all of them where ``n`` is None (one
    final evaluation cannot rank)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = sorted((r["step"], _score(r)) for r in rows if r["kind"] == "eval")
    return float(np.mean([score for _, score in (evals if n is None else evals[-n:])]))


def second_half(run_dir: Path) -> float:
    """The mean normalised score of a run's evaluations after its midpoint (step > half the last evaluation's
    step): issue 33's compared figure, less noisy than one final evaluation and past the early policies."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [(r["step"], _score(r)) for r in rows if r["kind"] == "eval"]
    end = max(step for step, _ in evals)
    return float(np.mean([score for step, score in evals if step > end / 2]))


def _score(row: dict) -> float:
    """The normalised score, or the return where the dataset has no reference scores."""
    return row["normalized_score"] if row.get("normalized_score") is not None else row["return_mean"]


def rows_of(sweep: Sweep) -> list[dict]:
    groups: dict[tuple[str, str, int], list[tuple[Trial, dict]]] = {}
    for trial in sweep.trials:
        path = trial.run_dir(sweep.runs) / "result.json"
        if path.exists():
            groups.setdefault((trial.dataset, trial.label, trial.steps), []).append(
                (trial, json.loads(path.read_text())))
    rows = []
    for (dataset, label, steps), runs in groups.items():
        results = [r for _, r in runs]
        scores = np.array([_score(r) for r in results])
        last3 = np.array([last_evaluations(t.run_dir(sweep.runs)) for t, _ in runs])
        trial = runs[0][0]
        rows.append({
            "dataset": dataset, "algorithm": label, "steps": steps, "seeds": [r["seed"] for r in results],
            "library": trial.library, "base": [trial.algorithm, [list(s) for s in trial.settings]],
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

    for dataset in sorted({t.dataset for t in sweep.trials}):
        try:
            data = load_dataset(dataset)
        except (OSError, ValueError):  # a trial that could not load it is reported as failed
            continue
        returns = data.episode_returns
        scores = np.asarray(data.normalized_score(returns) if data.ref_min_score is not None else returns)
        rows.append({"dataset": dataset, "algorithm": "behaviour (dataset episodes)", "steps": 0, "seeds": [],
                     "library": "", "base": ["", []], "eval_episodes_per_seed": len(returns),
                     "normalized_mean": float(scores.mean()), "normalized_std": float(scores.std()), "per_seed": [],
                     "last3_mean": None, "last3_std": None, "last3_per_seed": [], "peer_difference": None,
                     "peer_dropped_transitions": None, "return_mean": float(returns.mean()),
                     "updates_per_s": None, "wall_s_per_run": None})
    for row in rows:  # beside BC: the difference from the same dataset's BC row (last three evaluations)
        bc = [r for r in rows if r["dataset"] == row["dataset"] and r["base"] == ["bc", []] and
              r["library"] == "batchrl"]
        row["last3_minus_bc"] = (row["last3_mean"] - bc[0]["last3_mean"]
                                 if bc and row["last3_mean"] is not None and row is not bc[0] else None)
    return rows


GATE_POINTS = 5.0  # issue 12: batchrl's mean may trail the peer's by at most max(5 points, the pooled std)


def pooled_std(a, b):
    """The pooled standard deviation of two groups of per-seed scores, seeds on the last axis (variances over
    n - 1 weighted by their degrees of freedom): a float for two lists, an array for stacked draws; None where
    neither group has two seeds."""
    groups = [x for x in (np.asarray(a, dtype=float), np.asarray(b, dtype=float)) if x.shape[-1] > 1]
    dof = sum(x.shape[-1] - 1 for x in groups)
    if not dof:
        return None
    pooled = np.sqrt(sum(x.var(-1, ddof=1) * (x.shape[-1] - 1) for x in groups) / dof)
    return float(pooled) if pooled.ndim == 0 else pooled


def peer_comparison(rows: list[dict]) -> list[dict]:
    """Each peer row against batchrl's row of the same algorithm, settings, steps and dataset: the difference of
    the means (final and last three evaluations) and whether it is within max(GATE_POINTS, pooled std)."""
    out = []
    for peer in (r for r in rows if r["library"] not in ("batchrl", "")):
        ours = [r for r in rows if r["library"] == "batchrl" and
                (r["dataset"], r["base"], r["steps"]) == (peer["dataset"], peer["base"], peer["steps"])]
        if not ours:
            continue
        entry = {"dataset": peer["dataset"], "algorithm": ours[0]["algorithm"], "peer": peer["algorithm"],
                 "seeds": [len(ours[0]["seeds"]), len(peer["seeds"])]}
        for key, per_seed in (("final", "per_seed"), ("last3", "last3_per_seed")):
            a, b = ours[0][per_seed], peer[per_seed]
            pooled = pooled_std(a, b)
            margin = max(GATE_POINTS, pooled or 0.0)
            difference = float(np.mean(a) - np.mean(b))
            entry[key] = {"batchrl": float(np.mean(a)), "peer": float(np.mean(b)), "difference": difference,
                          "pooled_std": pooled, "margin": margin, "holds": difference >= -margin}
        out.append(entry)
    return out


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_report(sweep: Sweep) -> Path:
    """Write NAME.json, NAME.md (a table per dataset) and NAME.png (a panel per dataset) into the output folder."""
    rows = rows_of(sweep)
    sweep.output.mkdir(parents=True, exist_ok=True)
    unfinished = [str(t.run_dir(sweep.runs).relative_to(sweep.runs)) for t in sweep.trials
                  if not (t.run_dir(sweep.runs) / "result.json").exists()]
    meta = {"sweep": sweep.name, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "unfinished": unfinished, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads_per_run": 1, "policy": "final (last step) and mean of the last three evaluations", "rows": rows,
            "peer_comparison": peer_comparison(rows)}
    (sweep.output / f"{sweep.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# Sweep `{sweep.name}`", "",
             "Normalised score 100·(R − ref_min)/(ref_max − ref_min) (the return where a dataset has no reference "
             "scores): mean ± std over seeds of each seed's mean over its evaluation episodes, for the final policy "
             "and for the mean of each run's last three evaluations; one CPU thread per run. The behaviour row "
             "scores the dataset's own episodes (mean ± std over episodes); Δ BC is a row's last-three mean minus "
             "batchrl BC's on the same dataset. Rows named `d3rlpy ...` are the peer (benchmarks/peer.py) with "
             "batchrl's settings, evaluated by batchrl's code on the same episode seeds; its differences are "
             "listed under the table.", "",
             f"Reproduce: `batchrl sweep {sweep.source}` (it resumes; `--report-only` rewrites this table).",
             ""]
    lines += [line for note in sweep.notes for line in (note, "")]

    def order(r):
        return r["steps"] > 0, r["base"][0], [list(map(str, s)) for s in r["base"][1]], r["library"] != "batchrl", \
            r["algorithm"]

    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", "",
                  "| algorithm | steps | seeds | episodes/seed | final | per seed | last 3 evals | per seed | Δ BC "
                  "| mean return | updates/s | wall s/run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["dataset"] == dataset), key=order):
            cells = [r["algorithm"], _cell(r["steps"] or None, ","), len(r["seeds"]) or "–",
                     r["eval_episodes_per_seed"], f"{r['normalized_mean']:.1f} ± {r['normalized_std']:.1f}",
                     ", ".join(f"{s:.1f}" for s in r["per_seed"]),
                     "–" if r["last3_mean"] is None else f"{r['last3_mean']:.1f} ± {r['last3_std']:.1f}",
                     ", ".join(f"{s:.1f}" for s in r["last3_per_seed"]), _cell(r["last3_minus_bc"], "+.1f"),
                     f"{r['return_mean']:.1f}", _cell(r["updates_per_s"], ".1f"), _cell(r["wall_s_per_run"], ".0f")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    if meta["peer_comparison"]:
        lines += ["## batchrl against the peer", "",
                  f"batchrl's mean minus the peer's, for the final policy and the last three evaluations; it holds "
                  f"where it is at least −max({GATE_POINTS:g} points, the pooled std over both libraries' seeds).", "",
                  "| dataset | algorithm | seeds (batchrl, peer) | final: batchrl − peer | margin | holds "
                  "| last 3: batchrl − peer | margin | holds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in meta["peer_comparison"]:
            cells = [c["dataset"], c["algorithm"], "{}, {}".format(*c["seeds"])]
            for key in ("final", "last3"):
                cells += [f"{c[key]['batchrl']:.1f} − {c[key]['peer']:.1f} = {c[key]['difference']:+.1f}",
                          f"{c[key]['margin']:.1f}", "yes" if c[key]["holds"] else "**no**"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    peers = {r["algorithm"]: r for r in rows if r["library"] not in ("batchrl", "")}
    if peers:
        lines += ["Peer differences (beyond the settings, which are batchrl's):"]
        lines += [f"- `{name}`: {r['peer_difference']}" + (
                  "" if r["peer_dropped_transitions"] is None else "; d3rlpy drops the last transition of each "
                  f"episode that did not terminate ({r['peer_dropped_transitions']} transitions here)")
                  for name, r in sorted(peers.items())]
        lines.append("")
    if unfinished:
        lines += [f"**Partial:** {len(sweep.trials) - len(unfinished)} of {len(sweep.trials)} runs finished; not yet: "
                  + ", ".join(f"`{m}`" for m in unfinished) + ". Rerun the sweep to finish them (it resumes).", ""]
    if plot_curves(sweep):
        lines += [f"Learning curves (mean over seeds, shaded: min to max): `{sweep.name}.png`.", ""]
    path = sweep.output / f"{sweep.name}.md"
    path.write_text("\n".join(lines))
    return path


def plot_curves(sweep: Sweep) -> bool:
    """One panel per dataset: each algorithm's evaluation score over training, averaged over seeds."""
    curves: dict[str, dict[str, list[dict[int, float]]]] = {}
    for trial in sweep.trials:
        path = trial.run_dir(sweep.runs) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        points = {r["step"]: _score(r) for r in rows if r["kind"] == "eval"}
        if points:
            curves.setdefault(trial.dataset, {}).setdefault(trial.label, []).append(points)
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
        ax.set_ylabel("normalised score (or return)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(sweep.output / f"{sweep.name}.png", dpi=80)
    plt.close(fig)
    return True
