"""The installed batchrl version (both sides report it: training in its run files, serving in metadata)."""
from __future__ import annotations


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchrl")
    except PackageNotFoundError:
        return "0+unknown"
