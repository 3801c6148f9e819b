"""What an operator relies on: metrics that reflect traffic, per-model health, JSON logs,
and a SIGTERM drain that loses no request in flight."""
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from batchrl.serving.client import PolicyClient
from batchrl.serving.logs import JsonFormatter
from batchrl.serving.metrics import Metrics
from batchrl.serving.repository import Registry
from batchrl.serving.server import ServerOptions, build_server
from batchrl.serving.sessions import SessionStore

TOKEN = "t0ken"
MODELS = Path(__file__).resolve().parents[2] / "models"


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_endpoint_reflects_traffic(dt_repository, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(dt_repository, repo)
    metrics, sessions = Metrics(), SessionStore()
    registry = Registry.open(repo, ["CPUExecutionProvider"], metrics=metrics)
    served = build_server(registry, ServerOptions(admin_token=TOKEN), sessions, metrics)
    metrics.watch(registry, sessions)
    metrics_port = metrics.serve(0, "127.0.0.1")
    served.start()
    try:
        with PolicyClient(f"127.0.0.1:{served.port}") as client:
            for _ in range(5):
                client.act("pendulum", np.ones((3, 3), np.float32))
            for bad in (lambda: client.act("pendulum", np.ones((3, 4), np.float32)),
                        lambda: client.act("nope", np.ones((3, 3), np.float32))):
                try:
                    bad()
                except grpc.RpcError:
                    pass
            session = client.open_session("dt-a").session_id
            client.step(session, np.zeros(3, np.float32))
            (repo / "dt-b" / "2").mkdir()
            (repo / "dt-b" / "2" / "model.onnx").write_bytes(b"corrupt")
            registry.poll()
            samples = scrape(metrics_port)
    finally:
        served.stop()
        metrics.close()
    assert value(samples, "batchrl_requests_total", model="pendulum", rpc="Act", code="OK", worker="0") == 5
    assert value(samples, "batchrl_requests_total", model="pendulum", rpc="Act", code="INVALID_ARGUMENT", worker="0") == 1
    assert value(samples, "batchrl_requests_total", model="", rpc="Act", code="NOT_FOUND", worker="0") == 1  # no label per bad name
    assert value(samples, "batchrl_requests_total", model="dt-a", rpc="Step", code="OK", worker="0") == 1
    assert value(samples, "batchrl_request_duration_seconds_count", model="pendulum", rpc="Act") == 6
    assert value(samples, "batchrl_batch_rows_sum", model="pendulum") >= 15  # 5 runs of 3 rows (+ none bad)
    assert value(samples, "batchrl_batch_requests_count", model="dt-a") == 1
    assert value(samples, "batchrl_open_sessions") == 1
    assert value(samples, "batchrl_model_sessions", model="dt-a", version="1") == 1
    assert value(samples, "batchrl_queue_depth", model="pendulum", version="2") == 0
    assert value(samples, "batchrl_model_versions_loaded", model="pendulum") == 2
    assert value(samples, "batchrl_model_load_failures_total", model="dt-b") == 1


def test_model_health_follows_load_and_unload(repository, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(repository, repo)
    served = build_server(Registry.open(repo, ["CPUExecutionProvider"]), ServerOptions(admin_token=TOKEN))
    served.start()
    try:
        with PolicyClient(f"127.0.0.1:{served.port}") as client:
            health = health_pb2_grpc.HealthStub(client.channel)

            def status(name):
                return health.Check(health_pb2.HealthCheckRequest(service=name)).status

            assert status("pendulum") == health_pb2.HealthCheckResponse.SERVING
            client.unload_model("pendulum", token=TOKEN)
            assert status("pendulum") == health_pb2.HealthCheckResponse.NOT_SERVING
            client.load_model("pendulum", token=TOKEN)
            assert status("pendulum") == health_pb2.HealthCheckResponse.SERVING
    finally:
        served.stop()


def test_json_logs_are_one_object_per_line():
    record = logging.LogRecord("batchrl.serve", logging.INFO, __file__, 1, "loaded %s", ("pendulum",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "loaded pendulum" and entry["level"] == "INFO" and entry["time"].endswith("Z")


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "hopper-iql", repo / "hopper-iql")  # 256-256: 65,536 rows take a while
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repo), "--address",
                             "127.0.0.1:0", "--metrics-port", "0", "--grace", "30", "--max-batch", "65536"],
                            stderr=subprocess.PIPE, text=True)
    log = []
    try:
        port = metrics_port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            log.append(line)
            if m := re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", line):
                metrics_port = int(m.group(1))
            if m := re.search(r"\(port (\d+)\)", line):
                port = int(m.group(1))
        assert port and metrics_port, "".join(log)
        big = np.random.default_rng(0).normal(size=(65_536, 11)).astype(np.float32)
        results = []
        with PolicyClient(f"127.0.0.1:{port}", timeout=120) as client:
            def call():
                try:
                    results.append(client.act("hopper-iql", big).shape)
                except grpc.RpcError as exc:
                    results.append(exc.code())

            threads = [threading.Thread(target=call) for _ in range(16)]
            for t in threads:
                t.start()
            # once every request has reached the server and some are still running, ask it to stop
            while True:
                samples = scrape(metrics_port)
                in_flight = value(samples, "batchrl_requests_in_flight", rpc="Act") or 0
                done = value(samples, "batchrl_requests_total", model="hopper-iql", rpc="Act", code="OK", worker="0") or 0
                if in_flight + done == 16:
                    break
                time.sleep(0.005)
            assert in_flight >= 2, "the requests finished before the test could stop the server"
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(timeout=60)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.append(proc.stderr.read())
    assert results == [(65_536, 3)] * 16, results  # every request in flight was answered
    assert proc.returncode == 0, "".join(log)
    assert "draining" in "".join(log)


def test_two_stop_signals_in_a_row_still_stop_cleanly(repository):
    """A second signal while the first is being handled must not hang the server."""
    for first, second in ((signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGTERM)):
        proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repository), "--address",
                                 "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
        try:
            while "(port " not in proc.stderr.readline():
                assert proc.poll() is None
            proc.send_signal(first)
            proc.send_signal(second)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
