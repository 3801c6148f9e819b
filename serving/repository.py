"""The model repository: models/<name>/<integer version>/model.onnx, loaded and swapped live.

Every complete version folder loads; the highest loaded version of a name
serves by default. Requests read the current mapping without a lock: it is
replaced whole on every change (copy on write), so a request sees the old set
of versions or the new one, never half of a change. A request or session that
already holds a LoadedModel keeps it: a version taken out of the registry
finishes what it serves and is freed when its last user lets go.

An optional ``models/<name>/config.json`` sets that model's batching limits,
device and threads (ModelConfig).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protos.contract import MODEL_FILE, check_name, version_dirs
from serving.batcher import BatchLimits
from serving.runtime import LoadedModel, choose_providers, load_model

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """Per-model settings; a field left out of config.json takes the server's default."""

    max_batch_size: int | None = None   # most rows one run gathers
    max_queue_delay_us: int | None = None  # how long a filling batch may wait for more requests
    max_queue: int | None = None        # most requests waiting; more get RESOURCE_EXHAUSTED
    device: str | None = None           # "auto", "cuda" or "cpu"
    device_id: int | None = None
    threads: int | None = None          # onnxruntime intra-op threads

    @classmethod
    def read(cls, model_dir: Path) -> "ModelConfig":
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not readable JSON: {exc}") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) - fields:
            unknown = sorted(set(raw) - fields) if isinstance(raw, dict) else raw
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(fields)}")
        for key in ("max_batch_size", "max_queue_delay_us", "max_queue", "device_id", "threads"):
            value, least = raw.get(key), 0 if key in ("device_id", "max_queue_delay_us") else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{path}: {key} must be an integer >= {least}, got {value!r}")
        if raw.get("device") not in (None, "auto", "cuda", "cpu"):
            raise ValueError(f"{path}: device must be 'auto', 'cuda' or 'cpu', got {raw['device']!r}")
        return cls(**raw)

    def limits(self, defaults: BatchLimits) -> BatchLimits:
        return BatchLimits(
            max_rows=self.max_batch_size or defaults.max_rows,
            max_delay=defaults.max_delay if self.max_queue_delay_us is None else self.max_queue_delay_us / 1e6,
            max_queue=self.max_queue or defaults.max_queue)


@dataclass(frozen=True)
class Defaults:
    """Server-wide settings a model's config.json may override."""

    providers: list
    threads: int = 1
    limits: BatchLimits = BatchLimits()


class Registry:
    def __init__(self, root: str | Path, defaults: Defaults,
                 on_change: Callable[[str, bool], None] | None = None, metrics=None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {root} does not exist")
        self.defaults = defaults
        self.on_change = on_change  # (name, serving) after every change of a name's loaded versions
        self.metrics = metrics      # serving.metrics.Metrics, or None
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._write = threading.Lock()        # guards the swap itself; readers never wait
        self._changing = threading.RLock()    # one load/unload/poll at a time (they are rare and slow)
        self._seen: dict[str, set[int]] = {}  # version folders already considered by poll()
        self._failed: dict[Path, tuple[float, int]] = {}  # files that failed, by (mtime, size)

    @classmethod
    def open(cls, root: str | Path, providers: list, threads: int = 1, limits: BatchLimits = BatchLimits(),
             on_change: Callable[[str, bool], None] | None = None, metrics=None) -> "Registry":
        """A registry with every complete version under ``root`` loaded (bad files logged and skipped)."""
        registry = cls(root, Defaults(providers, threads, limits), on_change, metrics)
        registry.poll()
        return registry

    # -- reading (every request) ------------------------------------------
    @property
    def models(self) -> dict[str, dict[int, LoadedModel]]:
        """The current mapping {name: {version: model}}; treat it as read-only."""
        return self._models

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        versions = self._models.get(name)
        if not versions:
            raise LookupError(f"model {name!r} is not loaded; loaded models: {sorted(self._models) or 'none'}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise LookupError(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        return versions[version]

    # -- changing ---------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """The folder of model ``name``, refusing names that would leave the repository."""
        check_name(name)
        path = self.root / name
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"model name {name!r} resolves outside the repository {self.root}")
        return path

    def load_model(self, name: str, version: int | None = None) -> list[LoadedModel]:
        """Load ``version`` of ``name`` (unset: every complete version not yet loaded) and swap it in.

        All or nothing: if a file is corrupt or incompatible, ValueError names it and the
        versions already loaded keep serving. LookupError when there is nothing to load.
        """
        with self._changing:
            return self._load_model(name, version)

    def _load_model(self, name: str, version: int | None) -> list[LoadedModel]:
        model_dir = self.model_dir(name)
        if version is not None and version < 1:
            raise ValueError(f"version must be a positive integer, got {version}")
        on_disk = self._complete_versions(model_dir)
        if version is not None:
            if version not in on_disk:
                raise LookupError(f"model {name!r} has no version folder {version} holding {MODEL_FILE} "
                                  f"under {self.root}; complete versions: {sorted(on_disk)}")
            on_disk = {version: on_disk[version]}
        if not on_disk:
            raise LookupError(f"model {name!r} has no complete version folder under {self.root}")
        loaded = self._models.get(name, {})
        fresh = {v: self._load(name, v, path, model_dir) for v, path in on_disk.items() if v not in loaded}
        self._swap(name, add=fresh)
        self._seen.setdefault(name, set()).update(on_disk)
        return [fresh[v] for v in sorted(fresh)]

    def unload_model(self, name: str) -> list[LoadedModel]:
        """Take every version of ``name`` out of service; requests and sessions holding one finish on it."""
        check_name(name)
        with self._changing:
            if name not in self._models:
                raise LookupError(f"model {name!r} is not loaded; loaded models: {sorted(self._models) or 'none'}")
            return self._swap(name, remove_all=True)

    def poll(self) -> list[str]:
        """Load version folders that appeared since the last poll and drop versions whose folder
        went away. Failures are logged and retried only when the file changes. Returns what changed."""
        with self._changing:
            return self._poll()

    def _poll(self) -> list[str]:
        changes: list[str] = []
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in names:
            try:
                model_dir = self.model_dir(name)
            except ValueError as exc:
                log.warning("skipping folder %s: %s", name, exc)
                continue
            on_disk = self._complete_versions(model_dir)
            seen = self._seen.setdefault(name, set())
            for version in sorted(set(on_disk) - seen):
                path = on_disk[version]
                stamp = _stamp(path)
                if self._failed.get(path) == stamp:
                    continue
                try:
                    model = self._load(name, version, path, model_dir)
                except ValueError as exc:
                    self._failed[path] = stamp
                    log.error("rejected %s version %d: %s", name, version, exc)
                    changes.append(f"rejected {name}/{version}")
                    continue
                seen.add(version)
                self._swap(name, add={version: model})
                changes.append(f"loaded {name}/{version}")
            gone = [v for v in self._models.get(name, {}) if v not in on_disk]
            if gone:
                self._swap(name, remove=gone)
                seen.difference_update(gone)
                changes += [f"removed {name}/{v}" for v in gone]
        for name in [n for n in self._models if n not in names]:
            self._swap(name, remove_all=True)
            self._seen.pop(name, None)
            changes.append(f"removed {name}")
        return changes

    # -- internals --------------------------------------------------------
    @staticmethod
    def _complete_versions(model_dir: Path) -> dict[int, Path]:
        return {v: folder / MODEL_FILE for v, folder in version_dirs(model_dir).items()
                if v >= 1 and (folder / MODEL_FILE).is_file()}

    def _load(self, name: str, version: int, path: Path, model_dir: Path) -> LoadedModel:
        try:
            config = ModelConfig.read(model_dir)
            providers = (self.defaults.providers if config.device is None
                         else choose_providers(config.device, config.device_id or 0))
            model = load_model(name, version, path, providers, config.threads or self.defaults.threads,
                               config.limits(self.defaults.limits))
        except (ValueError, RuntimeError) as exc:
            if self.metrics is not None:
                self.metrics.load_failures.labels(name).inc()
            raise ValueError(str(exc)) from exc
        if self.metrics is not None:
            model.batcher.observe = self.metrics.batch_observer(name)
        log.info("loaded %s version %d (%s) on %s", name, version, model.manifest.algorithm,
                 ", ".join(model.providers))
        return model

    def _swap(self, name: str, add: dict[int, LoadedModel] | None = None, remove: list[int] | None = None,
              remove_all: bool = False) -> list[LoadedModel]:
        with self._write:
            models = dict(self._models)
            versions = dict(models.get(name, {}))
            removed = [versions.pop(v) for v in (list(versions) if remove_all else remove or []) if v in versions]
            versions.update(add or {})
            if versions:
                models[name] = dict(sorted(versions.items()))
            else:
                models.pop(name, None)
            self._models = models  # the swap: one reference assignment
        for model in removed:
            model.retire()
        if self.on_change is not None and (add or removed):
            self.on_change(name, bool(versions))
        return removed


def _stamp(path: Path) -> tuple[float, int]:
    stat = path.stat()
    return stat.st_mtime, stat.st_size
