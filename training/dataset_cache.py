"""A dataset held once per machine: flat arrays converted once into .npy files and mapped read-only.

Every trainer, sweep trial and data-parallel rank on a machine maps the same files, so the operating
system keeps one copy of the data in its page cache however many processes train on it (samplers
normalise per batch instead of keeping a private normalised copy).

Layout, under the cache root ($BATCHRL_CACHE, else $XDG_CACHE_HOME/batchrl, else ~/.cache/batchrl):

    datasets/<name>-<key>/        one converted dataset: <array>.npy files and meta.json
    datasets/.<name>-<key>.lock   held while it is converted (other processes wait on it)

``key`` is the source's identity: a hash of the converter's format version, the name, size and
modification time of every file of the source and the bytes of its metadata file. Changing the source
(a new version of a dataset, a rewrite in place) makes a new entry; entries are never rewritten. An
entry is written in a hidden folder beside its place and renamed in when complete, so a reader never
sees half an entry and a conversion killed midway leaves only a hidden folder (removed by the next one).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

CACHE_ENV = "BATCHRL_CACHE"
FORMAT = 1  # the converter's output format: part of every key, so a change of format makes new entries
META = "meta.json"


def cache_root() -> Path:
    """Where converted datasets live: $BATCHRL_CACHE, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchrl"


def source_key(source: Path, metadata_file: str = "metadata.json") -> str:
    """The identity of a dataset folder: its files' names, sizes and modification times, and the bytes of
    its metadata file (16 hex digits of a SHA-256)."""
    digest = hashlib.sha256(f"batchrl-dataset-cache {FORMAT}\n".encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    meta = source / metadata_file
    if meta.is_file():
        digest.update(meta.read_bytes())
    return digest.hexdigest()[:16]


def entry(name: str, source: Path, convert: Callable[[Path], None]) -> Path:
    """The cache folder of ``source`` (called ``name`` in messages), converted by ``convert(folder)`` first
    if no process has done it yet. Concurrent callers convert once: the others wait on the lock."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"
    root = cache_root() / "datasets"
    key = source_key(source)
    final = root / f"{slug}-{key}"
    if (final / META).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{slug}-{key}.lock", "w")
    except OSError as exc:
        raise OSError(f"cannot write the dataset cache {root} ({exc.strerror}); point {CACHE_ENV} at a "
                      "writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / META).is_file():  # converted by another process while this one waited
            return final
        for stale in root.glob(f".{slug}-{key}.tmp*"):  # left by a conversion that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{slug}-{key}.tmp", dir=root))
        try:
            convert(staging)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


class Writer:
    """Writes one entry's arrays: ``array`` creates a .npy file mapped for writing, ``save`` a small one,
    ``finish`` flushes them and writes meta.json (the mark of a complete entry, renamed in last)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.open: list[np.memmap] = []

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        out = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.open.append(out)
        return out

    def save(self, name: str, value: np.ndarray) -> None:
        np.save(self.folder / f"{name}.npy", value)

    def finish(self, meta: dict) -> None:
        for out in self.open:
            out.flush()
        self.open.clear()
        (self.folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def read(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """An entry's arrays, mapped read-only (no copy), and its meta.json."""
    arrays = {path.stem: np.load(path, mmap_mode="r") for path in sorted(folder.glob("*.npy"))}
    return arrays, json.loads((folder / META).read_text())
