"""`batchrl sweep` on a real local Ray: trials at once, equal to runs done alone, resumable, failures reported."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from batchrl.training.sweep import Trial, load_sweep, train_trial

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = 'set: {hidden: "32,32", batch_size: 64}'



@pytest.fixture
def ray_tmp():
    """Ray's session folder: short (its socket paths must fit 107 bytes), the test's own, removed after."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_sweep(config: Path, ray_tmp: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "batchrl.cli", "sweep", str(config), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def alone(trial: Trial, run_dir: Path) -> dict:
    """The trial trained in this process at one thread, as nothing else runs."""
    threads = torch.get_num_threads()
    try:
        return train_trial(trial, run_dir)
    finally:
        torch.set_num_threads(threads)


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("updates_per_s", None)
        out.append(row)
    return out


@pytest.mark.timeout(900)
def test_two_trials_at_once_equal_to_runs_alone_and_a_failure_reported(minari_root, tmp_path, ray_tmp):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
name: tiny
runs: runs
output: out
notes: The pendulum cells are a smoke test.
grids:
  - algorithms: {{bc: 300, td3bc: 300}}
    datasets: [test/pendulum/play-v0]
    seeds: [0, 1]
    eval_every: 150
    eval_episodes: 1
    checkpoint_every: 100
    {SETTINGS}
  - algorithms: {{bc: 300}}
    datasets: [test/none/missing-v0]
""")
    proc = run_sweep(config, ray_tmp, "--cpus", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out  # one trial failed
    sweep = load_sweep(config)
    good, (bad,) = sweep.trials[:4], sweep.trials[4:]
    assert f"failed bc on test/none/missing-v0 seed 0: " in out and str(bad.run_dir(sweep.runs)) + ".log" in out, out
    assert "Minari dataset 'test/none/missing-v0' not found" in (bad.run_dir(sweep.runs).parent /
                                                                   (bad.run_dir(sweep.runs).name + ".log")).read_text()
    assert "4 trained, 0 already finished, 1 failed, of 5 trials" in out, out
    state = json.loads((sweep.runs / "sweep.json").read_text())
    spans = sorted((state[str(t.run_dir(sweep.runs).relative_to(sweep.runs))]["started"],
                    state[str(t.run_dir(sweep.runs).relative_to(sweep.runs))]["finished"]) for t in good)
    events = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2, spans  # two at once, never more than the 2 CPUs
    assert len({state[k]["pid"] for k in state if state[k]["status"] == "finished"}) == 4  # a process per trial
    for trial in good:
        run_dir = trial.run_dir(sweep.runs)
        result = json.loads((run_dir / "result.json").read_text())
        reference = alone(trial, tmp_path / "alone" / run_dir.name)
        assert rows(run_dir) == rows(tmp_path / "alone" / run_dir.name), trial
        assert (result["return_mean"], result["steps"]) == (reference["return_mean"], reference["steps"])
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert "## test/pendulum/play-v0" in table and "behaviour" in table
    assert "\n\nThe pendulum cells are a smoke test.\n\n" in table
    assert "| td3bc batch_size=64 hidden=32,32 | 300 | 2 | 1 |" in table
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0
    assert "not yet: `test_none_missing-v0/bc-300-s0`" in table


@pytest.mark.timeout(900)
def test_a_killed_sweep_skips_finished_trials_and_resumes_the_rest_exactly(minari_root, tmp_path, ray_tmp):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
runs: runs
output: out
grids:
  - algorithms: {{bc: 100}}
    datasets: [test/pendulum/play-v0]
    eval_every: 100
    eval_episodes: 1
    {SETTINGS}
  - algorithms: {{td3bc: 4000}}
    datasets: [test/pendulum/play-v0]
    eval_every: 2000
    eval_episodes: 1
    checkpoint_every: 200
    {SETTINGS}
""")
    sweep = load_sweep(config)
    short, long = (t.run_dir(sweep.runs) for t in sweep.trials)
    proc = run_sweep(config, ray_tmp, "--cpus", "1", start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not ((short / "result.json").exists() and (long / "checkpoint.pt").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its Ray and the trial's worker
        proc.wait()
    assert not (long / "result.json").exists()
    finished = (short / "result.json").stat().st_mtime_ns
    proc = run_sweep(config, ray_tmp, "--cpus", "1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "1 trained, 1 already finished, 0 failed, of 2 trials" in out, out
    assert (short / "result.json").stat().st_mtime_ns == finished
    sessions = json.loads((long / "version.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["from_step"] > 0, sessions  # resumed from a checkpoint
    reference = alone(sweep.trials[1], tmp_path / "alone" / long.name)
    assert rows(long) == rows(tmp_path / "alone" / long.name)
    assert json.loads((long / "result.json").read_text())["return_mean"] == reference["return_mean"]


def test_a_bad_sweep_file_is_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("algorithms: {bc: 10}\ndatasets: [x]\nseed: [0]\n")
    proc = subprocess.run([sys.executable, "-m", "batchrl.cli", "sweep", str(config)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"batchrl sweep: error: {config}: unknown key(s) ['seed']; a sweep has ['grids', 'name', 'notes', 'output', 'runs'] "
        "and a grid's keys ['algorithms', 'checkpoint_every', 'datasets', 'device', 'eval_episodes', 'eval_every', "
        "'library', 'seeds', 'set', 'steps', 'trainer']"]
    config.write_text("algorithms: {bc: 10}\ndatasets: [x]\nset: {beta: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "batchrl.cli", "sweep", str(config)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "bc has no setting 'beta'" in proc.stderr, proc.stderr


def test_settings_expand_to_their_product_and_variants(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text("algorithms: [iql]\nsteps: 1000\ndatasets: [a/b-v0, c/d-v0]\nseeds: [0, 1]\n"
                      "set: [{beta: [1.0, 3.0], tau: 0.7}, {}]\n")
    sweep = load_sweep(config)
    assert [(t.seed, t.settings, t.dataset) for t in sweep.trials][:6] == [
        (0, (("beta", "1.0"), ("tau", "0.7")), "a/b-v0"), (0, (("beta", "1.0"), ("tau", "0.7")), "c/d-v0"),
        (0, (("beta", "3.0"), ("tau", "0.7")), "a/b-v0"), (0, (("beta", "3.0"), ("tau", "0.7")), "c/d-v0"),
        (0, (), "a/b-v0"), (0, (), "c/d-v0")]
    assert len(sweep.trials) == 12 and sweep.runs == tmp_path / "runs" / "grid" and sweep.output == tmp_path / "results"
    assert sweep.trials[0].run_dir(sweep.runs) == tmp_path / "runs/grid/a_b-v0/iql-beta1.0-tau0.7-1k-s0"
    assert sweep.notes == ()
    config.write_text("notes: [one, two]\nalgorithms: {bc: 10}\ndatasets: [a/b-v0]\n")
    assert load_sweep(config).notes == ("one", "two")
    config.write_text("notes: {a: 1}\nalgorithms: {bc: 10}\ndatasets: [a/b-v0]\n")
    with pytest.raises(ValueError, match=r"notes must be a string or a list of strings, got \{'a': 1\}"):
        load_sweep(config)


def test_last_evaluations_are_the_latest_by_step_or_all_of_them(tmp_path):
    from batchrl.training.report import last_evaluations

    lines = [{"kind": "eval", "step": 30, "normalized_score": 30.0}, {"kind": "train", "step": 35, "loss": 1.0},
             {"kind": "eval", "step": 10, "normalized_score": 10.0},
             {"kind": "eval", "step": 40, "normalized_score": None, "return_mean": 100.0},  # no reference scores
             {"kind": "eval", "step": 20, "normalized_score": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert last_evaluations(tmp_path, 2) == pytest.approx((30.0 + 100.0) / 2)  # steps 30 and 40, in step order
    assert last_evaluations(tmp_path) == pytest.approx((20.0 + 30.0 + 100.0) / 3)
    assert last_evaluations(tmp_path, None) == pytest.approx(160.0 / 4)


def test_the_peer_comparison_holds_within_max_of_five_points_and_the_pooled_std():
    from batchrl.training.report import peer_comparison, pooled_std

    def row(library, algorithm, base, per_seed, last3, steps=100, dataset="d"):
        return {"dataset": dataset, "library": library, "algorithm": algorithm, "base": [base, []], "steps": steps,
                "seeds": list(range(len(per_seed))), "per_seed": per_seed, "last3_per_seed": last3}

    rows = [row("batchrl", "bc", "bc", [45.0, 47.0, 52.0], [60.0, 50.0, 70.0]),
            row("d3rlpy", "d3rlpy bc", "bc", [53.5, 53.5], [70.0, 64.0]),
            row("batchrl", "cql", "cql", [27.0], [22.0]),
            row("d3rlpy", "d3rlpy cql", "cql", [31.0], [40.0]),
            row("d3rlpy", "d3rlpy iql", "iql", [50.0], [50.0]),                   # no batchrl IQL: no comparison
            row("batchrl", "bc", "bc", [0.0], [0.0], dataset="other"),
            row("", "behaviour (dataset episodes)", "", [], [])]
    bc, cql = peer_comparison(rows)
    # Final: 48.0 - 53.5 = -5.5; pooled std sqrt((13 * 2 + 0 * 1) / 3) = 2.94 < 5, so the margin is 5: fails.
    assert bc["algorithm"] == "bc" and bc["seeds"] == [3, 2]
    assert bc["final"]["difference"] == pytest.approx(-5.5) and bc["final"]["pooled_std"] == pytest.approx(
        (26 / 3) ** 0.5) and bc["final"]["margin"] == 5.0 and not bc["final"]["holds"]
    # Last 3: 60 - 67 = -7; pooled std sqrt((100 * 2 + 18 * 1) / 3) = 8.52 > 5 is the margin: holds.
    assert bc["last3"]["difference"] == pytest.approx(-7.0) and bc["last3"]["margin"] == pytest.approx(
        (218 / 3) ** 0.5) and bc["last3"]["holds"]
    # One seed a side: no pooled std, a margin of 5; -4 holds, -18 does not.
    assert cql["final"]["pooled_std"] is None and cql["final"]["holds"] and not cql["last3"]["holds"]
    assert pooled_std([1.0], [2.0]) is None and pooled_std([1.0, 3.0], [5.0]) == pytest.approx(2 ** 0.5)
