"""Black-box test harness: a spawned `batchrl serve` process, spoken to with raw gRPC calls.

The tests that use it know the server only by its command line, its log, its metrics endpoint
and the wire contract (the stubs generated from protos/batchrl/v1/*.proto, imported here and
only here), so they hold whatever the server's modules are called inside.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from batchrl.protos.batchrl.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc  # noqa: F401 (re-exported)



@dataclass
class Server:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    port: int | None = None
    metrics_port: int | None = None
    credentials: grpc.ChannelCredentials | None = None  # TLS servers: how tests connect

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def channel(self, *options: tuple[str, object], credentials: grpc.ChannelCredentials | None = None):
        """A channel to the server (``options``: grpc channel arguments as (key, value) pairs)."""
        credentials = credentials or self.credentials
        if credentials is None:
            return grpc.insecure_channel(self.address, options=list(options))
        return grpc.secure_channel(self.address, credentials, options=list(options))

    def policy(self, channel: grpc.Channel | None = None) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(channel or self.channel())

    def health(self, channel: grpc.Channel | None = None) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(channel or self.channel())

    def metrics(self) -> dict:
        """{(sample name, sorted label items): value} from the metrics endpoint."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log):
                return m
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout} s; log:\n{self.log}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def start(repo: Path | str, *args: str, metrics: bool = False, ready: bool = True,
          env: dict[str, str] | None = None, credentials: grpc.ChannelCredentials | None = None,
          python: Path | str = sys.executable) -> Server:
    """Start `batchrl serve -r repo --address 127.0.0.1:0 *args`; returns once it listens (when ``ready``).
    ``env``: variables added to this process's environment for the server (e.g. BATCHRL_ADMIN_TOKEN);
    ``credentials``: how to connect to a TLS server; ``python``: the interpreter of the install to serve from."""
    command = [str(python), "-m", "batchrl.cli", "serve", "-r", str(Path(repo).resolve()), "--address", "127.0.0.1:0", *(["--metrics-port", "0"] if metrics else []),
               *args]
    # Started outside the checkout: from its root, `-m batchrl.cli` would find the folder batchrl/ before
    # the installed package (which a regular, non-editable install needs).
    proc = subprocess.Popen(command, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None, cwd=tempfile.gettempdir())
    server = Server(proc, credentials=credentials)

    def read():
        for line in proc.stdout:
            server.lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    if not ready:
        return server
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        port = re.search(r"\(port (\d+)\)", server.log)
        endpoint = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log)
        if port and (endpoint or not metrics):  # (with --workers N, the supervisor says last)
            server.port = int(port.group(1))
            server.metrics_port = int(endpoint.group(1)) if endpoint else None
            wait_serving(server)
            return server
        if proc.poll() is not None:
            time.sleep(0.1)  # let the reader take the last lines
            raise AssertionError(f"batchrl serve exited with {proc.returncode}:\n{server.log}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"batchrl serve did not start within 60 s:\n{server.log}")


def wait_serving(server: Server, timeout: float = 10.0) -> None:
    with server.channel() as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                  wait_for_ready=True)


@contextlib.contextmanager
def serving(repo: Path | str, *args: str, metrics: bool = False, env: dict[str, str] | None = None,
            credentials: grpc.ChannelCredentials | None = None, python: Path | str = sys.executable):
    """A started server, stopped (SIGTERM, then kill) when the block ends."""
    server = start(repo, *args, metrics=metrics, env=env, credentials=credentials, python=python)
    try:
        yield server
    finally:
        server.stop()
