"""Runs and exports through the real CLI (a subprocess run outside the checkout): a run's step count is not
changed by --resume, and an unfinished run is exported only when asked, with the manifest saying so."""
import json
import os
import shutil
import subprocess
import sys

import onnx

from batchrl.protos.contract import MANIFEST_KEY, manifest_from_json
from batchrl.training.trainer import CHECKPOINT
from tests.test_cli import one_line


def batchrl(*args, cwd, timeout=180):
    return subprocess.run([sys.executable, "-m", "batchrl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "TQDM_DISABLE": "1"})


def copy_run(trained_run, tmp_path, steps: int | None = None):
    """A copy of the finished 300-step run; with ``steps``, its config says it was meant to train that many."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    if steps is not None:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "steps": steps}))
    return run


def test_resume_refuses_another_step_count_and_changes_nothing(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = batchrl("train", "--resume", "--run-dir", run, "--steps", 21_000, cwd=tmp_path)  # not extended
    one_line(result, 1, "--steps 21000", f"{run} is a 300-step run", "start a new run", "--run-dir")
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no session, no row, no lock left


def test_an_unfinished_run_is_exported_only_when_asked_and_its_manifest_says_so(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path, steps=20_000)  # its checkpoint is at step 300 of 20,000
    repo = tmp_path / "models"
    refused = batchrl("export", run, "--name", "x", "--repository", repo, cwd=tmp_path)
    one_line(refused, 1, f"{run} is unfinished", "step 300 of 20000", "--allow-unfinished", "--resume")
    assert not (repo / "x").exists() or not any((repo / "x").iterdir())  # nothing published

    allowed = batchrl("export", run, "--name", "x", "--repository", repo, "--allow-unfinished", cwd=tmp_path)
    warning = one_line(allowed, 0, "unfinished", "step 300 of 20000")
    assert warning.startswith("warning:") and "wrote" in allowed.stdout
    meta = {p.key: p.value for p in onnx.load(str(repo / "x" / "1" / "model.onnx")).metadata_props}
    manifest = manifest_from_json(meta[MANIFEST_KEY])
    assert (manifest.training_steps, manifest.planned_steps) == (300, 20_000)
    assert not (run / ".lock").exists() and (run / CHECKPOINT).exists()


def test_resuming_a_finished_run_says_so_and_changes_nothing(trained_run, tmp_path):
    """Nothing to resume: said on stderr, the run's result on stdout, exit 0, for one process or --nproc 2 (no
    torchrun started: its banner would be on stderr), the run folder untouched."""
    run = copy_run(trained_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for nproc in ("1", "2"):
        result = batchrl("train", "--nproc", nproc, "--resume", "--run-dir", run, cwd=tmp_path)
        one_line(result, 0, f"{run} is finished (step 300 of 300): nothing to resume")
        assert json.loads(result.stdout.split("\nrun folder:")[0]) == json.loads((run / "result.json").read_text())
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
