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
counted. Retention deletes only regular files named like a shard (``SHARD_NAME``): a folder or a
symbolic link with such a name is left alone, never followed. A write that fails (full disk,
unwritable folder, no file descriptor left) is logged and counted, its rows are dropped and
counted, and serving goes on; the next shard tries again. No error ends the writer (a dead writer
would lose every later row and hang the drain): a failed retention pass, or anything unforeseen, is
counted and logged once per kind, and the writer goes on. ``close`` never blocks past its timeout,
and counts the rows it could not write.

Imports pyarrow (the `experience` extra): only a server started with --log-experience loads it.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import re
import socket
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from batchrl.errors import UserError
from batchrl.protos import experience as contract

log = logging.getLogger(__name__)

_STOP = object()  # wakes the writer at close
# A shard of any series (any host, process, worker, start): what retention may delete.
SHARD_NAME = re.compile(re.escape(contract.SHARD_PREFIX) + r".+-\d+-\d{8}T\d{6}Z-\d{6}" +
                        re.escape(contract.SHARD_SUFFIX))
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
        self._rows: list[tuple] = []  # collected by the writer for the next shard
        self._size, self._oldest = 0, 0.0  # their estimated bytes; when the first of them came (monotonic)
        self.dropped = 0  # rows lost (buffer full, a failed write, close), as counted in the metrics too
        # per stage (write, retention, writer), the kinds of error logged since it last worked: each logged once
        self._logged: dict[str, set[str]] = {"write": set(), "retention": set(), "writer": set()}
        self._skipped_logged = False  # a folder or link named like a shard was reported
        self._closing = threading.Event()  # close() began: the writer writes what it has and ends
        self._closed = False  # close() returned: rows that still come are counted as dropped
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="batchrl-experience-writer", daemon=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # reported and counted like any failed write; serving goes on
            self._failed("write", "create the folder", exc)
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
        if self._closed:
            self._drop(1, "closed")
            return
        try:
            self.buffer.put_nowait(row)
        except queue.Full:
            self._drop(1, "buffer_full")
            return
        if self._closed:  # close() may have emptied the buffer just before this row came
            self._discard_buffer("closed")

    # -- the drain ------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Write every row received so far, then stop the writer (the server's drain calls it once no
        request runs any more). Returns within ``timeout`` whatever the disk does; the rows it could not
        write are counted as dropped."""
        if self._closed:
            return
        self._closing.set()
        try:
            self.buffer.put_nowait(_STOP)  # wakes a writer waiting for rows (a full buffer wakes it anyway)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._closed = True
        if self._thread.is_alive():  # a hung disk: what it holds and what waits for it are lost
            lost = len(self._rows) + self._discard_buffer(None)
            self._drop(lost, "close_timeout")
            log.error("the experience writer did not finish within %g s; %d row(s) still waiting are lost "
                      "(%d row(s) dropped in all)", timeout, lost, self.dropped)
            return
        self._discard_buffer("closed")  # rows of calls cut off by the drain that came after the writer's end
        log.info("experience log closed: %d shard(s) written, %d row(s) dropped", self.shards, self.dropped)

    def _discard_buffer(self, reason: str | None) -> int:
        """Empty the buffer; count its rows as dropped for ``reason`` (None: the caller counts them)."""
        rows = 0
        while True:
            try:
                rows += self.buffer.get_nowait() is not _STOP
            except queue.Empty:
                break
        if rows and reason is not None:
            self._drop(rows, reason)
        return rows

    # -- the writer thread ------------------------------------------------------------
    def _write_loop(self) -> None:
        done = False
        while not done:
            try:
                done = self._collect()
            except Exception as exc:  # noqa: BLE001 - nothing unforeseen may end the writer: counted, it goes on
                self._failed("writer", "collect rows", exc)
                self._drop(len(self._rows), "write_error")
                self._rows, self._size = [], 0
                time.sleep(0.1)  # an error that repeats at once must not spin

    def _collect(self) -> bool:
        """Take the next row (waiting at most until the rows held are due), write a shard when one is due;
        at close, every row in the buffer. True once closed."""
        wait = None if not self._rows else max(0.0, self._oldest + self.flush_seconds - time.monotonic())
        if self._closing.is_set():  # (close() may have found no room for _STOP)
            wait = 0.0
        try:
            row = self.buffer.get(timeout=wait)
        except queue.Empty:
            row = None
        if self._closing.is_set():
            while row is not None:
                self._add(row)
                try:
                    row = self.buffer.get_nowait()
                except queue.Empty:
                    row = None
            self._flush()
            return True
        if row is not None:
            self._add(row)
        if self._rows and time.monotonic() - self._oldest >= self.flush_seconds:
            self._flush()
        return False

    def _add(self, row) -> None:
        if row is _STOP:
            return
        if not self._rows:
            self._oldest = time.monotonic()
        self._rows.append(row)
        self._size += ROW_OVERHEAD + 4 * (row[2].size + (0 if row[3] is None else row[3].size))
        if self._size >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        rows = self._rows
        if not rows:
            return
        name = f"{self.series}-{self._sequence:06d}{contract.SHARD_SUFFIX}"
        self._sequence += 1  # a failed attempt's name is not reused
        try:
            self._write(rows, name)
        except Exception as exc:  # noqa: BLE001 - a full disk, a removed folder, EMFILE...: counted, serving goes on
            self._failed("write", f"write shard {name}", exc)
            self._drop(len(rows), "write_error")
            return
        finally:
            self._rows, self._size = [], 0
        self.shards += 1
        self._recovered("write", f"writing again ({name})")
        if self.metrics is not None:
            self.metrics.experience_rows.inc(len(rows))
            self.metrics.experience_shards.inc()
        try:
            self._retain()
        except Exception as exc:  # noqa: BLE001 - the folder cannot be listed (EMFILE, EACCES...): next shard retries
            self._failed("retention", "list the shards", exc)

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
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not SHARD_NAME.fullmatch(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # another process's retention took it
                    continue
                if not stat.S_ISREG(info.st_mode):  # a folder or a link is nobody's shard: left alone, not followed
                    if not self._skipped_logged:
                        log.warning("experience log: %s in %s is named like a shard but is not a regular file; "
                                    "retention leaves it (and any other such) alone", entry.name, self.directory)
                        self._skipped_logged = True
                    continue
                shards.append((info.st_mtime, info.st_size, entry.name))
        shards.sort()
        total = sum(size for _, size, _ in shards)
        cutoff = time.time() - self.retention_seconds
        failed = False
        for mtime, size, name in shards:
            reason = "age" if mtime < cutoff else "disk_cap" if total > self.max_bytes else None
            if reason is None:
                continue
            try:
                os.unlink(self.directory / name)  # never follows a link (one that took the file's place since)
            except FileNotFoundError:  # another process's retention took it
                pass
            except OSError as exc:  # counted; the other shards are still tried
                self._failed("retention", f"delete {name}", exc)
                failed = True
                continue
            total -= size
            if self.metrics is not None:
                self.metrics.experience_shards_deleted.labels(reason).inc()
        if not failed:
            self._recovered("retention", "retention works again")

    # -- accounting -------------------------------------------------------------------
    def _drop(self, rows: int, reason: str) -> None:
        with self._lock:
            self.dropped += rows
        if self.metrics is not None:
            self.metrics.experience_dropped.labels(reason).inc(rows)

    def _failed(self, stage: str, what: str, exc: Exception) -> None:
        """Count a failure of ``stage`` (write, retention, writer) and log it once per kind until the stage
        works again (no traceback: the error's line says it; an unforeseen one gets its traceback once)."""
        reason = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
        if self.metrics is not None:
            counter = self.metrics.experience_errors
            if stage == "retention":  # no row is lost: a counter of its own
                counter = self.metrics.experience_retention_errors
            counter.labels(reason).inc()
        if reason in self._logged[stage]:  # once per kind, not once per shard
            return
        self._logged[stage].add(reason)
        if stage == "retention":
            log.error("experience log: cannot %s in %s: %s; counted (batchrl_experience_retention_errors), the "
                      "writer goes on", what, self.directory, exc)
        else:
            log.error("experience log: cannot %s in %s: %s; its rows are dropped and counted "
                      "(batchrl_experience_rows_dropped), serving goes on", what, self.directory, exc,
                      exc_info=stage == "writer")

    def _recovered(self, stage: str, message: str) -> None:
        if self._logged[stage]:
            log.info("experience log: %s", message)
            self._logged[stage].clear()
