"""Admission: the per-call policy applied once, around every RPC on the port, as one server interceptor.

In order, for each call:
1. Decoding. Requests reach the server as bytes and are parsed here, so an undecodable message is
   INVALID_ARGUMENT with one rate-limited log line and a metric. (Left to grpcio, it logs a full
   traceback per message, and undecodable frames on a stream can leave the call unfinished so
   that ``server.stop(grace)`` never completes.)
2. Authentication: admin calls need the admin token; data-plane calls need the data token when
   the server has one; health and the open calls need nothing.
3. Stream limits. In the synchronous grpcio server a streaming call holds a worker thread for
   its whole life, so at most ``max_streams`` (below the worker count) are open at once; more get
   RESOURCE_EXHAUSTED. A stream waiting longer than ``stream_idle_timeout`` for its client's next
   message, or for its client to take an answer (a client that sends but never reads fills the
   flow-control window, and the thread sending to it blocks), is closed by the server
   (UNAVAILABLE, saying why); the handler learns of it through ``StreamIdle`` (an Episode's
   session then stays open).
4. The per-client limit on concurrent calls. A client is what it cannot mint: its mutual-TLS
   certificate identity when it has one, else its peer address without the port.

Health is exempt from 2-4: it must answer whatever else happens.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from batchrl.serving.auth import Tokens
from batchrl.serving.background import every
from batchrl.serving.logs import RateLimitedLog

log = logging.getLogger("batchrl.serve")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class Role(enum.Enum):
    OPEN = "open"      # no token needed (health, reflection, server metadata)
    DATA = "data"      # the data token when the server has one
    ADMIN = "admin"    # the admin token


class StreamIdle(Exception):
    """Raised in a stream's handler once the server closed the stream because its client went quiet:
    from the request iterator (no message for the idle timeout) or where the handler yielded (its
    answer not taken for the idle timeout)."""


@dataclass(frozen=True)
class AdmissionLimits:
    max_streams: int                  # concurrent streaming calls (each holds a worker thread)
    stream_idle_timeout: float = 60.0  # seconds a stream may wait on its client: for a message, or to send one
    per_client_limit: int | None = None  # concurrent calls per client identity; None: unlimited

    def __post_init__(self) -> None:
        if self.max_streams < 0:
            raise ValueError(f"max_streams must be >= 0, got {self.max_streams}")
        if not self.stream_idle_timeout > 0:
            raise ValueError(f"stream idle timeout must be > 0 seconds, got {self.stream_idle_timeout}")
        if self.per_client_limit is not None and self.per_client_limit < 1:
            raise ValueError(f"per-client request limit must be >= 1, got {self.per_client_limit}")


def client_identity(context: grpc.ServicerContext) -> str:
    """The mutual-TLS identity of the caller if it has one, else its address without the port."""
    identities = context.peer_identities()
    if identities:
        return "mtls:" + identities[0].decode(errors="replace")
    peer = context.peer()  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Stream:
    __slots__ = ("context", "waiting_since", "sending_since", "closed_idle")

    def __init__(self, context):
        self.context, self.closed_idle = context, False
        self.waiting_since: float | None = None  # since when the handler waits for the client's next message
        self.sending_since: float | None = None  # since when an answer waits for the client to take it


def _sending(stream: _Stream, responses: Iterator) -> Iterator:
    """``responses``, each marked on ``stream`` as sending from its yield until the next is asked for.

    grpcio's synchronous server sends a yielded response and waits for that send to complete (which
    blocks while the client's flow-control window is full: a client that does not read) before it
    asks for the next one, so the time between a yield and the resume is the time the client takes
    to take the answer. When the reaper closed the stream meanwhile, grpc may drop this generator
    without resuming it: the handler is then told where it yielded, with StreamIdle, as for idleness.
    """
    try:
        for response in responses:
            stream.sending_since = time.monotonic()
            yield response
            stream.sending_since = None
    except GeneratorExit:
        if stream.closed_idle and hasattr(responses, "throw"):
            with contextlib.suppress(StreamIdle, StopIteration):
                responses.throw(StreamIdle())
        raise


def _message_name(deserialize) -> str:
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


class Admission(grpc.ServerInterceptor):
    def __init__(self, role_of: Callable[[str], Role], tokens: Tokens, limits: AdmissionLimits, metrics=None):
        self.role_of, self.tokens, self.limits, self.metrics = role_of, tokens, limits, metrics
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # method -> wrapped handler, built once
        self._lock = threading.Lock()
        self._clients: dict[str, int] = defaultdict(int)
        self._streams: dict[int, _Stream] = {}
        self.unary_in_flight = 0
        self._undecodable_log = RateLimitedLog(log)
        self._stop = threading.Event()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start closing idle streams in the background."""
        interval = min(1.0, self.limits.stream_idle_timeout / 4)

        every(interval, self._stop, "batchrl-stream-reaper", self.close_idle_streams)

    def stop(self) -> None:
        self._stop.set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def close_idle_streams(self, now: float | None = None) -> int:
        """Close the streams whose client kept the server waiting longer than the idle timeout: for its
        next message (idle), or to take an answer (send timeout). Returns how many were closed."""
        now = time.monotonic() if now is None else now
        timeout = self.limits.stream_idle_timeout

        def stalled(since: float | None) -> bool:  # read once: the handler's thread sets these meanwhile
            return since is not None and now - since > timeout

        with self._lock:
            open_ = [s for s in self._streams.values() if not s.closed_idle]
            idle = [s for s in open_ if stalled(s.waiting_since)]
            unsent = [s for s in open_ if s not in idle and stalled(s.sending_since)]
            for stream in idle + unsent:
                stream.closed_idle = True
        after = ("an open session stays open: continue it with Step, or with a new stream whose first message "
                 "is a step carrying its session_id")
        closes = (
            (idle, f"the server closed this stream after {timeout:g} s without a message from the client (the "
                   f"stream idle timeout); {after}", "streams_closed_idle", "idle for more than"),
            (unsent, f"the server closed this stream after its client took no answer for {timeout:g} s (the "
                     f"stream send timeout, which is the stream idle timeout: read the answers as they come); "
                     f"{after}", "stream_send_timeouts", "whose client took no answer (stream send timeout) for more than"))
        for streams, details, counter, why in closes:
            for stream in streams:
                _cancel(stream.context, grpc.StatusCode.UNAVAILABLE, details)
                if self.metrics is not None:
                    getattr(self.metrics, counter).inc()
            if streams:
                log.info("closed %d stream(s) %s %g s", len(streams), why, timeout)
        return len(idle) + len(unsent)

    # -- the interceptor ---------------------------------------------------------
    def intercept_service(self, continuation, details):
        wrapped = self._handlers.get(details.method)
        if wrapped is None:
            handler = continuation(details)
            if handler is None:
                return None
            wrapped = self._handlers.setdefault(details.method, self._wrap(details.method, handler))
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize, message = handler.request_deserializer, _message_name(handler.request_deserializer)
        health = method.startswith(HEALTH_PREFIX)
        role = Role.OPEN if health else self.role_of(method)

        def decode(raw: bytes, context) -> object:
            if deserialize is None:
                return raw
            try:
                return deserialize(raw)
            except Exception:  # noqa: BLE001 - DecodeError and whatever else protobuf raises on garbage
                self._refused(method, "undecodable")
                self._undecodable_log.warning(method, "undecodable request to %s from %s (%d bytes)",
                                              method, context.peer(), len(raw))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request to {method} is not a valid {message} message ({len(raw)} bytes)")

        # The token check this method needs, decided once: none for open methods, nor for the data
        # plane of a server without a data token (then no call reads its metadata for it).
        refuse = (self.tokens.refuse_admin if role is Role.ADMIN else
                  self.tokens.refuse_data if role is Role.DATA and self.tokens.data is not None else None)

        def admit(context) -> str | None:
            """Authenticate and take a per-client slot; returns the client holding one (None: no limit)."""
            if refuse is not None and (reason := refuse(context.invocation_metadata())) is not None:
                self._refused(method, "unauthenticated")
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            return self._enter_client(method, context)

        if handler.request_streaming:
            def messages(stream: _Stream, raw_iterator, context) -> Iterator:
                # StreamIdle only where the handler asks for a message (not when the generator is closed:
                # an exception raised then is lost, with a traceback).
                while True:
                    stream.waiting_since, ended = time.monotonic(), False
                    try:
                        raw = next(raw_iterator)
                    except StopIteration:
                        ended = True
                    except grpc.RpcError:
                        if not stream.closed_idle:
                            raise
                    finally:
                        stream.waiting_since = None
                    if stream.closed_idle:
                        raise StreamIdle()
                    if ended:
                        return
                    yield decode(raw, context)

            def enter_stream(raw_iterator, context):
                who = admit(context)
                stream = self._open_stream(method, context, who)
                return stream, who, messages(stream, raw_iterator, context)

            if handler.response_streaming:
                def behavior(raw_iterator, context):
                    stream, who, requests = enter_stream(raw_iterator, context)
                    try:
                        yield from _sending(stream, handler.stream_stream(requests, context))
                    finally:
                        self._close_stream(stream, who)
                return grpc.stream_stream_rpc_method_handler(behavior, None, handler.response_serializer)

            def behavior(raw_iterator, context):
                stream, who, requests = enter_stream(raw_iterator, context)
                try:
                    return handler.stream_unary(requests, context)
                finally:
                    self._close_stream(stream, who)
            return grpc.stream_unary_rpc_method_handler(behavior, None, handler.response_serializer)

        if health:  # decoded only; Watch keeps grpcio's non-blocking mode (no thread held per watcher)
            inner = handler.unary_stream or handler.unary_unary

            def behavior(raw, context, *rest):
                return inner(decode(raw, context), context, *rest)
            for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
                if hasattr(inner, attribute):
                    setattr(behavior, attribute, getattr(inner, attribute))
            make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
                    else grpc.unary_unary_rpc_method_handler)
            return make(behavior, None, handler.response_serializer)

        if handler.response_streaming:
            def behavior(raw, context):
                request = decode(raw, context)
                who = admit(context)
                stream = self._open_stream(method, context, who)
                try:
                    yield from _sending(stream, handler.unary_stream(request, context))
                finally:
                    self._close_stream(stream, who)
            return grpc.unary_stream_rpc_method_handler(behavior, None, handler.response_serializer)

        def behavior(raw, context):
            request = decode(raw, context)
            who = admit(context)
            with self._lock:
                self.unary_in_flight += 1
            try:
                return handler.unary_unary(request, context)
            finally:
                with self._lock:
                    self.unary_in_flight -= 1
                self._leave_client(who)
        return grpc.unary_unary_rpc_method_handler(behavior, None, handler.response_serializer)

    # -- bookkeeping ---------------------------------------------------------------
    def _refused(self, method: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(method, reason).inc()

    def _enter_client(self, method: str, context) -> str | None:
        limit = self.limits.per_client_limit
        if limit is None:
            return None
        who = client_identity(context)
        with self._lock:
            allowed = self._clients[who] < limit
            if allowed:
                self._clients[who] += 1
        if not allowed:
            self._refused(method, "client_limit")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {who} already has {limit} requests in flight (the per-client limit); "
                          "wait for answers before sending more")
        return who

    def _leave_client(self, who: str | None) -> None:
        if who is None:
            return
        with self._lock:
            self._clients[who] -= 1
            if not self._clients[who]:
                del self._clients[who]

    def _open_stream(self, method: str, context, who: str | None) -> _Stream:
        stream = _Stream(context)
        with self._lock:
            allowed = len(self._streams) < self.limits.max_streams
            if allowed:
                self._streams[id(stream)] = stream
        if not allowed:
            self._leave_client(who)
            self._refused(method, "stream_limit")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.limits.max_streams} streams are open, the most this server keeps (each holds a "
                          "worker thread; --max-streams): retry later, or use the unary calls (OpenSession, Step)")
        if self.metrics is not None:
            self.metrics.open_streams.inc()
        return stream

    def _close_stream(self, stream: _Stream, who: str | None) -> None:
        with self._lock:
            self._streams.pop(id(stream), None)
        if self.metrics is not None:
            self.metrics.open_streams.dec()
        self._leave_client(who)


def _cancel(context, code: grpc.StatusCode, details: str) -> None:
    """End a call from outside its handler's thread with ``code`` and ``details``.

    The public ``context.cancel()`` can only say CANCELLED, which tells the client nothing; the
    core call's cancel-with-status sends the real reason. Falls back to the public call if grpcio's
    internals change.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)
    except Exception:  # noqa: BLE001
        context.cancel()
