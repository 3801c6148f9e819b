"""One RPC's outcome for every protocol the server speaks: the status a user-caused error maps to,
the call's label and timing for metrics, and the guard that turns exceptions into statuses."""
from __future__ import annotations

import logging
import time

import grpc

from batchrl.serving.batcher import DeadlineExceeded, QueueFull

log = logging.getLogger("batchrl.serve")
MAX_DETAILS = 1024  # characters of an error message: details travel in metadata, which has a size limit


def quoted(text: str, limit: int = 64) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: a client's 16 KB name must not
    come back in full (nor push the answer past the metadata limit)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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
    """Run ``handler``; a RequestError becomes its status, anything else INTERNAL (logged):
    one bad request must never take the server down. Every outcome is counted and timed."""
    code, message = grpc.StatusCode.OK, ""
    if metrics is not None:
        metrics.in_flight.labels(call.rpc).inc()
    try:
        return handler()
    except RequestError as exc:
        code, message = exc.code, str(exc)
    except QueueFull as exc:
        code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    except DeadlineExceeded as exc:
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    except Exception:  # noqa: BLE001
        log.exception("%s on model %r failed", call.rpc, call.model)
        code, message = grpc.StatusCode.INTERNAL, f"{call.rpc} failed inside the server; see the server log"
    finally:
        if metrics is not None:
            metrics.in_flight.labels(call.rpc).dec()
            metrics.record(call.model, call.rpc, code.name, time.perf_counter() - call.start)
    if len(message) > MAX_DETAILS:
        message = message[:MAX_DETAILS - 3] + "..."
    context.abort(code, message)
