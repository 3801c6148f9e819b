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
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf import json_format

from batchrl.errors import UserError
from batchrl.protos.batchrl.v1 import manifest_pb2
from batchrl.protos.contract import MANIFEST_KEY, MAX_VERSION, MODEL_FILE, check_name, manifest_to_json, version_dirs
from batchrl.protos import sequence
from batchrl.protos.sequence import SEQUENCE_INPUTS, ContextSpec, RollingContext
from batchrl.training.data import OfflineDataset, load_dataset
from batchrl.training.policy import DeployedSequencePolicy
from batchrl.version import package_version
from batchrl.training.trainer import RESULT, load_policy, training_code

OPSET = 17


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


def probe_contexts(data: OfflineDataset, context_length: int, max_timestep: int, episodes: int = 4,
                   steps: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Rolling contexts built from dataset episodes, as the server builds them: every
    length from 1 to K (the first K steps) and full windows further in, stacked on the batch axis.

    The dataset's own actions and rewards fill the context, with the episode's return as the target.
    """
    rng = np.random.default_rng(seed)
    steps = 3 * context_length if steps is None else steps
    spec = ContextSpec(data.obs_dim, data.act_dim, context_length, max_timestep)
    chosen = rng.choice(len(data.episode_starts), size=min(episodes, len(data.episode_starts)), replace=False)
    batches: list[dict[str, np.ndarray]] = []
    for e in chosen:
        start, length = int(data.episode_starts[e]), int(data.episode_lengths[e])
        context = RollingContext(spec, float(data.rewards[start:start + length].sum()))
        reward = None
        for t in range(start, start + min(length, steps)):
            batches.append(context.inputs(data.observations[t], reward))
            context.advance(data.observations[t], reward, data.actions[t])
            reward = float(data.rewards[t])
    return {k: np.concatenate([b[k] for b in batches]) for k in SEQUENCE_INPUTS}


def output_name(policy: torch.nn.Module) -> str:
    return sequence.OUTPUT if isinstance(policy, DeployedSequencePolicy) else "actions"


def probe_inputs(policy: torch.nn.Module, data: OfflineDataset, probes: int) -> dict[str, np.ndarray]:
    if isinstance(policy, DeployedSequencePolicy):
        return probe_contexts(data, policy.context_length, policy.max_timestep)
    return {"observations": probe_observations(data, probes)}


def build_manifest(config, data: OfflineDataset, steps: int, result: dict | None,
                   policy: torch.nn.Module | None = None, code: str = "unknown") -> manifest_pb2.ModelManifest:
    m = manifest_pb2.ModelManifest(
        algorithm=config.algorithm, dataset_id=config.dataset, env_id=data.env_id, training_steps=steps,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), batchrl_version=package_version(),
        code_version=code,  # the code that trained the policy, not the checkout that exports it
        planned_steps=config.steps,  # training_steps below it: an unfinished run
    )
    m.observation_space.shape.extend([data.obs_dim])
    m.observation_space.low.extend([-np.inf] * data.obs_dim)
    m.observation_space.high.extend([np.inf] * data.obs_dim)
    m.action_space.shape.extend([data.act_dim])
    m.action_space.low.extend(data.action_low.tolist())
    m.action_space.high.extend(data.action_high.tolist())
    if data.ref_min_score is not None and data.ref_max_score is not None:
        m.ref_min_score, m.ref_max_score = data.ref_min_score, data.ref_max_score
    if isinstance(policy, DeployedSequencePolicy):
        m.context_length, m.max_timestep = policy.context_length, policy.max_timestep
        m.return_scale, m.default_target_return = policy.return_scale, policy.target_return
    if result is not None and result.get("steps") == steps:
        m.mean_return = result["return_mean"]
        if result.get("normalized_score") is not None:
            m.normalized_score = result["normalized_score"]
    return m


def to_onnx(policy: torch.nn.Module, example: dict[str, np.ndarray], path: Path,
            manifest: manifest_pb2.ModelManifest) -> None:
    """Export with the inputs named and shaped as ``example`` (one row is enough), batch axis dynamic."""
    # The TorchScript exporter (dynamo=False) on purpose: it needs no onnxscript and
    # its dynamic_axes give a symbolic batch dimension that tests exercise.
    names = list(example)
    output = output_name(policy)
    args = tuple(torch.as_tensor(example[k][:1]) for k in names)
    torch.onnx.export(
        policy, args, str(path), input_names=names, output_names=[output],
        dynamic_axes={k: {0: "batch"} for k in [*names, output]}, opset_version=OPSET, dynamo=False,
    )
    model = onnx.load(str(path))
    model.metadata_props.add(key=MANIFEST_KEY, value=manifest_to_json(manifest))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def max_parity_error(policy: torch.nn.Module, path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference between onnxruntime (CPU) and torch on the same inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([output_name(policy)], inputs)[0]
    with torch.no_grad():
        want = policy(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    if got.shape != want.shape:
        raise ExportMismatch(f"ONNX output shape {got.shape} != torch output shape {want.shape}")
    return float(np.max(np.abs(got - want)))


def list_versions(model_dir: Path) -> list[int]:
    """Every valid version number in ``model_dir`` (protos.contract.scan_versions), complete or not.

    Folders that are not versions ("007", "²", numbers past int64) are not counted, so the next
    version is one past the highest version serving can load.
    """
    return list(version_dirs(model_dir))


def publish(repository: Path, name: str, source: Path) -> tuple[int, Path]:
    """Copy ``source`` into repository/name/<next version>/model.onnx, appearing whole.

    The version folder is written beside its final place and renamed in; a
    concurrent export that takes the same number makes this one try the next
    (so does any other entry holding that name, e.g. a refused symlink).
    """
    check_name(name)
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a served repository is read by others
    try:
        shutil.copyfile(source, staging / MODEL_FILE)
        with open(staging / MODEL_FILE, "rb+") as f:
            os.fsync(f.fileno())
        version = 0
        while True:
            version = max([version, *list_versions(model_dir)]) + 1
            if version > MAX_VERSION:
                raise ValueError(f"{model_dir} holds version {version - 1}, the highest a version may be "
                                 f"({MAX_VERSION}); remove or renumber versions before exporting")
            try:
                os.rename(staging, model_dir / str(version))
                return version, model_dir / str(version) / MODEL_FILE
            except OSError:
                if not os.path.lexists(model_dir / str(version)):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_run(run_dir: str | Path, name: str, repository: str | Path = "models", atol: float = 1e-5,
               probes: int = 1000, allow_unfinished: bool = False) -> dict:
    """Export the run's latest checkpoint; returns what was written and the measured parity.

    A run whose checkpoint is short of its configured steps (still training, or stopped) is refused
    unless ``allow_unfinished``: published under a name, it would replace a finished model as the
    default served version. Its manifest records both counts (training_steps < planned_steps)."""
    config, policy, ckpt = load_policy(Path(run_dir))
    if int(ckpt["step"]) < config.steps and not allow_unfinished:
        raise UserError(f"{run_dir} is unfinished: its checkpoint is at step {int(ckpt['step'])} of {config.steps}; "
                        f"finish it (batchrl train --resume --run-dir {run_dir}) or export it anyway with "
                        "--allow-unfinished (its manifest then says so)")
    data = load_dataset(config.dataset)
    result_path = Path(run_dir) / RESULT
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    manifest = build_manifest(config, data, int(ckpt["step"]), result, policy, training_code(Path(run_dir)))
    inputs = probe_inputs(policy, data, probes)
    count = len(next(iter(inputs.values())))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        to_onnx(policy, inputs, path, manifest)
        error = max_parity_error(policy, path, inputs)
        if not error <= atol:
            raise ExportMismatch(f"ONNX and torch actions differ by {error:.3g} (> {atol:g}) on "
                                 f"{count} probe inputs; nothing was written")
        version, final = publish(Path(repository), name, path)
    return {"name": name, "version": version, "path": str(final), "max_abs_diff": error,
            "probes": count, "manifest": json_format.MessageToDict(manifest)}
