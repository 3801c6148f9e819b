"""The experience log (`batchrl serve --log-experience DIR`): every answered session step and every
episode end, as Parquet shards that `batchrl data import` turns into a Minari dataset.

Rows follow protos/experience.py. A request thread only appends a row to a bounded in-memory
buffer (``put_nowait``: when the buffer is full the row is dropped and counted, a request never
waits for the disk). One writer thread per server process collects rows and writes a shard when
the oldest row waiting is ``flush_seconds`` old, when the rows waiting reach ``shard_bytes``, and
at close (the server's drain). Each shard is a complete Parquet file written under a hidden name,
fsync'd and renamed into place, readable by the server's user only (mode 0600, folder 0700): a
SIGKILL loses at most the rows of the last ``flush_seconds`` (and those in the buffer), never a
written shard. After each shard, shards older than ``retention_seconds`` are deleted, then the
oldest until all of them (every process's, in this folder) fit in ``max_bytes``; each deletion is
counted. A write that fails (full disk, unwritable folder) is logged and counted, its rows are
dropped and counted, and serving goes on; the next shard tries again.

Imports pyarrow (the `experience` extra): only a server started with --log-experience loads it.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from batchrl.errors import UserError
from batchrl.protos import experience as contract

log = logging.getLogger(__name__)

_STOP = object()
ROW_OVERHEAD = 96  # bytes a row costs beyond its observation and action floats (ids, names, numbers)


class ExperienceLog:
    def __init__(self, directory: str | Path, flush_seconds: float = 10.0, shard_bytes: int = 64 * 2**20,
                 buffer_rows: int = 65_536, retention_seconds: float = 7 * 86_400.0, max_bytes: int = 10 * 2**30,
                 metrics=None):
        for name, value in (("flush interval", flush_seconds), ("retention", retention_seconds)):
            if not value > 0:
                raise UserError(f"experience log: the {name} must be > 0 seconds, got {value}")
        for name, value in (("shard size", shard_bytes), ("buffer", buffer_rows), ("disk cap", max_bytes)):
            if value < 1:
                raise UserError(f"experience log: the {name} must be >= 1, got {value}")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--log-experience needs pyarrow: pip install 'batchrl[experience]'") from None
        self.directory = Path(directory)
        self.flush_seconds, self.shard_bytes = flush_seconds, shard_bytes
        self.retention_seconds, self.max_bytes = retention_seconds, max_bytes
        self.metrics = metrics
        self.buffer: queue.Queue = queue.Queue(maxsize=buffer_rows)
        self.series = (f"{contract.SHARD_PREFIX}{socket.gethostname()}-{os.getpid()}-"
                       f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}")
        self.shards = 0  # written
        self._sequence = 0  # the next shard's number
        self.dropped = 0  # rows lost (buffer full or a failed write), as counted in the metrics too
        self._error: str | None = None  # the kind of the last write error logged, to log each new kind once
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="batchrl-experience-writer", daemon=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # reported and counted like any failed write; serving goes on
            self._failed("create the folder", exc)
        self._thread.start()
        log.info("logging experience to %s (a shard at least every %g s; series %s)", self.directory,
                 flush_seconds, self.series)

    # -- request threads: never block ----------------------------------------------
    def step(self, session_id: str, model: str, version: int, index: int, observation: np.ndarray,
             action: np.ndarray, reward: float | None) -> None:
        self._put((session_id, index, observation, action, reward, None, model, version, time.time()))

    def end(self, session_id: str, model: str, version: int, index: int, observation: np.ndarray,
            reward: float | None, ending: str) -> None:
        self._put((session_id, index, observation, None, reward, ending, model, version, time.time()))

    def _put(self, row: tuple) -> None:
        try:
            self.buffer.put_nowait(row)
        except queue.Full:
            self._drop(1, "buffer_full")

    # -- the drain ------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Write every row received so far, then stop the writer (the server's drain calls it once no
        request runs any more)."""
        self.buffer.put(_STOP)  # blocks only while the buffer is full, which the writer empties
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the experience writer did not finish within %g s; rows still waiting are lost", timeout)
        else:
            log.info("experience log closed: %d shard(s) written, %d row(s) dropped", self.shards, self.dropped)

    # -- the writer thread ------------------------------------------------------------
    def _write_loop(self) -> None:
        rows: list[tuple] = []
        size, oldest = 0, 0.0
        while True:
            wait = None if not rows else max(0.0, oldest + self.flush_seconds - time.monotonic())
            try:
                row = self.buffer.get(timeout=wait)
            except queue.Empty:
                row = None
            if row is _STOP:
                self._flush(rows)
                return
            if row is not None:
                if not rows:
                    oldest = time.monotonic()
                rows.append(row)
                size += ROW_OVERHEAD + 4 * (row[2].size + (0 if row[3] is None else row[3].size))
            if rows and (size >= self.shard_bytes or time.monotonic() - oldest >= self.flush_seconds):
                self._flush(rows)
                rows, size = [], 0

    def _flush(self, rows: list[tuple]) -> None:
        if not rows:
            return
        name = f"{self.series}-{self._sequence:06d}{contract.SHARD_SUFFIX}"
        self._sequence += 1  # a failed attempt's name is not reused
        try:
            self._write(rows, name)
        except Exception as exc:  # noqa: BLE001 - a full disk, a removed folder...: counted, serving goes on
            self._failed(f"write shard {name}", exc)
            self._drop(len(rows), "write_error")
            return
        self.shards += 1
        if self._error is not None:
            log.info("experience log: writing again (%s)", name)
            self._error = None
        if self.metrics is not None:
            self.metrics.experience_rows.inc(len(rows))
            self.metrics.experience_shards.inc()
        self._retain()

    def _write(self, rows: list[tuple], name: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(zip(*rows))
        flat = lambda a: None if a is None else np.asarray(a, np.float32).reshape(-1)  # noqa: E731
        table = pa.table({
            "session_id": pa.array(columns[0], pa.string()),
            "step": pa.array(columns[1], pa.int64()),
            "observation": pa.array([flat(a) for a in columns[2]], pa.list_(pa.float32())),
            "action": pa.array([flat(a) for a in columns[3]], pa.list_(pa.float32())),
            "reward": pa.array(columns[4], pa.float64()),
            "ending": pa.array(columns[5], pa.string()),
            "model": pa.array(columns[6], pa.string()),
            "version": pa.array(columns[7], pa.int64()),
            "time": pa.array((np.asarray(columns[8]) * 1e6).astype(np.int64), pa.timestamp("us", tz="UTC")),
        }, schema=contract.schema())
        staging = self.directory / f".{name}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                pq.write_table(table, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, self.directory / name)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise

    def _retain(self) -> None:
        """Delete shards past the retention age, then the oldest until the rest fit the disk cap."""
        shards = []
        for path in self.directory.glob(f"{contract.SHARD_PREFIX}*{contract.SHARD_SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process's retention took it
                continue
            shards.append((stat.st_mtime, stat.st_size, path))
        shards.sort()
        total = sum(size for _, size, _ in shards)
        cutoff = time.time() - self.retention_seconds
        for mtime, size, path in shards:
            reason = "age" if mtime < cutoff else "disk_cap" if total > self.max_bytes else None
            if reason is None:
                continue
            path.unlink(missing_ok=True)
            total -= size
            if self.metrics is not None:
                self.metrics.experience_shards_deleted.labels(reason).inc()

    # -- accounting -------------------------------------------------------------------
    def _drop(self, rows: int, reason: str) -> None:
        with self._lock:
            self.dropped += rows
        if self.metrics is not None:
            self.metrics.experience_dropped.labels(reason).inc(rows)

    def _failed(self, what: str, exc: Exception) -> None:
        reason = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        if self.metrics is not None:
            self.metrics.experience_errors.labels(reason).inc()
        if reason != self._error:  # once per new kind of error, not once per shard
            log.error("experience log: cannot %s in %s: %s; its rows are dropped and counted "
                      "(batchrl_experience_rows_dropped), serving goes on", what, self.directory, exc)
            self._error = reason
