"""onnxruntime sessions for exported policies: provider choice, manifest, batched run."""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from batchrl.errors import UserError
from batchrl.protos.batchrl.v1 import manifest_pb2
from batchrl.protos.contract import MANIFEST_KEY, manifest_from_json
from batchrl.protos.sequence import OUTPUT as SEQUENCE_OUTPUT
from batchrl.protos.sequence import SEQUENCE_INPUTS, ContextSpec
from batchrl.serving.batcher import Batcher, BatchLimits, Feeds
from batchrl.serving.errors import InvalidArgument

FEED_FORWARD_INPUTS, FEED_FORWARD_OUTPUT = ("observations",), "actions"

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
        raise UserError("device 'cuda' requested but no usable CUDA GPU was found")
    return ["CPUExecutionProvider"]


class ModelLoadError(InvalidArgument):
    """A model file that cannot serve, whatever step refused it (session creation, manifest, inputs and
    outputs, warm-up). One ValueError subclass, with a message naming the file, so that the repository can
    skip the file and carry on and the admin LoadModel can answer INVALID_ARGUMENT: onnxruntime raises its
    own exception types (InvalidArgument, Fail, ...), which are neither ValueError nor RuntimeError."""


def read_manifest(session: ort.InferenceSession, path: Path) -> manifest_pb2.ModelManifest:
    meta = session.get_modelmeta().custom_metadata_map
    if MANIFEST_KEY not in meta:
        raise ModelLoadError(f"{path}: no '{MANIFEST_KEY}' metadata; export models with `batchrl export`")
    try:
        return manifest_from_json(meta[MANIFEST_KEY])
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is the file's fault
        raise ModelLoadError(f"{path}: {exc}") from exc


def _one_line(exc: Exception) -> str:
    """onnxruntime's messages span lines; a rejection is logged as one line."""
    return " ".join(str(exc).split())


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    manifest: manifest_pb2.ModelManifest
    limits: BatchLimits = BatchLimits()
    batcher: Batcher = field(init=False, repr=False)
    pins: int = field(default=0, init=False)        # open sessions using this version
    retired: bool = field(default=False, init=False)  # out of the registry: serves only its holders

    def __post_init__(self) -> None:
        self.batcher = Batcher(self.run, self.limits, f"{self.name!r} version {self.version}")
        self._pin_lock = threading.Lock()

    def pin(self) -> None:
        with self._pin_lock:
            self.pins += 1

    def unpin(self) -> None:
        with self._pin_lock:
            self.pins -= 1
            released = self.retired and self.pins == 0
        if released:
            log.info("released %s version %d: its last session closed", self.name, self.version)

    def retire(self) -> None:
        with self._pin_lock:
            self.retired = True
            pins = self.pins
        if pins:
            log.info("%s version %d left the registry; %d open session(s) keep it until they close",
                     self.name, self.version, pins)
        else:
            log.info("released %s version %d", self.name, self.version)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @cached_property
    def is_sequence(self) -> bool:
        """A sequence policy (Decision Transformer): served through sessions, not Act."""
        return self.manifest.context_length > 0

    @cached_property
    def context_spec(self) -> ContextSpec:
        return ContextSpec(int(np.prod(self.observation_shape)), int(np.prod(self.action_shape)),
                           self.manifest.context_length, self.manifest.max_timestep)

    @cached_property
    def output_name(self) -> str:
        return SEQUENCE_OUTPUT if self.is_sequence else FEED_FORWARD_OUTPUT

    @cached_property
    def observation_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.observation_space.shape)

    @cached_property
    def action_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.action_space.shape)

    @cached_property
    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) shaped like one action; computed once, not per request."""
        space = self.manifest.action_space
        shape = self.action_shape
        return (np.asarray(space.low, dtype=np.float32).reshape(shape),
                np.asarray(space.high, dtype=np.float32).reshape(shape))

    def run(self, feeds: Feeds) -> np.ndarray:
        """One onnxruntime run, now (in-process callers and the batcher)."""
        return self.session.run([self.output_name], feeds)[0]

    def infer(self, feeds: Feeds, deadline: float | None = None) -> np.ndarray:
        """Through the model's batcher: concurrent callers share one run (the server's path)."""
        return self.batcher.submit(feeds, deadline)

    def warm_up_feeds(self) -> Feeds:
        if not self.is_sequence:
            return {"observations": np.zeros((1, *self.observation_shape), dtype=np.float32)}
        spec, k = self.context_spec, self.manifest.context_length
        mask = np.zeros((1, k), np.int64)
        mask[0, -1] = 1
        return {"states": np.zeros((1, k, spec.obs_dim), np.float32),
                "actions": np.zeros((1, k, spec.act_dim), np.float32),
                "returns_to_go": np.zeros((1, k, 1), np.float32), "timesteps": np.zeros((1, k), np.int64),
                "attention_mask": mask}


def load_model(name: str, version: int, path: Path, providers: list, threads: int = 1,
               limits: BatchLimits = BatchLimits(), source: Path | None = None) -> LoadedModel:
    """Open, check and warm up one model file; ModelLoadError (naming the file) for any failure.
    ``source``: the file to open when not ``path`` itself (the repository gives ``path`` resolved, as it
    checked it: a symlink changed after that check cannot redirect the open)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(source or path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        raise ModelLoadError(f"{path}: onnxruntime cannot load it: {_one_line(exc)}") from exc
    model = LoadedModel(name, version, path, session, read_manifest(session, path), limits)
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    expected = (SEQUENCE_INPUTS, SEQUENCE_OUTPUT) if model.is_sequence else (FEED_FORWARD_INPUTS,
                                                                             FEED_FORWARD_OUTPUT)
    kind = "a sequence policy" if model.is_sequence else "a feed-forward policy"
    if inputs != expected[0] or outputs != (expected[1],):
        raise ModelLoadError(f"{path}: inputs {list(inputs)} and outputs {list(outputs)}; the manifest says "
                             f"{kind}, which takes {list(expected[0])} and returns [{expected[1]!r}]")
    # Warm-up: the first real request should not pay for lazy initialisation. It also proves that the graph
    # takes and returns what the manifest describes (the names above say nothing of shapes).
    action = (int(np.prod(model.action_shape)),) if model.is_sequence else model.action_shape
    try:
        out = model.run(model.warm_up_feeds())
    except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidArgument, Fail, ...: the file's fault
        raise ModelLoadError(f"{path}: the warm-up run failed, so the graph does not take what its manifest "
                             f"describes ({kind}, observation shape {list(model.observation_shape)}): "
                             f"{type(exc).__name__}: {_one_line(exc)}") from exc
    if out.shape != (1, *action):
        raise ModelLoadError(f"{path}: the graph returns {expected[1]!r} of shape {list(out.shape)} for one "
                             f"input, but the manifest's action shape {list(model.action_shape)} means "
                             f"{[1, *action]}")
    return model
