"""Bounded concurrent requests per client, as a gRPC server interceptor.

A client is the identity of its bearer token when it sends one (a hash, never
the token itself), else its peer address without the port. Unary calls hold a
slot while they run; a stream holds one for its whole life.
"""
from __future__ import annotations

import hashlib
import threading
from collections import defaultdict

import grpc

from serving.auth import bearer_token


def client_identity(metadata, peer: str) -> str:
    token = bearer_token(metadata)
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer  # "ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1"


class ClientLimiter(grpc.ServerInterceptor):
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"per-client request limit must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = defaultdict(int)

    def _enter(self, who: str) -> bool:
        with self._lock:
            if self._in_flight[who] >= self.limit:
                return False
            self._in_flight[who] += 1
            return True

    def _leave(self, who: str) -> None:
        with self._lock:
            self._in_flight[who] -= 1
            if not self._in_flight[who]:
                del self._in_flight[who]

    def _refuse(self, context, who: str) -> None:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"client {who} already has {self.limit} requests in flight (the per-client limit); "
                      "wait for answers before sending more")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        metadata = details.invocation_metadata
        limiter = self

        def unary(inner):
            def behavior(request, context):
                who = client_identity(metadata, context.peer())
                if not limiter._enter(who):
                    limiter._refuse(context, who)
                try:
                    return inner(request, context)
                finally:
                    limiter._leave(who)
            return behavior

        def streaming(inner):
            def behavior(request, context):
                who = client_identity(metadata, context.peer())
                if not limiter._enter(who):
                    limiter._refuse(context, who)
                try:
                    yield from inner(request, context)
                finally:
                    limiter._leave(who)
            return behavior

        kinds = {"unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
                 "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
                 "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
                 "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming)}
        for kind, (make, wrap) in kinds.items():
            inner = getattr(handler, kind)
            if inner is not None:
                return make(wrap(inner), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler
