"""The model repository: models/<name>/<integer version>/model.onnx, loaded at start."""
from __future__ import annotations

import logging
from pathlib import Path

from protos.contract import MODEL_FILE, version_dirs
from serving.runtime import LoadedModel, load_model

log = logging.getLogger(__name__)


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """{name: {version: model path}} for every complete version folder under ``root``."""
    found: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} does not exist")
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = {v: folder / MODEL_FILE for v, folder in version_dirs(model_dir).items()
                    if (folder / MODEL_FILE).is_file()}
        if versions:
            found[model_dir.name] = versions
    return found


class Registry:
    """Loaded models by name and version; the highest version serves by default."""

    def __init__(self, models: dict[str, dict[int, LoadedModel]]):
        self.models = models

    @classmethod
    def load(cls, root: str | Path, providers: list, threads: int = 1, max_batch_rows: int = 1024) -> "Registry":
        models: dict[str, dict[int, LoadedModel]] = {}
        for name, versions in scan(Path(root)).items():
            for version, path in versions.items():
                try:
                    model = load_model(name, version, path, providers, threads, max_batch_rows)
                except ValueError as exc:
                    log.error("skipping %s version %d: %s", name, version, exc)
                    continue
                models.setdefault(name, {})[version] = model
                log.info("loaded %s version %d (%s) on %s", name, version, model.manifest.algorithm,
                         ", ".join(model.providers))
        return cls(models)

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        versions = self.models.get(name)
        if not versions:
            raise LookupError(f"model {name!r} is not loaded; loaded models: {sorted(self.models) or 'none'}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise LookupError(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        return versions[version]
