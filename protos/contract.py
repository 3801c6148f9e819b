"""Contract details that are not messages: the model repository layout and how the
manifest rides inside an ONNX file."""
from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import json_format

from protos.batchrl.v1 import manifest_pb2

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


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """{version: folder} for every integer-named folder in ``model_dir``, in numeric order."""
    if not model_dir.is_dir():
        return {}
    found = {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    return dict(sorted(found.items()))


# ONNX metadata_props key holding the manifest, as the JSON form of ModelManifest.
MANIFEST_KEY = "batchrl.manifest"


def manifest_to_json(manifest: manifest_pb2.ModelManifest) -> str:
    return json_format.MessageToJson(manifest, indent=None)


def manifest_from_json(text: str) -> manifest_pb2.ModelManifest:
    """Raises ValueError on text that is not a ModelManifest."""
    try:
        return json_format.Parse(text, manifest_pb2.ModelManifest())
    except json_format.ParseError as exc:
        raise ValueError(f"unreadable manifest: {exc}") from exc
