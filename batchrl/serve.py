"""`batchrl serve`: the server process. Command-line options become ServerOptions and the
repository, session store and metrics of serving/; the process serves until SIGTERM or SIGINT,
then drains (exit 0, or 1 when unary calls were cut off at the end of the grace period).
With --workers N, this process supervises N such processes on one port (serving/workers.py)."""
from __future__ import annotations

import argparse
import logging
import os
import resource
import threading
from pathlib import Path

# gRPC core logs every failed TLS handshake, one line per connection (at INFO, which it shows unless told
# otherwise): any client could fill the log. It reads this once, as grpc is imported (below), so here;
# an operator who wants those lines sets GRPC_VERBOSITY=INFO.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from batchrl.cli import command_parser
from batchrl.errors import UserError
from batchrl.serving.auth import DATA_TOKEN_ENV, read_admin_token, read_token
from batchrl.serving.batcher import BatchLimits
from batchrl.serving.logs import configure as configure_logs
from batchrl.serving.metrics import Metrics
from batchrl.serving.repository import Registry
from batchrl.serving.runtime import choose_providers
from batchrl.serving.server import (DRAIN_BOUND, FD_RESERVE, MAX_CONNECTIONS, ServerOptions, build_server,
                                    start_memory_trim, start_poller, start_sweeper)
from batchrl.serving.signals import StopSignals
from batchrl.serving.sessions import memory_refusal, open_session_store
from batchrl.serving.store_guard import GuardLimits
from batchrl.serving.tls import check_tls

log = logging.getLogger("batchrl.serve")


def parser():
    """The options of `batchrl serve` (deploy/ is checked against them)."""
    parser = command_parser("batchrl serve", "Serve the model repository over gRPC.")
    defaults, batching, guard = ServerOptions(), BatchLimits(), GuardLimits()  # the one place defaults are written
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
                        help="seconds a stream may wait for its client's next message, or for its client to "
                             "take an answer (the stream send timeout), before the server closes it; its "
                             "session stays open")
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
                        help="where sequence-policy sessions live: this process's memory, or Redis (redis://, "
                             "rediss:// or unix://PATH?db=DB; a password as redis://:PASSWORD@HOST:PORT/DB or "
                             "?password=...; messages name the store by host, port and db only), shared by every "
                             "server attached to it, so any of them answers any session's next Step")
    parser.add_argument("--session-key-prefix", default="batchrl:",
                        help="prefix of the store's Redis keys (deployments sharing one Redis use different ones)")
    parser.add_argument("--store-timeout", type=float, default=0.5,
                        help="seconds one call to a Redis session store may take before it fails (UNAVAILABLE)")
    parser.add_argument("--store-max-in-flight", type=int, default=None,
                        help="most calls waiting on a Redis session store at once; more are refused at once "
                             "(UNAVAILABLE), so a hung store cannot hold every gRPC thread (default: half of "
                             "--grpc-threads)")
    parser.add_argument("--store-breaker-failures", type=int, default=guard.failures,
                        help="failed Redis store calls in a row after which session calls are refused at once "
                             "(the circuit breaker opens)")
    parser.add_argument("--store-breaker-cooldown", type=float, default=guard.cooldown,
                        help="seconds the open breaker refuses session calls before one call tries the store "
                             "again (its success closes the breaker)")
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
    parser.add_argument("--max-connections", type=int, default=None,
                        help="most connections open at once; one over it is closed at once (the client sees "
                             "UNAVAILABLE). Default: %d, or fewer when the file descriptor limit (raised to its hard "
                             "limit at start) leaves less beside %d for models, files and metrics. A per-address "
                             "limit belongs in front of the server (deploy/README.md)" % (MAX_CONNECTIONS, FD_RESERVE))
    parser.add_argument("--connection-idle-timeout", type=float, default=defaults.connection_idle_timeout,
                        help="seconds a connection without calls in flight stays open before the server closes "
                             "it (GOAWAY; gRPC clients reconnect when they next call)")
    parser.add_argument("--handshake-timeout", type=float, default=defaults.handshake_timeout,
                        help="seconds a new connection has to finish its TLS handshake and send its HTTP/2 "
                             "settings before the server closes it")
    parser.add_argument("--memory-trim-interval", type=float, default=30.0, metavar="SECONDS",
                        help="give memory freed by closed connections back to the system every SECONDS (glibc's "
                             "malloc_trim; 0: never)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the port with other processes (SO_REUSEPORT); without it, a port in use "
                             "is an error")
    parser.add_argument("--tls-cert", default=None,
                        help="PEM server certificate: serve TLS (checked with --tls-key and --client-ca at start; "
                             "failed handshakes are not logged unless GRPC_VERBOSITY=INFO is set)")
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
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # its link to the supervisor
    parser.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def store_guard(args: argparse.Namespace) -> GuardLimits:
    """The session store's guard: its calls in flight stay well below the gRPC threads, so that however the
    store hangs, health, Act and the other calls always find a thread. Half of them by default: a busy
    server whose Redis is healthy still holds a store slot while its thread waits for the CPU (measured on
    2 saturated cores: a quarter refused some calls of 56 stepping clients, half almost none)."""
    in_flight = args.store_max_in_flight
    if in_flight is None:
        in_flight = max(1, args.grpc_threads // 2)
    if in_flight >= args.grpc_threads:
        raise UserError(f"--store-max-in-flight {in_flight} must be below --grpc-threads ({args.grpc_threads}): "
                        "calls waiting on a hung store would hold every gRPC thread")
    return GuardLimits(in_flight, args.store_breaker_failures, args.store_breaker_cooldown)


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard limit (every connection holds one; a soft limit
    of 1,024 is common), and say so once: by the process that raised it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel does not allow
        log.warning("file descriptor limit left at %d: raising it to the hard limit %d failed: %s", soft, hard, exc)
        return
    log.info("file descriptor limit raised from %d to %d (the hard limit)", soft, hard)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    configure_logs(args.log_format, worker=args.worker_index)
    raise_fd_limit()  # before workers start: they inherit it
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected 1 or more server processes")
    check_tls(args.tls_cert, args.tls_key, args.client_ca)  # before any worker, store or model
    if args.workers > 1 and args.worker_index is None:
        from batchrl.serving.workers import sequence_models, supervise

        # Here, once: each worker would otherwise load every model and then refuse, one error per worker.
        sequence = sequence_models(Path(args.repository)) if args.session_store == "memory" else []
        if sequence:
            raise UserError(f"{memory_refusal(args.workers)} (sequence policies here: {', '.join(sequence)})")
        return supervise(args, argv)
    if not args.reuse_port:
        from batchrl.serving.workers import reserve_port

        # A plain bind first: grpc's own refusal of a port in use comes with a raw ERROR line of its core
        # (add_port.cc) before ours. (With --reuse-port a shared port is the point: no probe.)
        reserve_port(args.address)[0].close()
    signals = StopSignals()  # before anything slow: a SIGTERM during start-up is then a clean stop too
    supervisor = None
    if args.ready_fd is not None:  # a worker: it stops when its supervisor dies (by the signals above)
        from batchrl.serving.workers import follow_supervisor

        supervisor = follow_supervisor(args.ready_fd, args.supervisor_pid)
    providers = choose_providers(args.device, args.device_id)
    limits = BatchLimits(args.max_batch, args.max_queue_delay_us / 1e6, args.max_queue)
    metrics = Metrics(worker=args.worker_index or 0)
    # the store first: a bad or unreachable one is refused before minutes of model loading
    sessions = open_session_store(args.session_store, lambda name, version: registry.get(name, version),
                                  args.max_sessions, args.session_timeout, args.session_key_prefix, args.workers,
                                  args.store_timeout, store_guard(args), metrics)
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
                            tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
                            max_connections=args.max_connections,
                            connection_idle_timeout=args.connection_idle_timeout,
                            handshake_timeout=args.handshake_timeout)
    experience = None
    if args.log_experience is not None:
        from batchrl.serving.experience import ExperienceLog

        experience = ExperienceLog(args.log_experience, args.log_flush_seconds, int(args.log_shard_mb * 2**20),
                                   args.log_buffer_rows, args.log_retention_hours * 3600, int(args.log_max_gb * 2**30),
                                   metrics)
    served = build_server(registry, options, sessions, metrics, experience)
    cap, fd_limit = options.connection_cap(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("connections: at most %d open at once (file descriptor limit %d), closed after %g s without calls",
             cap, fd_limit, options.connection_idle_timeout)
    if fd_limit - cap < min(FD_RESERVE, fd_limit // 2):
        log.warning("--max-connections %d leaves %d of the %d file descriptors for model files, the repository, "
                    "metrics and logs: a crowd of connections can make them fail (EMFILE)", cap, fd_limit - cap,
                    fd_limit)
    if args.metrics_port is not None:
        metrics.watch(registry, sessions)
        if args.worker_index is None:  # a worker's figures are served by its supervisor
            log.info("metrics on http://%s:%d/metrics", args.metrics_address,
                     metrics.serve(args.metrics_port, args.metrics_address))
    served.start()  # models were loaded and warmed up above: ready when the port opens
    stop = threading.Event()
    start_sweeper(sessions, stop)
    if args.poll > 0:
        start_poller(registry, args.poll, stop, metrics)
    if args.memory_trim_interval > 0:
        start_memory_trim(args.memory_trim_interval, stop)
    in_use = sorted({p for versions in registry.models.values() for m in versions.values() for p in m.providers})
    log.info("serving %d models (%d versions) on %s (port %d); onnxruntime providers in use: %s", len(registry.models),
             sum(len(v) for v in registry.models.values()), args.address, served.port, ", ".join(in_use) or "none")
    if supervisor is not None:  # tell it (the link stays open: its end-of-file means the supervisor died)
        try:
            supervisor.sendall(b"1")
        except OSError:  # it died meanwhile: its signal, or the watch of the link, stops this process below
            pass
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
