"""Prometheus metrics of the server, served on their own HTTP port (`batchrl serve --metrics-port`).

Counters and histograms are updated as requests are answered and models run;
gauges (queue depth, open sessions, loaded and rejected versions) are read from the live
registry and session store at scrape time, so they are never stale.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from batchrl.serving.errors import Unavailable

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None  # the metrics endpoint, once serve() started it
        self.requests = Counter("batchrl_requests", "RPCs answered, by model, RPC and status code",
                                ["model", "rpc", "code"], registry=self.registry)
        self.latency = Histogram("batchrl_request_duration_seconds", "RPC latency in the server, by model and RPC",
                                 ["model", "rpc"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("batchrl_batch_requests", "requests gathered into one model run",
                                        ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("batchrl_batch_rows", "rows (observations or session steps) in one model run",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("batchrl_requests_in_flight", "RPCs received and not yet answered, by RPC",
                               ["rpc"], registry=self.registry)
        self.load_failures = Counter("batchrl_model_load_failures", "model files rejected at load, by model",
                                     ["model"], registry=self.registry)
        self.refused = Counter("batchrl_refused_requests", "calls refused before reaching a service, by method "
                               "and reason (undecodable, unauthenticated, client_limit, stream_limit)",
                               ["method", "reason"], registry=self.registry)
        self.open_streams = Gauge("batchrl_open_streams", "streaming calls open (each holds a worker thread)",
                                  registry=self.registry)
        self.streams_closed_idle = Counter("batchrl_streams_closed_idle", "streams the server closed because "
                                           "their client sent nothing for the stream idle timeout",
                                           registry=self.registry)
        self.nonfinite_outputs = Counter("batchrl_nonfinite_outputs", "requests refused because the model's output "
                                         "for them was not finite (NaN or infinite), by model",
                                         ["model"], registry=self.registry)

    def record(self, model: str, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(model, rpc, code).inc()
        self.latency.labels(model, rpc).observe(seconds)

    def batch_observer(self, model: str) -> Callable[[int, int], None]:
        requests, rows = self.batch_requests.labels(model), self.batch_rows.labels(model)

        def observe(n_requests: int, n_rows: int) -> None:
            requests.observe(n_requests)
            rows.observe(n_rows)

        return observe

    def watch(self, registry, sessions) -> None:
        """Report the live state of ``registry`` (a serving Registry) and ``sessions`` at each scrape."""
        self.registry.register(_LiveState(registry, sessions))

    def serve(self, port: int, address: str = "0.0.0.0"):
        """Start the HTTP endpoint in a daemon thread; returns the bound port. close() stops it."""
        self._http, self._http_thread = start_http_server(port, address, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop the HTTP endpoint, if serve() started one."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
            self._http_thread.join(timeout=5)


class _LiveState:
    def __init__(self, registry, sessions):
        self.registry, self.sessions = registry, sessions

    def collect(self):
        depth = GaugeMetricFamily("batchrl_queue_depth", "requests waiting for a model run",
                                  labels=["model", "version"])
        pinned = GaugeMetricFamily("batchrl_model_sessions", "open sessions on a loaded model version",
                                   labels=["model", "version"])
        loaded = GaugeMetricFamily("batchrl_model_versions_loaded", "versions of a model loaded",
                                   labels=["model"])
        for name, versions in self.registry.models.items():
            loaded.add_metric([name], len(versions))
            for version, model in versions.items():
                depth.add_metric([name, str(version)], model.batcher.queue_depth)
                pinned.add_metric([name, str(version)], model.pins)
        yield depth
        yield pinned
        yield loaded
        rejected = GaugeMetricFamily("batchrl_repository_rejected",
                                     "repository folders not serving now, by model and reason: name (not a valid "
                                     "model name or version), outside (resolves outside the repository), load (the "
                                     "file cannot serve), incompatible (not promoted over the default automatically)",
                                     labels=["model", "reason"])
        for (name, reason), count in sorted(self.registry.rejected().items()):
            rejected.add_metric([name, reason], count)
        yield rejected
        try:
            open_now = len(self.sessions)
        except Unavailable:  # a shared store that cannot be reached: the gauge is left out, the rest is served
            return
        yield GaugeMetricFamily("batchrl_open_sessions", "open sequence-policy sessions", value=open_now)
