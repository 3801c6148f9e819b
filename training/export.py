"""Export a trained run as one self-describing ONNX file in the model repository.

The graph is the deployed acting path (observation normalisation, deterministic
action, action bounds) with a dynamic batch axis; the manifest rides in the
ONNX metadata under ``batchrl.manifest``. The export is checked against the
torch policy before anything is written, and the version folder is renamed into
place whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf import json_format

from protos.batchrl.v1 import manifest_pb2
from protos.contract import MANIFEST_KEY, MODEL_FILE, manifest_to_json, version_dirs
from training.data import OfflineDataset, load_dataset
from training.trainer import RESULT, code_version, load_policy, package_version

OPSET = 17
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ExportMismatch(RuntimeError):
    """The ONNX graph does not reproduce the torch policy within tolerance."""


def probe_observations(data: OfflineDataset, n: int = 1000, seed: int = 0) -> np.ndarray:
    """n observations from the dataset and n drawn uniformly within mean ± 3 std.

    Raw N(0, 1) inputs can saturate tanh and prove nothing; these stay in the
    region the policy actually sees.
    """
    rng = np.random.default_rng(seed)
    mean, std = data.observation_stats()
    from_data = data.observations[rng.choice(data.size, size=min(n, data.size), replace=False)]
    around = mean + std * rng.uniform(-3.0, 3.0, size=(n, data.obs_dim)).astype(np.float32)
    return np.concatenate([from_data, around]).astype(np.float32)


def build_manifest(config, data: OfflineDataset, steps: int, result: dict | None) -> manifest_pb2.ModelManifest:
    m = manifest_pb2.ModelManifest(
        algorithm=config.algorithm, dataset_id=config.dataset, env_id=data.env_id, training_steps=steps,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), batchrl_version=package_version(),
        code_version=code_version(),
    )
    m.observation_space.shape.extend([data.obs_dim])
    m.observation_space.low.extend([-np.inf] * data.obs_dim)
    m.observation_space.high.extend([np.inf] * data.obs_dim)
    m.action_space.shape.extend([data.act_dim])
    m.action_space.low.extend(data.action_low.tolist())
    m.action_space.high.extend(data.action_high.tolist())
    if data.ref_min_score is not None and data.ref_max_score is not None:
        m.ref_min_score, m.ref_max_score = data.ref_min_score, data.ref_max_score
    if result is not None and result.get("steps") == steps:
        m.mean_return = result["return_mean"]
        if result.get("normalized_score") is not None:
            m.normalized_score = result["normalized_score"]
    return m


def to_onnx(policy: torch.nn.Module, obs_dim: int, path: Path, manifest: manifest_pb2.ModelManifest) -> None:
    # The TorchScript exporter (dynamo=False) on purpose: it needs no onnxscript and
    # its dynamic_axes give a symbolic batch dimension that tests exercise.
    torch.onnx.export(
        policy, (torch.zeros(1, obs_dim),), str(path), input_names=["observations"], output_names=["actions"],
        dynamic_axes={"observations": {0: "batch"}, "actions": {0: "batch"}}, opset_version=OPSET, dynamo=False,
    )
    model = onnx.load(str(path))
    model.metadata_props.add(key=MANIFEST_KEY, value=manifest_to_json(manifest))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def max_parity_error(policy: torch.nn.Module, path: Path, observations: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["actions"], {"observations": observations})[0]
    with torch.no_grad():
        want = policy(torch.from_numpy(observations)).numpy()
    if got.shape != want.shape:
        raise ExportMismatch(f"ONNX output shape {got.shape} != torch output shape {want.shape}")
    return float(np.max(np.abs(got - want)))


def list_versions(model_dir: Path) -> list[int]:
    """Every version number taken in ``model_dir``, complete or not."""
    return list(version_dirs(model_dir))


def publish(repository: Path, name: str, source: Path) -> tuple[int, Path]:
    """Copy ``source`` into repository/name/<next version>/model.onnx, appearing whole.

    The version folder is written beside its final place and renamed in; a
    concurrent export that takes the same number makes this one try the next.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} is invalid: use letters, digits, '.', '_' or '-' "
                         "(at most 128, not starting with '.', '_' or '-')")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a served repository is read by others
    try:
        shutil.copyfile(source, staging / MODEL_FILE)
        with open(staging / MODEL_FILE, "rb+") as f:
            os.fsync(f.fileno())
        while True:
            version = (list_versions(model_dir) or [0])[-1] + 1
            try:
                os.rename(staging, model_dir / str(version))
                return version, model_dir / str(version) / MODEL_FILE
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_run(run_dir: str | Path, name: str, repository: str | Path = "models", atol: float = 1e-5,
               probes: int = 1000) -> dict:
    """Export the run's latest checkpoint; returns what was written and the measured parity."""
    config, policy, ckpt = load_policy(Path(run_dir))
    data = load_dataset(config.dataset)
    result_path = Path(run_dir) / RESULT
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    manifest = build_manifest(config, data, int(ckpt["step"]), result)
    observations = probe_observations(data, probes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        to_onnx(policy, data.obs_dim, path, manifest)
        error = max_parity_error(policy, path, observations)
        if not error <= atol:
            raise ExportMismatch(f"ONNX and torch actions differ by {error:.3g} (> {atol:g}) on "
                                 f"{len(observations)} observations; nothing was written")
        version, final = publish(Path(repository), name, path)
    return {"name": name, "version": version, "path": str(final), "max_abs_diff": error,
            "probes": len(observations), "manifest": json_format.MessageToDict(manifest)}
