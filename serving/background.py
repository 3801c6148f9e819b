"""The server's periodic background work (stream reaper, live metrics, memory trim) as threads that no
failure of what they call can end.

A pass that raises is logged with its traceback at most once a minute per kind of exception (the
lines held back are counted into the next), and the next pass runs on time: a background thread that
died would leave the server serving without it, silently (streams never reaped, gauges frozen).
The session sweeper and the repository poller keep loops of their own, because their failures have
a cause worth naming (a store outage, a shortage of file descriptors), but follow the same rule.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from batchrl.serving.logs import RateLimitedLog

log = logging.getLogger("batchrl.serve")
FAILURE_LOG_INTERVAL = 60.0  # seconds between two tracebacks of the same kind from one loop


def every(interval: float, stop: threading.Event, name: str, work: Callable[[], object],
          failures: RateLimitedLog | None = None) -> threading.Thread:
    """Run ``work()`` every ``interval`` seconds in a daemon thread named ``name`` until ``stop`` is set."""
    failures = failures or RateLimitedLog(log, FAILURE_LOG_INTERVAL)

    def run() -> None:
        while not stop.wait(interval):
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - one failed pass must not end the loop
                failures.exception(type(exc).__qualname__, "%s: a pass failed; the next one runs in %g s",
                                   name, interval)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
