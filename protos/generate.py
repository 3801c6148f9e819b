"""Regenerate the Python modules of protos/batchrl/v1 from the .proto files.

    python -m protos.generate          # rewrite the committed modules
    python -m protos.generate --check  # exit 1 if they are out of date

protoc emits imports rooted at the proto path (``from batchrl.v1 import ...``);
they are rewritten to ``protos.batchrl.v1`` so they resolve inside the installed
package and never collide with the ``batchrl`` command package.
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
PROTO_DIR = ROOT / "batchrl" / "v1"
GRPC_TOOLS_VERSION = "1.81.1"


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc into ``out_dir`` and return {file name: fixed source}."""
    from grpc_tools import protoc

    version = dist_version("grpcio-tools")
    if version != GRPC_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools {version} found; code generation is pinned to {GRPC_TOOLS_VERSION}")
    include = str(Path(protoc.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    sources = {}
    for path in sorted((out_dir / "batchrl" / "v1").glob("*.py*")):
        text = path.read_text()
        text = re.sub(r"^from batchrl\.v1 import", "from protos.batchrl.v1 import", text, flags=re.M)
        text = re.sub(r"^import batchrl\.v1\.(\w+) as", r"from protos.batchrl.v1 import \1 as", text, flags=re.M)
        sources[path.name] = text
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed modules")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sources = generate(Path(tmp))
    stale = [name for name, text in sources.items()
             if not (PROTO_DIR / name).exists() or (PROTO_DIR / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"out of date: protos/batchrl/v1/{name} (run: python -m protos.generate)")
        return 1 if stale else 0
    for name in stale:
        (PROTO_DIR / name).write_text(sources[name])
        print(f"wrote protos/batchrl/v1/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
