"""Contract details that are not messages: the model repository layout and how the
manifest rides inside an ONNX file."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from batchrl.protos.batchrl.v1 import manifest_pb2

# models/<name>/<integer version>/model.onnx: training writes it, serving reads it.
MODEL_FILE = "model.onnx"
# Model names: one path component that cannot reach outside the repository.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else ValueError saying what is allowed."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} is invalid: use letters, digits, '.', '_' or '-' "
                         "(at most 128, not starting with '.', '_' or '-')")
    return name


# Versions are plain ASCII integers 1 .. 2**63-1 without leading zeros: the wire carries them as int64, and
# one spelling per number means "007" and "7" cannot both claim version 7.
MAX_VERSION = 2**63 - 1
VERSION_PATTERN = re.compile(r"[1-9][0-9]*")  # [0-9], not \d or str.isdigit: those accept "²" and "٣"


@dataclass(frozen=True)
class VersionScan:
    """What a model folder holds: its valid version folders and the folders refused as versions."""

    versions: dict[int, Path]             # {version: folder}, in numeric order
    rejected: dict[str, tuple[str, str]]  # {folder name: (reason, why)}; reason is "name" or "outside"


def parse_version(name: str) -> int:
    """The version a folder called ``name`` holds; ValueError saying what is expected otherwise."""
    if not VERSION_PATTERN.fullmatch(name) or int(name) > MAX_VERSION:
        raise ValueError(f"folder name {name!r} is not a version: expected a plain integer from 1 to "
                         f"{MAX_VERSION} (ASCII digits, no leading zeros)")
    return int(name)


def scan_versions(model_dir: Path, root: Path | None = None) -> VersionScan:
    """Every version folder of ``model_dir`` and every folder refused as one (serving and export both list
    versions here, so they agree on what a version is).

    Only folders count (config.json and other files are not looked at). Names starting with '.' are
    skipped silently: export stages a version there before renaming it in. A folder whose name is not a
    valid version is refused with reason "name"; one that resolves outside ``root`` (default: the folder
    above ``model_dir``), through a symlink, with reason "outside", as model folders leaving the repository are.
    """
    if not model_dir.is_dir():
        return VersionScan({}, {})
    root = (model_dir.parent if root is None else Path(root)).resolve()
    found, rejected = {}, {}
    for folder in sorted(model_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            version = parse_version(folder.name)
        except ValueError as exc:
            rejected[folder.name] = ("name", str(exc))
            continue
        try:
            resolved_inside(folder, root)
        except ValueError as exc:
            rejected[folder.name] = ("outside", f"version folder {folder.name!r}: {exc}")
            continue
        found[version] = folder
    return VersionScan(dict(sorted(found.items())), rejected)


def resolved_inside(path: Path, root: Path) -> Path:
    """Where ``path`` really is (symlinks followed); ValueError saying where, when that is outside ``root``
    (resolved). The repository's one containment rule, for its folders and for every file it opens:
    a symlink may point anywhere inside the repository, never out of it."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ValueError(f"{path} resolves to {real}, outside the repository {root}")
    return real


def version_dirs(model_dir: Path, root: Path | None = None) -> dict[int, Path]:
    """{version: folder} for every valid version folder of ``model_dir``, in numeric order (see scan_versions)."""
    return scan_versions(model_dir, root).versions


# The largest message the server and its clients accept unless told otherwise (grpc's own default is 4 MiB:
# too small for a batch of 65,536 observations).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# ONNX metadata_props key holding the manifest, as the JSON form of ModelManifest.
MANIFEST_KEY = "batchrl.manifest"


def manifest_to_json(manifest: manifest_pb2.ModelManifest) -> str:
    return json_format.MessageToJson(manifest, indent=None)


def manifest_from_json(text: str) -> manifest_pb2.ModelManifest:
    """Raises ValueError on text that is not a ModelManifest.

    Fields this code does not know are ignored, not refused: during a rolling update a newer export
    (with fields added to manifest.proto) must still load on the older servers.
    """
    try:
        return json_format.Parse(text, manifest_pb2.ModelManifest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(f"unreadable manifest: {exc}") from exc
