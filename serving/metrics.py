"""Prometheus metrics of the server, served on their own HTTP port (`batchrl serve --metrics-port`).

Counters and histograms are updated as requests are answered and models run. Live state (queue
depth, open sessions, loaded and rejected versions) is read from the registry and session store by
``refresh()``: at each scrape when this process serves the endpoint, every second when it is one of
`batchrl serve --workers N`'s processes. There the parent serves one endpoint for all of them in
Prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the parent): counters and
histograms are summed over the workers, requests carry a ``worker`` label, and each gauge says how
the workers' values combine (live sum or live max; a dead worker's gauges drop out).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from batchrl.serving.background import every
from batchrl.serving.errors import Unavailable

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own: set, every value lives in a file there
PUBLISH_EVERY = 1.0  # seconds between refreshes of a worker's live gauges (multiprocess mode)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    def __init__(self, worker: int = 0) -> None:
        self.worker = str(worker)  # this process's index among `batchrl serve --workers N`'s
        self.registry = CollectorRegistry()
        # process_open_fds, process_max_fds and process_resident_memory_bytes: connections cost both
        ProcessCollector(registry=self.registry)
        self._http = None  # the metrics endpoint, once serve() started it
        self._publishing: threading.Event | None = None  # set to stop the refresh thread of a worker
        self.requests = Counter("batchrl_requests", "RPCs answered, by model, RPC, status code and server process",
                                ["model", "rpc", "code", "worker"], registry=self.registry)
        self.latency = Histogram("batchrl_request_duration_seconds", "RPC latency in the server, by model and RPC",
                                 ["model", "rpc"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("batchrl_batch_requests", "requests gathered into one model run",
                                        ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("batchrl_batch_rows", "rows (observations or session steps) in one model run",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("batchrl_requests_in_flight", "RPCs received and not yet answered, by RPC",
                               ["rpc"], registry=self.registry, multiprocess_mode="livesum")
        self.load_failures = Counter("batchrl_model_load_failures", "model files rejected at load, by model",
                                     ["model"], registry=self.registry)
        self.refused = Counter("batchrl_refused_requests", "calls refused before reaching a service, by method "
                               "and reason (undecodable, unauthenticated, client_limit, stream_limit)",
                               ["method", "reason"], registry=self.registry)
        self.open_streams = Gauge("batchrl_open_streams", "streaming calls open (each holds a gRPC thread)",
                                  registry=self.registry, multiprocess_mode="livesum")
        self.streams_closed_idle = Counter("batchrl_streams_closed_idle", "streams the server closed because "
                                           "their client sent nothing for the stream idle timeout",
                                           registry=self.registry)
        self.stream_send_timeouts = Counter("batchrl_stream_send_timeouts", "streams the server closed because "
                                            "their client took no answer for the stream idle timeout (the stream "
                                            "send timeout: a client that sends but does not read)",
                                            registry=self.registry)
        # grpc closes a connection over the cap at once and tells no one: the cap is shown, and the open
        # connections (LiveState), so that open == cap says new clients are being turned away.
        self.max_connections = Gauge("batchrl_max_connections", "connections the gRPC port keeps open at once "
                                     "(--max-connections); grpc closes one over it at once, uncounted",
                                     registry=self.registry, multiprocess_mode="livesum")
        self.poll_failures = Counter("batchrl_repository_poll_failures", "repository polls that failed, by "
                                     "reason (EMFILE, EACCES, ... or bug); the poller goes on",
                                     ["reason"], registry=self.registry)
        self.nonfinite_outputs = Counter("batchrl_nonfinite_outputs", "requests refused because the model's output "
                                         "for them was not finite (NaN or infinite), by model",
                                         ["model"], registry=self.registry)
        self.sequence_conflicts = Counter("batchrl_sequence_conflicts", "Open Inference Protocol requests refused "
                                          "because their sequence_id names another client's open sequence, by "
                                          "request: start (it would have replaced that sequence), step",
                                          ["request"], registry=self.registry)
        # The shared session store's guard (serving/store_guard.py): calls refused without trying the store,
        # and calls that failed there.
        self.store_refused = Counter("batchrl_store_refused_calls", "session-store calls refused at once, by reason: "
                                     "breaker_open (the store kept failing: one call tries it after the cool-down), "
                                     "in_flight_cap (--store-max-in-flight calls are waiting on it)", ["reason"],
                                     registry=self.registry)
        self.store_failures = Counter("batchrl_store_failed_calls", "session-store calls that failed, by reason: "
                                      "timeout (no answer within --store-timeout), connection, auth", ["reason"],
                                      registry=self.registry)

        # The experience log (serve --log-experience): rows and shards written, rows dropped, errors.
        self.experience_rows = Counter("batchrl_experience_rows_written", "experience rows (session steps and "
                                       "episode ends) written to shards", registry=self.registry)
        self.experience_shards = Counter("batchrl_experience_shards_written", "experience shards written",
                                         registry=self.registry)
        self.experience_dropped = Counter("batchrl_experience_rows_dropped", "experience rows lost, by reason: "
                                          "buffer_full (the writer fell behind), write_error (a shard could not be "
                                          "written), close_timeout (the writer did not finish at shutdown), closed "
                                          "(came after the log closed)", ["reason"], registry=self.registry)
        self.experience_errors = Counter("batchrl_experience_write_errors", "failed experience writes, by error "
                                         "(ENOSPC, EACCES, ...)", ["reason"], registry=self.registry)
        self.experience_shards_deleted = Counter("batchrl_experience_shards_deleted", "experience shards deleted, "
                                                 "by reason: age (past the retention), disk_cap", ["reason"],
                                                 registry=self.registry)
        self.experience_retention_errors = Counter("batchrl_experience_retention_errors", "failed listings or "
                                                   "deletions of old experience shards, by error (EACCES, EMFILE, "
                                                   "...); the writer goes on", ["reason"], registry=self.registry)

    def record(self, model: str, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(model, rpc, code, self.worker).inc()
        self.latency.labels(model, rpc).observe(seconds)

    def batch_observer(self, model: str) -> Callable[[int, int], None]:
        requests, rows = self.batch_requests.labels(model), self.batch_rows.labels(model)

        def observe(n_requests: int, n_rows: int) -> None:
            requests.observe(n_requests)
            rows.observe(n_rows)

        return observe

    def watch(self, registry, sessions) -> None:
        """Report the live state of ``registry`` (a serving Registry) and ``sessions``: refreshed at each
        scrape of this process's endpoint, or every PUBLISH_EVERY seconds in multiprocess mode."""
        live = LiveState(registry, sessions)
        if not multiprocess():
            self.registry.register(live)
            return
        self._publishing = stop = threading.Event()

        live.refresh()
        every(PUBLISH_EVERY, stop, "batchrl-metrics-publish", live.refresh)

    def serve(self, port: int, address: str = "0.0.0.0"):
        """Start the HTTP endpoint in a daemon thread; returns the bound port. close() stops it."""
        self._http, self._http_thread = start_http_server(port, address, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop the HTTP endpoint, if serve() started one, and the live gauges' refresh thread."""
        if self._publishing is not None:
            self._publishing.set()
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
            self._http_thread.join(timeout=5)


class LiveState:
    """Gauges of the registry's and the session store's live state, set by ``refresh()``. A collector
    too: collecting refreshes them first (the single-process endpoint is then never stale)."""

    def __init__(self, registry, sessions):
        self.registry, self.sessions = registry, sessions
        # Not registered anywhere: collected through this object, or read from their files by the parent.
        self.depth = Gauge("batchrl_queue_depth", "requests waiting for a model run", ["model", "version"],
                           registry=None, multiprocess_mode="livesum")
        self.pinned = Gauge("batchrl_model_sessions", "open sessions on a loaded model version", ["model", "version"],
                            registry=None, multiprocess_mode="livesum")
        self.loaded = Gauge("batchrl_model_versions_loaded", "versions of a model loaded", ["model"],
                            registry=None, multiprocess_mode="livemax")
        self.rejected = Gauge("batchrl_repository_rejected",
                              "repository folders not serving now, by model and reason: name (not a valid model "
                              "name or version), outside (resolves outside the repository), load (the file cannot "
                              "serve), incompatible (not promoted over the default automatically)",
                              ["model", "reason"], registry=None, multiprocess_mode="livemax")
        # Every process of a shared store sees the same count: the max, not the sum, of the workers' figures.
        self.open = Gauge("batchrl_open_sessions", "open sequence-policy sessions (left at the last count read "
                          "while a shared store cannot be reached)", registry=None, multiprocess_mode="livemax")
        self._shown: dict[Gauge, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        values: dict[Gauge, dict[tuple[str, ...], float]] = {g: {} for g in (self.depth, self.pinned, self.loaded,
                                                                              self.rejected)}
        for name, versions in self.registry.models.items():
            values[self.loaded][(name,)] = len(versions)
            for version, model in versions.items():
                values[self.depth][(name, str(version))] = model.batcher.queue_depth
                values[self.pinned][(name, str(version))] = model.pins
        for (name, reason), count in self.registry.rejected().items():
            values[self.rejected][(name, reason)] = count
        with self._lock:
            for gauge, now in values.items():
                for labels, value in now.items():
                    gauge.labels(*labels).set(value)
                for gone in self._shown.get(gauge, set()) - now.keys():  # an unloaded model's series ends
                    gauge.labels(*gone).set(0)  # (in multiprocess mode its file keeps the last value written)
                    gauge.remove(*gone)
                self._shown[gauge] = set(now)
            try:
                self.open.set(len(self.sessions))
            except Unavailable:  # a shared store that cannot be reached: the rest is still reported
                pass

    def describe(self):
        return []  # registering must not collect (a shared store may be slow or down)

    def collect(self):
        self.refresh()
        for gauge in (self.depth, self.pinned, self.loaded, self.rejected, self.open):
            yield from gauge.collect()
