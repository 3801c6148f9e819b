"""Server logging: plain text for people, or one JSON object per line for log pipelines."""
from __future__ import annotations

import json
import logging
import threading
import time


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger"[, "worker"], "message"[, "exception"]} per record, UTC RFC 3339 times."""

    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name,
            **({} if self.worker is None else {"worker": self.worker}), "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(fmt: str = "text", level: int = logging.INFO, worker: int | None = None) -> None:
    """``worker``: this process's index among `batchrl serve --workers N`'s, shown on every line."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler()
    tag = "" if worker is None else f"[worker {worker}]"
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else
                         logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RateLimitedLog:
    """At most one line per ``interval`` seconds per key; the lines held back are counted into the next.

    For events a client can cause at will (undecodable requests, a request that finds a bug of the
    server): the log stays readable and a client cannot flood it.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock=time.monotonic):
        self.logger, self.interval, self._clock = logger, interval, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def info(self, key: str, message: str, *args) -> None:
        self._log(logging.INFO, key, message, args)

    def warning(self, key: str, message: str, *args) -> None:
        self._log(logging.WARNING, key, message, args)

    def exception(self, key: str, message: str, *args) -> None:
        """An error with the traceback of the exception being handled: call it in an ``except`` block."""
        self._log(logging.ERROR, key, message, args, exc_info=True)

    def _log(self, level: int, key: str, message: str, args: tuple, exc_info: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if now - self._last.get(key, -self.interval) < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._last[key], held = now, self._held.pop(key, 0)
        suffix = f" (and {held} more like it in the last {self.interval:g} s)" if held else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
