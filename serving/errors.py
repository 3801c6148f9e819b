"""The one error table of the serving side: each error a caller can cause, with its gRPC status.

Lower layers (tensors, batcher, sessions, repository, dataplane) raise these; the guard
(serving/calls.guarded) answers one with its status and message. Anything else is a bug of the
server: INTERNAL, logged with its traceback, never blamed on the client.
"""
from __future__ import annotations

import grpc


class ServingError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OutOfRange(ServingError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ServingError):
    """A service the server depends on (the shared session store) cannot be reached: retry."""
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ServingError):
    """Stored state is damaged beyond use (a shared store's session record that does not parse)."""
    code = grpc.StatusCode.DATA_LOSS
