"""ONNX export: parity with torch, dynamic batch, manifest, atomic integer versions."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from batchrl.errors import UserError
from batchrl.protos.contract import MANIFEST_KEY, manifest_from_json
from batchrl.training.data import load_dataset
from batchrl.training.export import ExportMismatch, export_run, list_versions, probe_observations, publish
from batchrl.training.trainer import load_policy


def test_export_matches_torch_on_dataset_and_nearby_observations(trained_run, tmp_path):
    out = export_run(trained_run, "pendulum", tmp_path)
    assert out["version"] == 1 and out["max_abs_diff"] <= 1e-5 and out["probes"] == 800 + 1000  # all 800 dataset steps, 1000 nearby
    _, policy, _ = load_policy(trained_run)
    data = load_dataset("test/pendulum/play-v0")
    session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    obs = probe_observations(data, 500, seed=1)
    got = session.run(["actions"], {"observations": obs})[0]
    with torch.no_grad():
        want = policy(torch.from_numpy(obs)).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5
    # Actions are in environment units and inside the bounds: scaling is in the graph.
    assert got.min() >= -2.0 and got.max() <= 2.0 and np.abs(got).max() > 1.0


def test_probe_observations_stay_near_the_data():
    class Fake:
        observations = np.random.default_rng(0).normal(5.0, 2.0, size=(3000, 4)).astype(np.float32)
        size, obs_dim = 3000, 4

        def observation_stats(self):
            return self.observations.mean(0), self.observations.std(0)

    probes = probe_observations(Fake(), 1000)
    assert probes.shape == (2000, 4)
    mean, std = Fake().observation_stats()
    assert np.all(np.abs(probes[1000:] - mean) <= 3 * std + 1e-5)


def test_dynamic_batch_axis(repository):
    session = ort.InferenceSession(str(repository / "pendulum" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7, 300):
        assert session.run(["actions"], {"observations": np.zeros((n, 3), np.float32)})[0].shape == (n, 1)


def test_manifest_in_metadata(repository, trained_run):
    model = onnx.load(str(repository / "pendulum" / "2" / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    manifest = manifest_from_json(meta[MANIFEST_KEY])
    result = json.loads((trained_run / "result.json").read_text())
    assert manifest.algorithm == "iql" and manifest.dataset_id == "test/pendulum/play-v0"
    assert manifest.env_id == "Pendulum-v1" and manifest.training_steps == 300
    assert list(manifest.observation_space.shape) == [3] and list(manifest.action_space.shape) == [1]
    assert list(manifest.action_space.low) == [-2.0] and list(manifest.action_space.high) == [2.0]
    assert manifest.normalized_score == pytest.approx(result["normalized_score"])
    assert (manifest.ref_min_score, manifest.ref_max_score) == (-1200.0, -150.0)
    assert manifest.created_at.endswith("Z") and manifest.code_version


def test_manifest_carries_the_code_that_trained_not_the_checkout_that_exports(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    sessions = json.loads((run / "version.json").read_text())["sessions"]
    sessions[0]["code"] = "0123abc"  # trained by another commit, then resumed by this checkout's
    sessions.append({**sessions[0], "code": "4567def", "from_step": 150})
    (run / "version.json").write_text(json.dumps({"sessions": sessions}))
    export_run(run, "pendulum", tmp_path / "models")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "models" / "pendulum" / "1" / "model.onnx")).metadata_props}
    assert manifest_from_json(meta[MANIFEST_KEY]).code_version == "0123abc+4567def"


def test_mismatch_writes_nothing(trained_run, tmp_path):
    with pytest.raises(ExportMismatch, match="nothing was written"):
        export_run(trained_run, "pendulum", tmp_path, atol=-1.0)  # no graph can meet a negative tolerance
    assert not (tmp_path / "pendulum").exists() or list_versions(tmp_path / "pendulum") == []
    assert not any(p.name.startswith(".staging") for p in tmp_path.rglob("*"))


def test_versions_are_integers_in_numeric_order(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"x")
    repo = tmp_path / "repo"
    for v in (2, 9):
        (repo / "m" / str(v)).mkdir(parents=True)
    (repo / "m" / "notes").mkdir()
    assert publish(repo, "m", source)[0] == 10
    assert publish(repo, "m", source)[0] == 11
    assert list_versions(repo / "m") == [2, 9, 10, 11]
    assert (repo / "m" / "11" / "model.onnx").read_bytes() == b"x"
    assert (repo / "m" / "11").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in (repo / "m").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 200])
def test_names_cannot_leave_the_repository(tmp_path, name):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"x")
    with pytest.raises(ValueError, match="model name"):
        publish(tmp_path / "repo", name, source)


def test_an_unfinished_run_is_refused_unless_allowed_and_the_manifest_records_its_planned_steps(
        repository, trained_run, tmp_path):
    meta = {p.key: p.value for p in onnx.load(str(repository / "pendulum" / "1" / "model.onnx")).metadata_props}
    finished = manifest_from_json(meta[MANIFEST_KEY])
    assert finished.training_steps == finished.planned_steps == 300
    # A manifest written before planned_steps existed still reads (0: unknown), as JSON with fields unknown here do.
    old = json.loads(meta[MANIFEST_KEY])
    del old["plannedSteps"]
    assert manifest_from_json(json.dumps({**old, "aFieldFromTheFuture": 1})).planned_steps == 0

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "steps": 1000}))  # at step 300 of 1000
    with pytest.raises(UserError, match="unfinished: its checkpoint is at step 300 of 1000"):
        export_run(run, "pendulum", tmp_path / "models")
    assert list_versions(tmp_path / "models" / "pendulum") == []
    out = export_run(run, "pendulum", tmp_path / "models", allow_unfinished=True)
    assert (out["manifest"]["trainingSteps"], out["manifest"]["plannedSteps"]) == ("300", "1000")
