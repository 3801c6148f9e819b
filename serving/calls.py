"""One RPC's outcome for every protocol the server speaks: the guard that answers the typed errors
of serving/errors.py with their status, and counts and times every call (or stream message)."""
from __future__ import annotations

import logging
import time

import grpc

from batchrl.serving.errors import ServingError
from batchrl.serving.logs import RateLimitedLog

log = logging.getLogger("batchrl.serve")
MAX_DETAILS = 1024  # characters of an error message: details travel in metadata, which has a size limit
# A request that finds a bug can be sent again and again: its traceback is logged at most once per
# interval per (RPC, exception type), with a count of the ones held back. One per process, like the
# logger it writes to: every service's guard shares it.
_bug_log = RateLimitedLog(log)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock, if the client set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Call:
    """One RPC (or one message of a stream) for logs and metrics: its name, its model once known."""

    __slots__ = ("rpc", "model", "start")

    def __init__(self, rpc: str):
        self.rpc, self.model, self.start = rpc, "", time.perf_counter()


def guarded(context: grpc.ServicerContext, call: Call, handler, metrics=None):
    """Run ``handler``; a ServingError becomes its status, anything else INTERNAL (logged with its
    traceback, rate-limited: a bug of the server, not the client's fault). One bad request never takes
    the server down. Every outcome is counted and timed."""
    code, message = grpc.StatusCode.OK, ""
    if metrics is not None:
        metrics.in_flight.labels(call.rpc).inc()
    try:
        return handler()
    except ServingError as exc:
        code, message = exc.code, str(exc)
    except Exception as exc:  # noqa: BLE001
        _bug_log.exception(f"{call.rpc}:{type(exc).__qualname__}", "%s on model %r failed", call.rpc, call.model)
        code, message = grpc.StatusCode.INTERNAL, f"{call.rpc} failed inside the server; see the server log"
    finally:
        if metrics is not None:
            metrics.in_flight.labels(call.rpc).dec()
            metrics.record(call.model, call.rpc, code.name, time.perf_counter() - call.start)
    if len(message) > MAX_DETAILS:
        message = message[:MAX_DETAILS - 3] + "..."
    context.abort(code, message)
