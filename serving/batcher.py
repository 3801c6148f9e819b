"""The per-model batcher: concurrent requests for one model version run as one onnxruntime call.

Act requests and session Steps both go through it. It has no thread of its
own: a caller that finds the model idle becomes the runner, takes what is
queued (its own request first, up to ``max_rows`` rows), runs it and scatters
the results; callers that arrive meanwhile queue. When the runner is done it
hands the runner role to the oldest queued request, whose thread runs the next
batch. Every waiting thread is woken exactly once (its result is ready, or it
is the next runner), never by a broadcast to all waiters. A request that
finds nothing else queued runs at once;
when others are queued but the batch is not full, the runner waits up to
``max_delay`` (counted from the oldest queued request) for more.
The queue is bounded (QueueFull), and a request whose deadline has passed is
dropped (DeadlineExceeded) rather than run.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchrl.serving.errors import DeadlineExceeded, ResourceExhausted

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 1024        # most rows (observations, or session steps) one run gathers
    max_delay: float = 0.0005   # seconds a filling batch may wait for more requests
    max_queue: int = 1024       # most requests waiting for the model


class QueueFull(ResourceExhausted):
    """The model's queue holds its maximum number of requests."""


class _Request:
    __slots__ = ("feeds", "rows", "deadline", "arrived", "result", "error", "done", "wake")

    def __init__(self, feeds: Feeds, deadline: float | None):
        self.feeds = feeds
        self.rows = len(next(iter(feeds.values())))
        self.deadline = deadline
        self.arrived = time.monotonic()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False
        self.wake: threading.Lock | None = None  # held while the request waits; released once

    def output(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    def __init__(self, run: Callable[[Feeds], np.ndarray], limits: BatchLimits = BatchLimits(),
                 name: str = "model"):
        max_rows, max_delay, max_queue = limits.max_rows, limits.max_delay, limits.max_queue
        if max_rows < 1 or max_queue < 1:
            raise ValueError(f"max_rows and max_queue must be >= 1, got {max_rows} and {max_queue}")
        if not max_delay >= 0:
            raise ValueError(f"max_delay must be >= 0 seconds, got {max_delay}")
        self._run = run
        self.max_rows, self.max_delay, self.max_queue, self.name = max_rows, max_delay, max_queue, name
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # the runner waits here while a batch fills
        self._filling = False    # the runner is waiting on _arrival
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._busy = False       # a runner exists; invariant: not busy => queue empty
        self.runs = 0            # model runs so far and the requests they served: their ratio
        self.requests = 0        # is the mean batch size (in requests)
        self.observe: Callable[[int, int], None] | None = None  # (requests, rows) of every run

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, feeds: Feeds, deadline: float | None = None) -> np.ndarray:
        """Run ``feeds`` (arrays sharing a leading batch axis) and return this request's output rows.

        ``deadline`` is a time.monotonic() value after which the request is not worth running.
        """
        request = _Request(feeds, deadline)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"model {self.name} has {len(self._queue)} requests queued, its maximum; "
                                "retry later or raise max_queue")
            self._queue.append(request)
            self._queued_rows += request.rows
            if self._busy:
                request.wake = threading.Lock()
                request.wake.acquire()
                if self._filling:
                    self._arrival.notify()
            else:
                self._busy = True
        if request.wake is not None:
            request.wake.acquire()  # woken once: the result is ready, or this thread runs the next batch
            if request.done:
                return request.output()
        self._run_batch()  # this request heads the queue, so the batch includes it
        return request.output()

    def _run_batch(self) -> None:
        """As the runner: run one batch, wake its waiters, hand the role to the next queued request."""
        batch: list[_Request] = []
        try:
            with self._lock:
                self._fill()
                batch = self._take()
            self._execute(batch)
        finally:
            for r in batch:
                if not r.done:  # only if _execute itself was interrupted
                    r.error, r.done = RuntimeError("the batch was interrupted before it ran"), True
                if r.wake is not None:
                    r.wake.release()
            with self._lock:
                if self._queue:
                    self._queue[0].wake.release()  # queued while busy, so it waits on its wake lock
                else:
                    self._busy = False

    def _fill(self) -> None:
        """With others queued and room left, wait up to max_delay (from the oldest) for more."""
        if self.max_delay <= 0 or len(self._queue) < 2:
            return
        until = self._queue[0].arrived + self.max_delay
        self._filling = True
        try:
            while self._queued_rows < self.max_rows and (left := until - time.monotonic()) > 0:
                self._arrival.wait(left)
        finally:
            self._filling = False

    def _take(self) -> list[_Request]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_rows:
            rows += self._queue[0].rows
            batch.append(self._queue.popleft())
        self._queued_rows -= rows
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for r in batch:
            if r.deadline is not None and now > r.deadline:
                r.error, r.done = DeadlineExceeded("the request's deadline passed before the model ran it"), True
            else:
                live.append(r)
        if not live:
            return
        self.runs += 1
        self.requests += len(live)
        if self.observe is not None:
            self.observe(len(live), sum(r.rows for r in live))
        if len(live) == 1:
            self._run_one(live[0])
            return
        try:
            feeds = {k: np.concatenate([r.feeds[k] for r in live]) for k in live[0].feeds}
            out = self._run(feeds)
        except Exception:  # noqa: BLE001 - run them one by one so only a failing request fails
            for r in live:
                self._run_one(r)
            return
        start = 0
        for r in live:
            r.result, r.done = out[start:start + r.rows], True
            start += r.rows

    def _run_one(self, request: _Request) -> None:
        try:
            request.result = self._run(request.feeds)
        except Exception as exc:  # noqa: BLE001 - handed to the request's own caller
            request.error = exc
        request.done = True
