"""Waiting for SIGINT/SIGTERM in a server's main thread, safely.

The signals arrive as bytes on a pipe (``signal.set_wakeup_fd``) and the Python
handlers do nothing. The obvious ``signal.signal(SIGTERM, lambda *_: event.set())``
can deadlock: a second signal that lands while the main thread holds that
Event's internal lock (waking from ``event.wait()``) runs a handler that waits
for the same lock, in the same thread, forever.
"""
from __future__ import annotations

import os
import select
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Install in the main thread before serving; ``wait()`` returns the first stop signal."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: None)

    def wait(self, timeout: float | None = None) -> signal.Signals | None:
        """The first stop signal, or None when ``timeout`` seconds pass without one."""
        while True:
            if timeout is not None and not select.select([self._read], [], [], timeout)[0]:
                return None
            number = os.read(self._read, 1)[0]
            if number in STOP_SIGNALS:
                return signal.Signals(number)
