"""Issue 33's ranking rule (benchmarks.rank) on run folders whose second-half figures are known."""
import json

import pytest

from batchrl.training.sweep import load_sweep
from benchmarks.rank import false_failure, rank

SWEEP = """
runs: runs
output: results
grids:
  - algorithms: {iql: 100}
    datasets: [d]
    seeds: [0, 1, 2]
  - algorithms: {iql: 100}
    datasets: [d]
    seeds: [0, 1]
    library: far
    trainer: benchmarks.peer:run
  - algorithms: {iql: 100}
    datasets: [d]
    seeds: [0, 1]
    library: near
    trainer: benchmarks.peer:run
  - algorithms: {iql: 100}
    datasets: [d]
    seeds: [0]
    library: alone
    trainer: benchmarks.peer:run
"""
# per library, per seed: the figure; each run evaluates at steps 20..100 and only 60, 80, 100 count
FIGURES = {"batchrl": [40.0, 44.0, 48.0], "far": [50.0, 54.0], "near": [47.0, 49.0], "alone": [60.0]}


def test_the_rule_compares_second_half_means_within_max_of_5_and_twice_the_standard_error(tmp_path):
    (tmp_path / "s.yaml").write_text(SWEEP)
    sweep = load_sweep(tmp_path / "s.yaml")
    for trial in sweep.trials:
        run = trial.run_dir(sweep.runs)
        run.mkdir(parents=True)
        figure = FIGURES[trial.library][trial.seed]
        evals = [(20, 0.0), (40, 100.0), (60, figure - 3), (80, figure), (100, figure + 3)]  # early ones do not count
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps(
            {"kind": "eval", "step": s, "normalized_score": v, "return_mean": 0.0}) + "\n" for s, v in evals))
        run.joinpath("result.json").write_text("{}")
    table = {c["peer"].split()[0]: c for c in rank(sweep, draws=20_000)}
    assert set(table) == {"far", "near", "alone"}
    far, near, alone = table["far"], table["near"], table["alone"]
    assert far["batchrl_per_seed"] == [40.0, 44.0, 48.0] and far["peer_per_seed"] == [50.0, 54.0]
    # -8 against 2 * sqrt(16/3 + 8/2) = 6.11: fails; -4 against max(5, 2 * sqrt(16/3 + 2/2) = 5.03): holds
    assert far["difference"] == pytest.approx(-8.0) and far["margin"] == pytest.approx(2 * (16 / 3 + 4) ** 0.5)
    assert not far["holds"]
    assert near["difference"] == pytest.approx(-4.0) and near["margin"] == pytest.approx(2 * (16 / 3 + 1) ** 0.5)
    assert near["holds"]
    assert alone["margin"] == 5.0 and not alone["holds"]  # one peer seed: 5 points alone; -16 fails
    assert 0.0 < far["false_failure_if_identical"] < 0.2


def test_the_false_failure_rate_falls_with_seeds_and_vanishes_for_small_noise():
    assert false_failure(0.1, 5, 5, draws=20_000) == 0.0
    assert false_failure(10.0, 5, 5, draws=50_000) < false_failure(10.0, 2, 2, draws=50_000)
