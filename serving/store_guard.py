"""The guard around every call to a shared session store, so that a store that hangs (a stopped
Redis: connections open, nothing answers) cannot take the server's gRPC threads with it.

- A short timeout per call (the store's own client applies it: serve --store-timeout).
- A bounded number of calls in flight: a thread that would wait on the store beyond the cap is
  refused at once, so the threads left answer health, Act and everything else.
- A circuit breaker: after ``failures`` consecutive failed calls it opens and refuses every call
  at once for ``cooldown`` seconds; then one call goes through as a probe (half-open): its success
  closes the breaker, its failure opens it again for another cool-down.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

BREAKER_OPEN, IN_FLIGHT_CAP = "breaker_open", "in_flight_cap"  # why a call was refused (metric labels)


@dataclass(frozen=True)
class GuardLimits:
    max_in_flight: int = 32     # store calls waiting on the store at once; below --grpc-threads (serve: half)
    failures: int = 5           # consecutive failed calls that open the breaker
    cooldown: float = 2.0       # seconds the open breaker refuses every call before one probe goes through

    def check(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--store-max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.failures < 1:
            raise ValueError(f"--store-breaker-failures must be >= 1, got {self.failures}")
        if not self.cooldown > 0:
            raise ValueError(f"--store-breaker-cooldown must be > 0 seconds, got {self.cooldown}")


class Refused(Exception):
    """The guard refused the call without sending it to the store; ``reason`` is BREAKER_OPEN or IN_FLIGHT_CAP."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StoreGuard:
    """Runs store calls under the in-flight cap and the breaker (see the module's docstring).
    ``failure``: the exceptions that mean the store is down or hung; any other exception means the
    store answered (an error reply), which counts as a success."""

    def __init__(self, limits: GuardLimits, failure: tuple[type[BaseException], ...],
                 on_change: Callable[[bool], None] | None = None, clock: Callable[[], float] = time.monotonic):
        """``on_change(opened)``: told when the breaker opens after being closed, and when it closes."""
        limits.check()
        self.limits, self._failure, self._clock = limits, failure, clock
        self._on_change = on_change
        self._slots = threading.BoundedSemaphore(limits.max_in_flight)
        self._lock = threading.Lock()
        self._failed = 0                      # consecutive failures
        self._opened_at: float | None = None  # when the breaker last opened; None: closed
        self._probing = False                 # a half-open probe is in flight

    @property
    def open(self) -> bool:
        return self._opened_at is not None

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        probe = self._admit()
        if not self._slots.acquire(blocking=False):
            if probe:
                with self._lock:
                    self._probing = False  # the next call probes instead
            raise Refused(IN_FLIGHT_CAP)
        try:
            result = fn(*args, **kwargs)
        except self._failure:
            self._settle(False, probe)
            raise
        except BaseException:
            self._settle(True, probe)  # the store answered, with an error of its own
            raise
        else:
            self._settle(True, probe)
            return result
        finally:
            self._slots.release()

    def _admit(self) -> bool:
        """Whether this call is the half-open probe; Refused while the breaker is open."""
        with self._lock:
            if self._opened_at is None:
                return False
            if self._probing or self._clock() - self._opened_at < self.limits.cooldown:
                raise Refused(BREAKER_OPEN)
            self._probing = True
            return True

    def _settle(self, ok: bool, probe: bool) -> None:
        with self._lock:
            was_open = self._opened_at is not None
            if probe:
                self._probing = False
            if ok:
                self._failed, self._opened_at = 0, None
            else:
                self._failed += 1
                # A failed probe, or enough failures in a row: (re)open, and the cool-down starts now.
                if probe or self._failed >= self.limits.failures:
                    self._opened_at = self._clock()
            changed = was_open != (self._opened_at is not None)
        if changed and self._on_change is not None:
            self._on_change(not was_open)
