"""onnxruntime sessions for exported policies: provider choice, manifest, batched run."""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from protos.batchrl.v1 import manifest_pb2
from protos.contract import MANIFEST_KEY, manifest_from_json

log = logging.getLogger(__name__)


def cuda_usable() -> bool:
    """True only when a GPU is present and the CUDA libraries load.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU
    and then fails loudly at session creation, so the listing alone proves nothing.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")  # the driver: absent on machines without an NVIDIA GPU
    except OSError:
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()  # CUDA/cuDNN from the nvidia-* wheels, when installed
        except Exception as exc:  # noqa: BLE001 - a failed preload only means the system libraries must serve
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    return True


def choose_providers(device: str = "auto", device_id: int = 0) -> list:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_usable():
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError("device 'cuda' requested but no usable CUDA GPU was found")
    return ["CPUExecutionProvider"]


def read_manifest(session: ort.InferenceSession, path: Path) -> manifest_pb2.ModelManifest:
    meta = session.get_modelmeta().custom_metadata_map
    if MANIFEST_KEY not in meta:
        raise ValueError(f"{path}: no '{MANIFEST_KEY}' metadata; export models with `batchrl export`")
    try:
        return manifest_from_json(meta[MANIFEST_KEY])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    manifest: manifest_pb2.ModelManifest

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.observation_space.shape)

    @property
    def action_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.action_space.shape)

    @cached_property
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) shaped like one action; computed once, not per request."""
        space = self.manifest.action_space
        shape = self.action_shape
        return (np.asarray(space.low, dtype=np.float32).reshape(shape),
                np.asarray(space.high, dtype=np.float32).reshape(shape))

    def run(self, observations: np.ndarray) -> np.ndarray:
        return self.session.run(["actions"], {"observations": observations})[0]


def load_model(name: str, version: int, path: Path, providers: list, threads: int = 1) -> LoadedModel:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        raise ValueError(f"{path}: onnxruntime cannot load it: {exc}") from exc
    model = LoadedModel(name, version, path, session, read_manifest(session, path))
    inputs = [i.name for i in session.get_inputs()]
    if inputs != ["observations"]:
        raise ValueError(f"{path}: inputs {inputs}, expected ['observations'] "
                         f"(algorithm {model.manifest.algorithm!r} is not served by Act)")
    # Warm-up: the first real request should not pay for lazy initialisation.
    model.run(np.zeros((1, *model.observation_shape), dtype=np.float32))
    return model
