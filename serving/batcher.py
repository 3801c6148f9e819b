"""The per-model batcher: concurrent requests for one model version run as one onnxruntime call.

Act requests and session Steps both go through it. It has no thread of its
own: a caller that finds the model idle runs everything queued (its own
request included) and scatters the results; callers that arrive meanwhile
queue, and the next of them to wake runs their requests together. A request
that finds nothing else queued therefore runs at once, with no added delay.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

Feeds = dict[str, np.ndarray]


class _Request:
    __slots__ = ("feeds", "rows", "result", "error", "done")

    def __init__(self, feeds: Feeds):
        self.feeds = feeds
        self.rows = len(next(iter(feeds.values())))
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False

    def output(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    """Gathers queued requests (up to ``max_rows`` rows per run, at least one request) into one run."""

    def __init__(self, run: Callable[[Feeds], np.ndarray], max_rows: int = 1024):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._run = run
        self.max_rows = max_rows
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._busy = False
        self.runs = 0            # model runs so far, and the requests they served: their ratio
        self.requests = 0        # is the mean batch size (in requests)

    def submit(self, feeds: Feeds) -> np.ndarray:
        """Run ``feeds`` (arrays sharing a leading batch axis) and return this request's output rows."""
        request = _Request(feeds)
        with self._cond:
            self._queue.append(request)
            while self._busy and not request.done:
                self._cond.wait()
            if request.done:
                return request.output()
            self._busy = True
        try:
            while True:
                with self._cond:
                    batch = self._take()
                self._execute(batch)
                with self._cond:
                    self._cond.notify_all()
                    if request.done:
                        break
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return request.output()

    def _take(self) -> list[_Request]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_rows:
            rows += self._queue[0].rows
            batch.append(self._queue.popleft())
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        self.runs += 1
        self.requests += len(batch)
        if len(batch) == 1:
            self._run_one(batch[0])
            return
        try:
            feeds = {k: np.concatenate([r.feeds[k] for r in batch]) for k in batch[0].feeds}
            out = self._run(feeds)
        except Exception:  # noqa: BLE001 - run them one by one so only a failing request fails
            for r in batch:
                self._run_one(r)
            return
        start = 0
        for r in batch:
            r.result, r.done = out[start:start + r.rows], True
            start += r.rows

    def _run_one(self, request: _Request) -> None:
        try:
            request.result = self._run(request.feeds)
        except Exception as exc:  # noqa: BLE001 - handed to the request's own caller
            request.error = exc
        request.done = True
