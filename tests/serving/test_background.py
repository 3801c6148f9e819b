"""The server's background loops outlive failures of what they call (issue 31, item 10's rule for every
background thread; the sweeper, the poller and the experience writer have black-box tests of their own)."""
from __future__ import annotations

import logging
import threading
import time

from batchrl.serving.background import every


def test_a_loop_outlives_failing_passes_and_logs_each_kind_once(caplog):
    passes, stop = [], threading.Event()

    def work():
        passes.append(time.monotonic())
        if len(passes) <= 6:  # six failures of two kinds, then passes that work
            raise (OSError if len(passes) % 2 else KeyError)("what it calls failed")

    with caplog.at_level(logging.ERROR, logger="batchrl.serve"):
        thread = every(0.01, stop, "test-loop", work)
        deadline = time.monotonic() + 10
        while len(passes) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        thread.join(5)
    assert len(passes) >= 12, "the loop stopped after a failed pass"
    assert not thread.is_alive()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert sorted(r.exc_info[0].__name__ for r in tracebacks) == ["KeyError", "OSError"]  # once per kind
