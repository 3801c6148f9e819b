"""Regenerate the Python modules of protos/batchrl/v1 from the .proto files.

    python -m batchrl.protos.generate          # rewrite the committed modules
    python -m batchrl.protos.generate --check  # exit 1 if they are out of date

protoc emits imports rooted at the proto path (``from batchrl.v1 import ...``);
the one rewrite is the namespace: the folder protos/ installs as ``batchrl.protos``,
so they become ``from batchrl.protos.batchrl.v1 import ...``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from importlib.metadata import version as dist_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GRPC_TOOLS_VERSION = "1.81.1"


def generate(out_dir: Path, root: Path = ROOT) -> dict[str, str]:
    """Run protoc into ``out_dir`` and return {file name: fixed source}."""
    from grpc_tools import protoc

    version = dist_version("grpcio-tools")
    if version != GRPC_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools {version} found; code generation is pinned to {GRPC_TOOLS_VERSION}")
    include = str(Path(protoc.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(root)) for p in (root / "batchrl" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    sources = {}
    for path in sorted((out_dir / "batchrl" / "v1").glob("*.py*")):
        text = path.read_text()
        text = re.sub(r"^from batchrl\.v1 import", "from batchrl.protos.batchrl.v1 import", text, flags=re.M)
        text = re.sub(r"^import batchrl\.v1\.(\w+) as", r"from batchrl.protos.batchrl.v1 import \1 as", text,
                      flags=re.M)
        sources[path.name] = text
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed modules")
    parser.add_argument("--root", type=Path, default=ROOT, help="the protos folder (default: this package's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sources = generate(Path(tmp), args.root)
    proto_dir = args.root / "batchrl" / "v1"
    stale = [name for name, text in sources.items()
             if not (proto_dir / name).exists() or (proto_dir / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"out of date: protos/batchrl/v1/{name} (run: python -m batchrl.protos.generate)")
        return 1 if stale else 0
    for name in stale:
        (proto_dir / name).write_text(sources[name])
        print(f"wrote protos/batchrl/v1/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
