"""`batchrl serve --workers N`: N server processes on one port, supervised by this one.

gRPC's own recipe for several processes on one host (grpc/examples/python/multiprocessing): each
worker is a fresh interpreter started by exec, so no thread, gRPC object, onnxruntime session or
CUDA context is ever forked; every worker loads the repository itself and binds the same port with
SO_REUSEPORT, and the kernel spreads connections (not RPCs: one channel stays on one worker) over
them. This process holds no model. It probes the port with a plain socket first (so a second group
cannot silently join a port that is in use) and keeps it reserved, starts the workers and restarts
one that dies (with back-off), serves the one metrics endpoint for all of them (Prometheus
multiprocess mode, in a folder of its own, made empty at start), and on SIGTERM or SIGINT drains
every worker (each drains as a lone server does) before it exits.

Workers die with their supervisor, even when it is SIGKILLed (else they keep the port and a new
`serve` finds it in use): each asks the kernel for a SIGTERM when its parent dies (PR_SET_PDEATHSIG,
so it drains as on an operator's SIGTERM), checks that its parent is still the supervisor that
started it (one that died before the request sends nothing), and watches a socket pair shared with
the supervisor, whose end-of-file says the supervisor is gone whatever happened to the signal.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from batchrl.errors import UserError
from batchrl.protos.contract import MANIFEST_KEY, MODEL_FILE, NAME_PATTERN, manifest_from_json, scan_versions
from batchrl.serving.metrics import MULTIPROCESS_ENV
from batchrl.serving.server import DRAIN_BOUND
from batchrl.serving.signals import StopSignals

log = logging.getLogger("batchrl.serve")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds before restarting a worker that died; doubled per quick death
STABLE = 30.0          # a worker that served this long before dying is restarted after BACKOFF_FIRST again
START_TIMEOUT = 300.0  # seconds a worker may take to load the repository and listen
POLL = 0.1             # seconds between checks of the workers while serving
PR_SET_PDEATHSIG = 1   # prctl(2) option: the signal this process gets when its parent (thread) dies


def split_address(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise UserError(f"--address {address!r}: expected HOST:PORT (e.g. 0.0.0.0:50051 or [::]:50051)")
    return host.strip("[]"), int(port)


def reserve_port(address: str) -> tuple[socket.socket, str, int]:
    """Check that ``address`` is free with a plain bind (no SO_REUSEPORT: a port another server holds
    is refused), then hold it with an SO_REUSEPORT socket that never listens, so the workers can bind
    it too (port 0 picks one for all of them). Returns that socket, the address with its port, and the port."""
    host, port = split_address(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {address}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is not "in use"
        try:
            probe.bind(where)
        except OSError as exc:
            raise UserError(f"cannot listen on {address}: {exc.strerror} (another server?)") from None
        port = probe.getsockname()[1]
    reserved = socket.socket(family, kind, proto)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((where[0], port, *where[2:]))
    return reserved, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), port


ONNX_METADATA_PROPS = 14  # ModelProto's field number of metadata_props (StringStringEntryProto: key 1, value 2)


def _varint(data, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value, at, shift = value | (byte & 0x7F) << shift, at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _fields(data, start: int, end: int):
    """(field number, bytes) of each length-delimited field of the protobuf message data[start:end]; the
    others are skipped by their wire type."""
    at = start
    while at < end:
        key, at = _varint(data, at)
        kind = key & 7
        if kind == 0:
            at = _varint(data, at)[1]
        elif kind == 1 or kind == 5:
            at += 8 if kind == 1 else 4
        elif kind == 2:
            size, at = _varint(data, at)
            yield key >> 3, at, at + size
            at += size
        else:
            raise ValueError(f"protobuf wire type {kind} at byte {at}")


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props, read from its top-level fields without onnx or an onnxruntime session:
    the file is mapped, and the graph (its weights) skipped by its length, never read."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        meta = {}
        for number, start, end in _fields(data, 0, len(data)):
            if number == ONNX_METADATA_PROPS:
                entry = {n: bytes(data[a:b]).decode() for n, a, b in _fields(data, start, end)}
                meta[entry.get(1, "")] = entry.get(2, "")
        return meta


def sequence_models(repository: Path) -> list[str]:
    """The models under ``repository`` with a sequence-policy version (a manifest with a context), from the
    manifests alone: the supervisor loads no model, and checks this before any worker spends time loading
    the repository only to refuse it. A file that cannot be read is left to the workers' loading to report."""
    found = []
    if not repository.is_dir():
        return found
    for model_dir in sorted(repository.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir() or not NAME_PATTERN.match(model_dir.name):
            continue
        for folder in scan_versions(model_dir, repository).versions.values():
            try:
                manifest = manifest_from_json(onnx_metadata(folder / MODEL_FILE)[MANIFEST_KEY])
            except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
                continue
            if manifest.context_length > 0:
                found.append(model_dir.name)
                break
    return found


def follow_supervisor(link_fd: int, supervisor: int) -> socket.socket:
    """In a worker, once its stop signals are set up and before anything slow: stop as on SIGTERM (drain,
    exit) once the supervisor is gone, however it went. Returns the link, on which the worker says it serves."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): the link to the supervisor alone says when it dies",
                        os.strerror(ctypes.get_errno()))
    if os.getppid() != supervisor:  # it died before the prctl: no signal will come
        raise UserError(f"the supervisor (pid {supervisor}) that started this worker is gone: not serving")
    link = socket.socket(fileno=link_fd)

    def watch() -> None:  # the fallback: the supervisor never writes, so only its death ends the read
        try:
            while link.recv(1):
                pass
        except OSError:
            pass
        log.warning("the supervisor (pid %d) is gone: draining as on SIGTERM", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="batchrl-supervisor-watch", daemon=True).start()
    return link


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    # The supervisor's end of a socket pair, open as long as the worker is known: the worker writes one
    # byte on it once it serves, and takes its end-of-file as the supervisor's death.
    link: socket.socket
    served_since: float | None = None  # None until the worker said it serves


class WorkerGroup:
    def __init__(self, argv: list[str], processes: int, address: str, env: dict[str, str], grace: float,
                 metrics_dir: str | None):
        self.argv, self.address, self.env = argv, address, env
        self.grace, self.metrics_dir = grace, metrics_dir
        self.workers: dict[int, Worker] = {}
        self.quick_deaths = [0] * processes  # deaths in a row without serving STABLE seconds
        self.restart_at: dict[int, float] = {}
        self.restarts = 0

    def start(self, index: int) -> Worker:
        """Start worker ``index``. Called from the main thread only: PR_SET_PDEATHSIG fires when the thread
        that started the worker exits, which must be the whole supervisor, not a helper thread."""
        mine, theirs = socket.socketpair()
        command = [sys.executable, "-m", "batchrl.cli", "serve", *self.argv, "--address", self.address,
                   "--reuse-port", "--worker-index", str(index), "--ready-fd", str(theirs.fileno()),
                   "--supervisor-pid", str(os.getpid())]
        try:  # (close_fds: no worker inherits another's link, which would hide the supervisor's death from it)
            proc = subprocess.Popen(command, env=self.env, pass_fds=(theirs.fileno(),))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        worker = self.workers[index] = Worker(index, proc, mine)
        log.info("worker %d started (pid %d)", index, proc.pid)
        return worker

    def wait_ready(self, workers: list[Worker], signals: StopSignals) -> signal.Signals | None:
        """Until every one of ``workers`` serves; a stop signal meanwhile is returned. A worker that exits
        first is an error: at start that is a mistake in the command line or the repository, not bad luck."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {w.link: w for w in workers}
        while waiting:
            if (received := signals.wait(0)) is not None:
                return received
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"worker(s) {sorted(w.index for w in waiting.values())} did not start serving "
                                f"within {START_TIMEOUT:g} s")
            for fd in select.select(list(waiting), [], [], min(POLL, left))[0]:
                worker = waiting.pop(fd)
                if not self.read_ready(worker):
                    code = worker.proc.wait()
                    error = UserError(f"worker {worker.index} exited with status {code} before serving (its "
                                      f"log is above)")
                    error.exit_code = code if code > 0 else 1
                    raise error
        return None

    @staticmethod
    def read_ready(worker: Worker) -> bool:
        """Whether the worker said it serves (one byte); False when its link closed without one (it exited)."""
        try:
            answered = worker.link.recv(1)
        except OSError:  # (reset: the worker died)
            answered = b""
        if answered:
            worker.served_since = time.monotonic()
        return bool(answered)

    def serve(self, signals: StopSignals) -> signal.Signals:
        """Keep every worker up until a stop signal; returns that signal."""
        while True:
            if (received := signals.wait(POLL)) is not None:
                return received
            now = time.monotonic()
            for index, worker in list(self.workers.items()):
                if index in self.restart_at:  # dead (its link closed), to be started again
                    continue
                if worker.served_since is None and select.select([worker.link], [], [], 0)[0] \
                        and self.read_ready(worker):  # a restarted worker
                    log.info("worker %d (pid %d) serving again", index, worker.proc.pid)
                code = worker.proc.poll()
                if code is None:
                    continue
                self.forget(worker)
                served = worker.served_since is not None and now - worker.served_since >= STABLE
                self.quick_deaths[index] = 0 if served else self.quick_deaths[index] + 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, self.quick_deaths[index] - 1))
                self.restart_at[index] = now + delay
                log.warning("worker %d (pid %d) exited with status %d; restarting it in %.1f s", index,
                            worker.proc.pid, code, delay)
            for index, when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[index]
                    self.restarts += 1
                    self.start(index)

    def forget(self, worker: Worker) -> None:
        worker.link.close()
        if self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.proc.pid, self.metrics_dir)  # its live gauges drop out

    def drain(self, received: signal.Signals) -> int:
        """Pass the stop signal on to every worker and wait for them to drain; 0 when all stopped cleanly."""
        live = [w for w in self.workers.values() if w.proc.poll() is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(received)
        deadline = time.monotonic() + self.grace + DRAIN_BOUND + 5
        code = 0
        for worker in self.workers.values():
            try:
                status = worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) had not stopped %.0f s after %s; killing it", worker.index,
                          worker.proc.pid, self.grace + DRAIN_BOUND + 5, received.name)
                worker.proc.kill()
                status = worker.proc.wait()
            if worker in live and status != 0:
                code = 1
        return code

    def kill(self) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def supervise(args, argv: list[str]) -> int:
    """Run ``args.workers`` copies of `batchrl serve argv` on one port until SIGTERM or SIGINT."""
    signals = StopSignals()
    reserved, address, port = reserve_port(args.address)
    env, metrics_dir, endpoint = dict(os.environ), None, None
    if args.metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="batchrl-metrics-")  # empty: no figures of an earlier group
        env[MULTIPROCESS_ENV] = metrics_dir
    group = WorkerGroup(argv, args.workers, address, env, args.grace, metrics_dir)
    try:
        received = group.wait_ready([group.start(i) for i in range(args.workers)], signals)
        if received is None:
            if metrics_dir:
                endpoint = serve_metrics(metrics_dir, args.metrics_port, args.metrics_address)
            log.info("%d workers serving on %s (port %d), each with its own copy of the repository's models",
                     args.workers, args.address, port)
            received = group.serve(signals)
        log.info("%s: draining %d workers", received.name, args.workers)
        code = group.drain(received)
        log.info("stopped (%d worker restart(s) while serving)", group.restarts)
        return code
    finally:
        group.kill()
        if endpoint is not None:
            endpoint.shutdown()
            endpoint.server_close()
        reserved.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve_metrics(metrics_dir: str, port: int, address: str):
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    http, _ = start_http_server(port, address, registry=registry)
    log.info("metrics on http://%s:%d/metrics (all workers)", address, http.server_port)
    return http
