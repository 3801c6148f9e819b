"""Contract details that are not messages: how the manifest rides inside an ONNX file."""
from __future__ import annotations

from google.protobuf import json_format

from protos.batchrl.v1 import manifest_pb2

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
