"""`batchrl serve`: the server process. Command-line options become ServerOptions and the
repository, session store and metrics of serving/; the process serves until SIGTERM or SIGINT,
then drains (exit 0, or 1 when unary calls were cut off at the end of the grace period).
With --workers N, this process supervises N such processes on one port (serving/workers.py)."""
from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

from batchrl.cli import command_parser
from batchrl.errors import UserError
from batchrl.serving.auth import DATA_TOKEN_ENV, read_admin_token, read_token
from batchrl.serving.batcher import BatchLimits
from batchrl.serving.logs import configure as configure_logs
from batchrl.serving.metrics import Metrics
from batchrl.serving.repository import Registry
from batchrl.serving.runtime import choose_providers
from batchrl.serving.server import DRAIN_BOUND, ServerOptions, build_server, start_poller, start_sweeper
from batchrl.serving.signals import StopSignals
from batchrl.serving.sessions import memory_refusal, open_session_store

log = logging.getLogger("batchrl.serve")


def parser():
    """The options of `batchrl serve` (deploy/ is checked against them)."""
    parser = command_parser("batchrl serve", "Serve the model repository over gRPC.")
    defaults, batching = ServerOptions(), BatchLimits()  # the one place the server's defaults are written
    parser.add_argument("--repository", "-r", default="models", help="model repository root")
    parser.add_argument("--address", "-a", default="127.0.0.1:50051", help="host:port to listen on")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: CUDA when a GPU is usable, else CPU")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device index")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per model")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port (SO_REUSEPORT), each loading the repository itself, "
                             "supervised by this one (restarted when they die, drained on SIGTERM); connections, "
                             "not RPCs, are spread over them. More than 1 with sequence policies needs "
                             "--session-store redis://...")
    parser.add_argument("--grpc-threads", type=int, default=defaults.grpc_threads,
                        help="gRPC worker threads (each open stream holds one)")
    parser.add_argument("--max-streams", type=int, default=None,
                        help="most concurrent streams (Episode, reflection); more get RESOURCE_EXHAUSTED "
                             "(default: grpc threads - 8, so unary calls and health always find a thread)")
    parser.add_argument("--stream-idle-timeout", type=float, default=defaults.stream_idle_timeout,
                        help="seconds a stream may wait for its client's next message before the server closes "
                             "it; its session stays open")
    parser.add_argument("--max-batch", type=int, default=batching.max_rows,
                        help="most observations (or session steps) one model run gathers")
    parser.add_argument("--max-queue-delay-us", type=int, default=round(batching.max_delay * 1e6),
                        help="microseconds a filling batch may wait for more requests (a request that finds "
                             "nothing else queued never waits)")
    parser.add_argument("--max-queue", type=int, default=batching.max_queue,
                        help="most requests waiting per model version; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-sessions", type=int, default=1024, help="most open sessions")
    parser.add_argument("--session-timeout", type=float, default=300.0,
                        help="seconds without a Step after which a session is evicted")
    parser.add_argument("--session-store", default="memory", metavar="memory|redis://HOST:PORT/DB",
                        help="where sequence-policy sessions live: this process's memory, or Redis (redis:// or "
                             "rediss://, a password as redis://:PASSWORD@HOST:PORT/DB), shared by every server "
                             "attached to it, so any of them answers any session's next Step")
    parser.add_argument("--session-key-prefix", default="batchrl:",
                        help="prefix of the store's Redis keys (deployments sharing one Redis use different ones)")
    parser.add_argument("--poll", type=float, default=0.0, metavar="SECONDS",
                        help="rescan the repository every SECONDS: load new version folders, drop removed ones (0: never)")
    parser.add_argument("--admin-token-file", default=None,
                        help="file holding the bearer token for LoadModel/UnloadModel "
                             "(default: $BATCHRL_ADMIN_TOKEN; neither: model management is disabled)")
    parser.add_argument("--data-token-file", default=None,
                        help=f"file holding a bearer token that every data-plane call (Act, sessions, ModelInfer) "
                             f"must carry (default: ${DATA_TOKEN_ENV}; neither: no token needed)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics over HTTP on this port (0: any free port; default: off)")
    parser.add_argument("--metrics-address", default="127.0.0.1", help="address of the metrics endpoint")
    parser.add_argument("--max-message-mb", type=float, default=defaults.max_message_bytes / 2**20,
                        help="largest request or response, in MiB")
    parser.add_argument("--grace", type=float, default=defaults.grace,
                        help="seconds requests in flight get to finish after SIGTERM")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")
    parser.add_argument("--per-client-limit", type=int, default=None,
                        help="most concurrent requests per client: its mutual-TLS identity, else its IP address")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the port with other processes (SO_REUSEPORT); without it, a port in use "
                             "is an error")
    parser.add_argument("--tls-cert", default=None, help="PEM server certificate: serve TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--client-ca", default=None, help="PEM CA: require client certificates (mutual TLS)")
    parser.add_argument("--log-experience", default=None, metavar="DIR",
                        help="record every session step and episode end as Parquet shards in DIR (one series per "
                             "server process), for `batchrl data import`; needs the experience extra (pyarrow)")
    parser.add_argument("--log-flush-seconds", type=float, default=10.0,
                        help="a shard is written at least this often: what a SIGKILL can lose (SIGTERM loses "
                             "nothing)")
    parser.add_argument("--log-shard-mb", type=float, default=64.0, help="a shard is written once its rows reach this")
    parser.add_argument("--log-buffer-rows", type=int, default=65_536,
                        help="rows waiting for the writer; beyond it rows are dropped and counted, requests never "
                             "wait")
    parser.add_argument("--log-retention-hours", type=float, default=168.0, help="shards older than this are deleted")
    parser.add_argument("--log-max-gb", type=float, default=10.0,
                        help="disk cap of DIR's shards: the oldest are deleted first")
    # Set by the supervisor of --workers N for each worker it starts.
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    configure_logs(args.log_format, worker=args.worker_index)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected 1 or more server processes")
    if args.workers > 1 and args.worker_index is None:
        from batchrl.serving.workers import supervise

        return supervise(args, argv)
    signals = StopSignals()  # before anything slow: a SIGTERM during start-up is then a clean stop too
    providers = choose_providers(args.device, args.device_id)
    limits = BatchLimits(args.max_batch, args.max_queue_delay_us / 1e6, args.max_queue)
    metrics = Metrics(worker=args.worker_index or 0)
    # the store first: a bad or unreachable one is refused before minutes of model loading
    sessions = open_session_store(args.session_store, lambda name, version: registry.get(name, version),
                                  args.max_sessions, args.session_timeout, args.session_key_prefix, args.workers)
    registry = Registry.open(Path(args.repository), providers, args.threads, limits, metrics=metrics)
    if not registry.models:
        log.warning("no models loaded from %s", args.repository)
    sequence = sorted(name for name, versions in registry.models.items() if any(m.is_sequence for m in versions.values()))
    if sequence and not sessions.shared and args.workers > 1:
        raise UserError(f"{memory_refusal(args.workers)} (sequence policies here: {', '.join(sequence)})")
    options = ServerOptions(address=args.address, grpc_threads=args.grpc_threads, max_streams=args.max_streams,
                            stream_idle_timeout=args.stream_idle_timeout,
                            admin_token=read_admin_token(args.admin_token_file),
                            data_token=read_token(args.data_token_file, DATA_TOKEN_ENV),
                            max_message_bytes=int(args.max_message_mb * 1024 * 1024), grace=args.grace,
                            per_client_limit=args.per_client_limit, reuse_port=args.reuse_port,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca)
    experience = None
    if args.log_experience is not None:
        from batchrl.serving.experience import ExperienceLog

        experience = ExperienceLog(args.log_experience, args.log_flush_seconds, int(args.log_shard_mb * 2**20),
                                   args.log_buffer_rows, args.log_retention_hours * 3600, int(args.log_max_gb * 2**30),
                                   metrics)
    served = build_server(registry, options, sessions, metrics, experience)
    if args.metrics_port is not None:
        metrics.watch(registry, sessions)
        if args.worker_index is None:  # a worker's figures are served by its supervisor
            log.info("metrics on http://%s:%d/metrics", args.metrics_address,
                     metrics.serve(args.metrics_port, args.metrics_address))
    served.start()  # models were loaded and warmed up above: ready when the port opens
    stop = threading.Event()
    start_sweeper(sessions, stop)
    if args.poll > 0:
        start_poller(registry, args.poll, stop)
    in_use = sorted({p for versions in registry.models.values() for m in versions.values() for p in m.providers})
    log.info("serving %d models (%d versions) on %s (port %d); onnxruntime providers in use: %s", len(registry.models),
             sum(len(v) for v in registry.models.values()), args.address, served.port, ", ".join(in_use) or "none")
    if args.ready_fd is not None:  # tell the supervisor
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    received = signals.wait()
    stop.set()
    log.info("%s: draining: health NOT_SERVING, no new requests, up to %.1f s for those in flight",
             received.name, args.grace)
    drained = served.drain()
    if experience is not None:  # every answered step is in the buffer now: write it
        experience.close()
    metrics.close()
    if drained.streams_left:
        log.info("closed %d open stream(s) at the end of the grace period (a drain ends streams; their sessions "
                 "end with this process)", drained.streams_left)
    code = 0
    if drained.unary_left:
        log.error("%d unary call(s) were still running at the end of the %.1f s grace period and were cut off",
                  drained.unary_left, args.grace)
        code = 1
    if not drained.finished:  # a call grpc never finishes: leave without waiting for its thread
        log.warning("grpc had not finished stopping %.1f s after the grace period; exiting anyway", DRAIN_BOUND)
        logging.shutdown()
        os._exit(code)
    log.info("stopped")
    return code
