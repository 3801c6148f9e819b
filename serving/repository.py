"""The model repository: models/<name>/<integer version>/model.onnx, loaded and swapped live.

Every complete version folder loads; the highest loaded version of a name
serves by default, except that while a name serves, a new higher version that
would change what its clients send or receive (observation shape, action
shape, feed-forward vs sequence policy) waits for an explicit load (see
Registry). Requests read the current mapping without a lock: it is replaced
whole on every change (copy on write), so a request sees the old set of
versions or the new one, never half of a change. A request or session that
already holds a LoadedModel keeps it: a version taken out of the registry
finishes what it serves and is freed when its last user lets go.

An optional ``models/<name>/config.json`` sets that model's batching limits,
device and threads (ModelConfig).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchrl.protos.contract import MODEL_FILE, NAME_PATTERN, check_name, resolved_inside, scan_versions
from batchrl.serving.batcher import BatchLimits
from batchrl.serving.errors import InvalidArgument, NotFound
from batchrl.serving.runtime import LoadedModel, ModelLoadError, choose_providers, load_model

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# Why a folder of the repository does not serve (the `reason` label of batchrl_repository_rejected):
# "name" not a valid model name or version, "outside" it or a file it opens (model.onnx, config.json)
# resolves outside the repository, "load" the file cannot serve (ModelLoadError), "incompatible"
# refused for automatic promotion (IncompatibleVersion).
REJECT_REASONS = ("name", "outside", "load", "incompatible")


class IncompatibleVersion(ModelLoadError):
    """A valid new version whose inputs or outputs differ from the default's: promoting it on a poll
    would make every running client of the default fail, so only an explicit load may."""


class OutsideRepository(ModelLoadError):
    """A file the repository would open (model.onnx, config.json) is a symlink leading out of it: refused
    like a folder that does, whoever asks (poll or explicit load)."""


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
    def read(cls, model_dir: Path, root: Path | None = None) -> "ModelConfig":
        """``model_dir``'s config.json; with ``root``, OutsideRepository if it resolves outside that folder."""
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        if root is not None:
            path = _inside(path, root)  # read the file that was checked, not whatever the link says later
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
    """The loaded versions of every model in the repository ``root``, kept in step with it.

    Which versions load on their own (poll): while nothing of a name serves (at start-up, or a name
    that just appeared) every valid version loads and the highest serves. While a name serves, a new
    version higher than its default loads only if it takes the same observation shape, returns the
    same action shape and is the same kind of policy (feed-forward or sequence); otherwise it is
    refused (IncompatibleVersion, logged once) and the default keeps serving. Versions below the
    default are not checked. An explicit load_model (the admin LoadModel call, KServe's
    RepositoryModelLoad) loads whatever is valid: the operator says the change is meant.

    Folders and files that cannot serve are logged once, skipped, and counted by rejected(); the rest
    of the repository loads and serves. A refused file is not retried until it changes.
    """

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
        self._failed: dict[Path, tuple[tuple[float, int], str]] = {}  # refused files: ((mtime, size), reason)
        self._rejected: dict[Path, tuple[str, str]] = {}  # folders refused now: (model, reason); replaced whole

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
            raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self._models) or 'none'}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        return versions[version]

    def folders(self) -> dict[str, list[int]]:
        """{name: valid versions} of every model folder on disk now, loaded or not."""
        return {p.name: list(scan_versions(p, self.root).versions) for p in sorted(self.root.iterdir())
                if p.is_dir() and not p.name.startswith(".") and NAME_PATTERN.match(p.name)}

    def rejected(self) -> Counter:
        """{(model, reason): folders} not serving now for ``reason`` (one of REJECT_REASONS)."""
        return Counter(self._rejected.values())

    # -- changing ---------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """The folder of model ``name``, refusing names that would leave the repository (InvalidArgument)."""
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        path = self.root / name
        if not path.resolve().is_relative_to(self.root):
            raise InvalidArgument(f"model name {name!r} resolves outside the repository {self.root}")
        return path

    def load_model(self, name: str, version: int | None = None) -> list[LoadedModel]:
        """Load ``version`` of ``name`` (unset: every complete version not yet loaded) and swap it in.

        All or nothing: if a file is corrupt or incompatible, InvalidArgument (ModelLoadError) names it
        and the versions already loaded keep serving. NotFound when there is nothing to load.
        """
        with self._changing:
            return self._load_model(name, version)

    def _load_model(self, name: str, version: int | None) -> list[LoadedModel]:
        model_dir = self.model_dir(name)
        if version is not None and version < 1:
            raise InvalidArgument(f"version must be a positive integer, got {version}")
        scan = scan_versions(model_dir, self.root)
        on_disk = _complete(scan.versions)
        if version is not None:
            if str(version) in scan.rejected:
                raise InvalidArgument(scan.rejected[str(version)][1])
            if version not in on_disk:
                raise NotFound(f"model {name!r} has no version folder {version} holding {MODEL_FILE} "
                                  f"under {self.root}; complete versions: {sorted(on_disk)}")
            on_disk = {version: on_disk[version]}
        if not on_disk:
            raise NotFound(f"model {name!r} has no complete version folder under {self.root}")
        loaded = self._models.get(name, {})
        fresh = {v: self._load(name, v, path, model_dir) for v, path in on_disk.items() if v not in loaded}
        self._swap(name, add=fresh)
        self._seen.setdefault(name, set()).update(on_disk)
        # Loaded files are no longer refused, and a new default may make refused versions of this
        # name compatible: the next poll considers them again.
        loaded_dirs = {m.path.parent for m in fresh.values()}
        self._failed = {p: f for p, f in self._failed.items()
                        if p.parent not in loaded_dirs and not (f[1] == "incompatible" and p.parent.parent == model_dir)}
        self._rejected = {f: r for f, r in self._rejected.items() if f not in loaded_dirs}
        return [fresh[v] for v in sorted(fresh)]

    def unload_model(self, name: str) -> list[LoadedModel]:
        """Take every version of ``name`` out of service; requests and sessions holding one finish on it."""
        self.model_dir(name)  # a valid name
        with self._changing:
            if name not in self._models:
                raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self._models) or 'none'}")
            return self._swap(name, remove_all=True)

    def poll(self) -> list[str]:
        """Load version folders that appeared since the last poll and drop versions whose folder
        went away. Failures are logged and retried only when the file changes. Returns what changed."""
        with self._changing:
            return self._poll()

    def _poll(self) -> list[str]:
        changes: list[str] = []
        rejected: dict[Path, tuple[str, str]] = {}  # this poll's refusals: replaces self._rejected at the end
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in names:
            try:
                model_dir = self.model_dir(name)
            except InvalidArgument as exc:
                reason = "outside" if NAME_PATTERN.match(name) else "name"
                self._refuse(rejected, self.root / name, name, reason, f"skipping folder {name!r}: {exc}")
                continue
            scan = scan_versions(model_dir, self.root)
            for folder, (reason, why) in scan.rejected.items():
                self._refuse(rejected, model_dir / folder, name, reason, f"skipping a folder of model {name}: {why}")
            on_disk = _complete(scan.versions)
            seen = self._seen.setdefault(name, set())
            was_serving = bool(self._models.get(name))  # else every valid version loads, the highest serves
            for version in sorted(set(on_disk) - seen):
                path = on_disk[version]
                stamp = _stamp(path)
                if (failed := self._failed.get(path)) and failed[0] == stamp:
                    rejected[path.parent] = (name, failed[1])
                    continue
                serving = self._models.get(name)
                default = serving[max(serving)] if was_serving and serving and version > max(serving) else None
                try:
                    model = self._load(name, version, path, model_dir, default)
                except ModelLoadError as exc:
                    reason = ("outside" if isinstance(exc, OutsideRepository) else
                              "incompatible" if isinstance(exc, IncompatibleVersion) else "load")
                    self._failed[path] = (stamp, reason)
                    rejected[path.parent] = (name, reason)
                    log.error("rejected %s version %d: %s", name, version, exc)
                    changes.append(f"rejected {name}/{version}")
                    continue
                self._failed.pop(path, None)
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
        self._rejected = rejected
        self._failed = {p: f for p, f in self._failed.items() if p.parent in rejected}  # forget removed files
        return changes

    def _refuse(self, rejected: dict[Path, tuple[str, str]], folder: Path, name: str, reason: str,
                message: str) -> None:
        """Note a folder refused by this poll; log it only when it was not already refused (once, not every poll)."""
        if self._rejected.get(folder) != (name, reason):
            log.warning("%s", message)
        rejected[folder] = (name, reason)

    # -- internals --------------------------------------------------------
    def _load(self, name: str, version: int, path: Path, model_dir: Path,
              default: LoadedModel | None = None) -> LoadedModel:
        """Load one version; ModelLoadError if it cannot serve, IncompatibleVersion if ``default`` (the
        version serving now, given only for an automatic promotion) takes or returns something else,
        OutsideRepository if its model file or the model's config.json resolves outside the repository
        (not a load failure: nothing was loaded)."""
        real = _inside(path, self.root)  # onnxruntime opens the file that was checked
        try:
            config = ModelConfig.read(model_dir, self.root)
            providers = (self.defaults.providers if config.device is None
                         else choose_providers(config.device, config.device_id or 0))
            model = load_model(name, version, path, providers, config.threads or self.defaults.threads,
                               config.limits(self.defaults.limits), source=real)
        except OutsideRepository:
            raise  # nothing was opened: a refusal (counted by rejected()), not a load failure
        except Exception as exc:  # noqa: BLE001 - whatever fails, this file is skipped and the rest carries on
            if (shortage := _fd_shortage(path, exc)) is not None:
                raise shortage from exc  # the process's fault, not the file's: not refused, tried again
            if self.metrics is not None:
                self.metrics.load_failures.labels(name).inc()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{path}: {exc}") from exc
        if default is not None and _interface(model) != _interface(default):
            raise IncompatibleVersion(
                f"{path} was not promoted over the default version {default.version}: it is "
                f"{_describe(model)}, while version {default.version} is {_describe(default)}, so every "
                f"running client of {name!r} would fail. If the change is meant, load it explicitly with the "
                f"admin LoadModel call (`batchrl models load {name} --version {version}`)")
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


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; OutsideRepository naming where it leads when that is outside ``root``."""
    try:
        return resolved_inside(path, root)
    except ValueError as exc:
        raise OutsideRepository(f"{exc}: refused, as symlinks leaving the repository are") from None


def _complete(versions: dict[int, Path]) -> dict[int, Path]:
    """{version: model file} of the version folders that hold their model file (written whole)."""
    return {v: folder / MODEL_FILE for v, folder in versions.items() if (folder / MODEL_FILE).is_file()}


def _fd_shortage(path: Path, failure: BaseException) -> OSError | None:
    """An OSError when ``failure``, of a load of ``path``, came from a want of file descriptors (EMFILE,
    ENFILE), not from the file: then the file must not be refused until it changes, as a bad one is, but
    tried again by the next poll. onnxruntime gives the errno only in its message; ModelConfig.read
    wraps the OSError."""
    chain = [failure]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(cause)
    for code in (errno.EMFILE, errno.ENFILE):
        if any(getattr(e, "errno", None) == code or f"system error number {code}" in str(e) for e in chain):
            return OSError(code, f"{os.strerror(code)} while loading {path}")
    return None


def _stamp(path: Path) -> tuple[float, int]:
    stat = path.stat()
    return stat.st_mtime, stat.st_size


def _interface(model: LoadedModel) -> tuple:
    """What a model's clients depend on: observation shape, action shape and kind of policy."""
    return model.observation_shape, model.action_shape, model.is_sequence


def _describe(model: LoadedModel) -> str:
    kind = "sequence" if model.is_sequence else "feed-forward"
    return (f"a {kind} policy taking observations of shape {list(model.observation_shape)} and returning "
            f"actions of shape {list(model.action_shape)}")
