"""A bare gRPC echo service: the floor the serving benchmark (benchmarks/serve_bench.py) compares the policy
server against.

It is built like the policy server (``grpc.server`` over a ThreadPoolExecutor
with the same worker count and message size options) but does no work: the
unary ``/batchrl.bench.Echo/Echo`` and the bidi-stream
``/batchrl.bench.Echo/EchoStream`` answer every message with a fixed payload of
``--response-bytes`` (``--stream-response-bytes``) bytes. The benchmark sizes
that payload like the policy server's real response, so both servers put the
same bytes on the wire and the difference between them is the policy work
(decode, checks, batcher, onnxruntime, encode, metrics).

    python -m benchmarks.echo --address 127.0.0.1:0 --grpc-threads 64 --response-bytes 37

prints its bound port on stdout (one line) and serves until SIGTERM or SIGINT.
No protobuf: identity (bytes) serializers on both methods.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc

from batchrl.protos.contract import MAX_MESSAGE_BYTES
from batchrl.serving.signals import StopSignals

SERVICE = "batchrl.bench.Echo"
ECHO_METHOD = f"/{SERVICE}/Echo"
STREAM_METHOD = f"/{SERVICE}/EchoStream"


def build_echo_server(address: str, grpc_threads: int, response_bytes: int, stream_response_bytes: int | None = None,
                      max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """A configured, not yet started, echo server and its bound port."""
    if grpc_threads < 1:
        raise ValueError(f"grpc_threads must be >= 1, got {grpc_threads}")
    stream_response_bytes = response_bytes if stream_response_bytes is None else stream_response_bytes
    for what, size in (("response_bytes", response_bytes), ("stream_response_bytes", stream_response_bytes)):
        if not 0 <= size <= max_message_bytes:
            raise ValueError(f"{what} must be between 0 and {max_message_bytes}, got {size}")
    reply, stream_reply = bytes(response_bytes), bytes(stream_response_bytes)

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return reply

    def echo_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield stream_reply

    # No serializers given: requests arrive and replies leave as raw bytes.
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
    })
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=grpc_threads, thread_name_prefix="echo"),
                         handlers=[handler], options=options)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the echo server to {address}")
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to listen on (port 0: any free port)")
    parser.add_argument("--grpc-threads", type=int, default=64, help="gRPC worker threads (as `batchrl serve`)")
    parser.add_argument("--response-bytes", type=int, required=True, help="size of every Echo reply")
    parser.add_argument("--stream-response-bytes", type=int, default=None,
                        help="size of every EchoStream reply (default: --response-bytes)")
    parser.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20,
                        help="largest request or response (MiB)")
    args = parser.parse_args(argv)
    try:
        server, port = build_echo_server(args.address, args.grpc_threads, args.response_bytes,
                                         args.stream_response_bytes, int(args.max_message_mb * 1024 * 1024))
    except (ValueError, OSError) as exc:
        print(f"benchmarks.echo: error: {exc}", file=sys.stderr)
        return 1
    signals = StopSignals()
    server.start()
    print(port, flush=True)
    signals.wait()
    server.stop(None).wait(1)
    # An echo has nothing to flush, and a handler thread still inside gRPC must not hold the exit up.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
