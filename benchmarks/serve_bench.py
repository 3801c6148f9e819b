"""The serving benchmark (`python -m benchmarks.serve_bench`): how close the policy server gets to bare gRPC and to in-process onnxruntime.

Method. One run starts, as subprocesses pinned with ``taskset -c`` to the
server cores, three servers that stay idle unless measured (one at a time):
the policy server (``batchrl serve``, CPU, defaults otherwise), the same server
with batching off (``--max-batch 1 --max-queue-delay-us 0``), and a bare gRPC
echo (serving/echo.py: same server type, worker count and message limits,
replies as large as the policy server's). Load comes from ``--processes``
spawned processes pinned to the client cores, each holding one channel and
its share of the in-flight requests (threads doing blocking calls); the shares
add up to the requested concurrency exactly. Every request is pre-serialized
once (random float32 observations, ``np.random.default_rng(0)``) and sent and
received as raw bytes, so the client spends the same on the echo as on Act
and the difference between the two is the server's work.

Each measurement has a warm-up (``--warmup``, 1 s) and a window of
``--duration`` seconds on a wall-clock schedule shared by all processes;
requests completing inside the window count, and their latency is
``time.perf_counter`` around the call. Server CPU per request is the server
process's utime+stime (/proc/PID/stat) over the window divided by the
requests. Phases:

1. echo unary, single-observation-sized payloads, at each ``--concurrency``;
2. Act with one observation, same concurrencies;
3. EchoStream ping-pong, one stream per in-flight slot, at concurrency 32
   (for a sequence policy, also its Episode stream: open, then Steps);
4. Act with ``--batch-size`` observations at concurrency 1 and 4;
5. in-process onnxruntime on the same file and intra-op threads, pinned to the
   server cores: back-to-back ``session.run`` with 1 and ``--batch-size`` rows;
6. 64 single-observation clients against batching on, then off;
7. open loop at half the best QPS of phase 2: each process sends on a fixed
   schedule without waiting for answers (futures), and latency runs from the
   scheduled send time, so a stalled server cannot hide its queueing delay;
8. client libraries, side by side at concurrency 32 on the policy server: the
   same closed loop, but each thread calls a Python client library with one
   observation instead of sending pre-serialized bytes: tritonclient's
   ``InferenceServerClient.infer`` (Open Inference Protocol ModelInfer, then
   ``as_numpy("actions")``; one client per process, its ``InferInput`` built
   once per thread) and batchrl's ``PolicyClient.act`` (one client per
   process). Both build and parse every message, so these rows include the
   libraries' own client-side cost (see the client CPU column); the phase is
   skipped for a sequence policy.

The headline ratios (Act/echo QPS, served/in-process batch throughput, p99 at
half load, batching gain, tritonclient/PolicyClient QPS) and every row come
from this run; the report says the machine, its load average, the pinning and
the command that reproduces it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import numpy as np

from batchrl.cli import command_parser
from batchrl.protos.batchrl.v1 import policy_pb2
from batchrl.protos.contract import MAX_MESSAGE_BYTES, MODEL_FILE, version_dirs
from batchrl.serving.dataplane import MAX_BATCH
from batchrl.serving.tensors import decode, encode
from benchmarks.echo import ECHO_METHOD, STREAM_METHOD

# Method paths from the wire contract itself (the OIP's is read where tritonclient is loaded anyway).
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
ACT_METHOD = f"/{SERVICE_NAME}/Act"
EPISODE_METHOD = f"/{SERVICE_NAME}/Episode"


def model_infer_method() -> str:
    from batchrl.serving.server import KSERVE_SERVICE_NAME  # imports tritonclient's protocol modules

    return f"/{KSERVE_SERVICE_NAME}/ModelInfer"


STREAM_CONCURRENCY = 32    # streams in phase 3: each holds a server worker thread while open
BATCH_CONCURRENCIES = (1, 4)
BATCHING_CONCURRENCY = 64  # clients in the batching on/off comparison
HALF_LOAD = 0.5            # phase 7 offers this fraction of the best phase-2 QPS
CLIENT_LIBRARY_CONCURRENCY = STREAM_CONCURRENCY  # phase 8: the load of headline (a), for both libraries
TARGET_ACT_VS_ECHO = 0.7
TARGET_SERVED_VS_IN_PROCESS = 0.4
LEAD = 0.3                 # seconds between sending a job and its warm-up: workers connect meanwhile
REQUEST_TIMEOUT = 30.0     # per request; only a stuck server hits it
STARTUP_TIMEOUT = 90.0     # a busy machine imports onnxruntime slowly
N_PHASES = 8


def progress(message: str) -> None:
    print(f"bench-serve: {message}", file=sys.stderr, flush=True)


# -- settings ------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    model: str = "hopper-iql"
    repository: Path = Path("models")
    duration: float = 10.0
    warmup: float = 1.0
    processes: int = 4
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    batch_size: int = 256
    threads: int = 1
    grpc_threads: int = 64
    server_cores: str = "0"
    client_cores: str = "1"
    output: Path = Path("serve-bench") / "serving"  # made fresh per run (fresh_output); the published
    # results are written with --output benchmarks/results/serving

    def command(self) -> str:
        """The command line that repeats this run, every setting spelled out."""
        args = ["python", "-m", "benchmarks.serve_bench", "--model", self.model, "--repository", str(self.repository),
                "--duration", f"{self.duration:g}", "--warmup", f"{self.warmup:g}",
                "--processes", str(self.processes), "--concurrency", ",".join(map(str, self.concurrency)),
                "--batch-size", str(self.batch_size), "--threads", str(self.threads), "--grpc-threads", str(self.grpc_threads),
                "--server-cores", self.server_cores, "--client-cores", self.client_cores,
                "--output", str(self.output)]
        return shlex.join(args)


def parse_concurrency(text: str) -> tuple[int, ...]:
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--concurrency {text!r}: {item.strip()!r} is not an integer "
                             "(expected a list like 1,8,32,64)") from None
        if value < 1:
            raise ValueError(f"--concurrency {text!r}: {value} requests in flight is not possible; use >= 1")
        values.append(value)
    return tuple(sorted(set(values)))


def check_settings(s: Settings) -> None:
    if not s.duration > 0:
        raise ValueError(f"--duration must be > 0 seconds, got {s.duration}")
    if not s.warmup >= 0:
        raise ValueError(f"--warmup must be >= 0 seconds, got {s.warmup}")
    for name, value in (("--processes", s.processes), ("--batch-size", s.batch_size), ("--threads", s.threads),
                        ("--grpc-threads", s.grpc_threads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if s.batch_size > MAX_BATCH:
        raise ValueError(f"--batch-size {s.batch_size} exceeds the server's maximum batch of {MAX_BATCH}")
    model_dir = s.repository / s.model
    if not model_dir.is_dir():
        there = sorted(p.name for p in s.repository.iterdir() if p.is_dir()) if s.repository.is_dir() else None
        raise FileNotFoundError(f"model {s.model!r} not found: no folder {model_dir}"
                                + (f" (models there: {there})" if there is not None
                                   else f"; repository {s.repository} does not exist"))


def split(concurrency: int, processes: int) -> list[int]:
    """In-flight requests per process, adding up to ``concurrency`` exactly (uneven when it must be)."""
    n = min(concurrency, processes)
    base, extra = divmod(concurrency, n)
    return [base + 1] * extra + [base] * (n - extra)


# -- CPU pinning ---------------------------------------------------------------
@dataclass(frozen=True)
class Pinning:
    server: tuple[int, ...] | None  # None: not pinned
    client: tuple[int, ...] | None
    note: str

    def prefix(self) -> list[str]:
        """What goes in front of a server command line."""
        return [] if self.server is None else ["taskset", "-c", ",".join(map(str, self.server))]


def parse_cpus(text: str, option: str) -> tuple[int, ...]:
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected CPU numbers like 0, 0-3 or 0,2 (as taskset -c)") from None
    return tuple(sorted(cpus))


def choose_pinning(server_spec: str, client_spec: str) -> Pinning:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        note = f"not pinned: only {len(available)} CPU available, servers and load generators share it"
        progress(f"warning: {note}")
        return Pinning(None, None, note)
    if shutil.which("taskset") is None:
        note = "not pinned: taskset (util-linux) is not installed"
        progress(f"warning: {note}")
        return Pinning(None, None, note)
    server, client = parse_cpus(server_spec, "--server-cores"), parse_cpus(client_spec, "--client-cores")
    for option, spec, cpus in (("--server-cores", server_spec, server), ("--client-cores", client_spec, client)):
        missing = sorted(set(cpus) - set(available))
        if missing:
            raise ValueError(f"{option} {spec!r}: CPU(s) {missing} are not available to this process "
                             f"(available: {available})")
    if set(server) & set(client):
        progress(f"warning: server CPUs {list(server)} and client CPUs {list(client)} overlap: the load "
                 "generators compete with the server they measure")
    note = (f"servers and in-process onnxruntime on CPU(s) {','.join(map(str, server))} (taskset -c / "
            f"sched_setaffinity); load generators on CPU(s) {','.join(map(str, client))} (sched_setaffinity)")
    return Pinning(server, client, note)


# -- server subprocesses -------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces: split after it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server subprocess whose output is drained (a full pipe would stall it) and whose port is
    taken from the first output line matching ``port_pattern``."""

    def __init__(self, name: str, argv: list[str], port_pattern: str):
        self.name = name
        self.argv = argv
        self.log: deque[str] = deque(maxlen=40)
        self.port: int | None = None
        self._ready = threading.Event()
        self._pattern = re.compile(port_pattern)
        # Its own session: Ctrl-C reaches only the benchmark, which then stops each server with one SIGTERM
        # and waits for it to drain.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._drain, args=(stream,), daemon=True, name=f"{name}-output").start()

    def _drain(self, stream) -> None:
        for line in stream:
            self.log.append(line.rstrip())
            match = self.port is None and self._pattern.search(line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process closed its output: it has exited

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        self._ready.wait(timeout)
        if self.port is None:
            code = self.proc.poll()
            state = f"printed no port within {timeout:.0f} s" if code is None else f"exited with status {code}"
            raise RuntimeError(f"{self.name} ({shlex.join(self.argv)}) {state}; its last output:\n  "
                               + "\n  ".join(self.log))

    def check_alive(self, during: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} during {during}; its last "
                               "output:\n  " + "\n  ".join(self.log))

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def affinity(self) -> list[int]:
        return sorted(os.sched_getaffinity(self.proc.pid))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, deadline: float) -> None:
        """SIGTERM (the servers drain), then SIGKILL if it is still there at ``deadline`` (time.monotonic)."""
        self.terminate()
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            progress(f"warning: {self.name} did not stop on SIGTERM; killed")
            self.proc.kill()
            self.proc.wait()


def stop_all(servers: list[ServerProcess], grace: float = 5.0) -> None:
    for srv in servers:  # all at once: their drains overlap
        srv.terminate()
    deadline = time.monotonic() + grace
    for srv in servers:
        srv.stop(deadline)


def policy_server(name: str, s: Settings, pinning: Pinning, extra: list[str] = ()) -> ServerProcess:
    # CPU whatever the machine has (pinning measures CPU serving); a short drain, as nothing is in flight
    # when the benchmark stops it.
    argv = [*pinning.prefix(), sys.executable, "-m", "batchrl.cli", "serve", "-r", str(s.repository),
            "--address", "127.0.0.1:0", "--device", "cpu", "--threads", str(s.threads), "--grpc-threads", str(s.grpc_threads),
            "--metrics-port", "0", "--grace", "1", *extra]
    return ServerProcess(name, argv, r"\(port (\d+)\)")


def echo_server(s: Settings, pinning: Pinning, response_bytes: int) -> ServerProcess:
    """Replies (unary and stream) of ``response_bytes``: the size of the policy server's own answer."""
    argv = [*pinning.prefix(), sys.executable, "-m", "benchmarks.echo", "--address", "127.0.0.1:0",
            "--grpc-threads", str(s.grpc_threads), "--response-bytes", str(response_bytes)]
    return ServerProcess("echo server", argv, r"^(\d+)$")


def channel(address: str, own_connection: bool = False) -> grpc.Channel:
    """``own_connection``: a TCP connection of its own (grpcio otherwise shares one between the channels
    of a process with equal arguments, and a connection stays on one server process of a shared port)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               *([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])]
    return grpc.insecure_channel(address, options=options)


# -- load generators (spawned processes) ---------------------------------------
@dataclass(frozen=True)
class Job:
    """One process's share of one measurement. ``kind``: unary (closed loop), stream (ping-pong
    on one stream per slot, after the ``prelude`` messages), open (scheduled sends at ``rate``), or
    a client library in closed loop (``CLIENT_LIBRARIES``: ``payload`` is then the raw float32
    observation of ``shape``, sent to ``model``)."""

    address: str
    method: str
    kind: str
    payload: bytes
    prelude: tuple[bytes, ...] = ()
    model: str = ""
    shape: tuple[int, ...] = ()
    slots: int = 1
    rate: float = 0.0
    offset: float = 0.0     # open loop: this process's first send, seconds after the warm-up begins
    start_wall: float = 0.0  # time.time() at which the measured window opens
    warmup: float = 1.0
    duration: float = 10.0
    connections: bool = False  # unary and stream kinds: a connection per slot instead of one per process


def _load_worker(conn: Connection, cpus: tuple[int, ...] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        try:
            result = run_job(job)
        except Exception as exc:  # noqa: BLE001 - reported by the parent with the job that failed
            result = {"failure": f"{type(exc).__name__}: {exc}"}
        conn.send(result)


def run_job(job: Job) -> dict:
    # Map the shared wall-clock schedule onto this process's perf_counter once.
    start = time.perf_counter() + (job.start_wall - time.time())
    end = start + job.duration
    if job.kind in CLIENT_LIBRARIES:
        return client_library_job(job, start, end)
    with contextlib.ExitStack() as stack:
        # Every slot shares the process's channel (or has its own) and sends the pre-serialized request.
        channels = [stack.enter_context(channel(job.address, job.connections))
                    for _ in range(job.slots if job.connections else 1)]
        for ch in channels:
            try:
                grpc.channel_ready_future(ch).result(timeout=REQUEST_TIMEOUT)
            except grpc.FutureTimeoutError:
                raise RuntimeError(f"cannot connect to {job.address} within {REQUEST_TIMEOUT:.0f} s") from None
        channels = channels * (job.slots // len(channels))
        late = max(0.0, time.perf_counter() - (start - job.warmup))
        if job.kind == "open":
            out = open_loop(channels[0].unary_unary(job.method), job, start, end)
        elif job.kind == "unary":
            calls = [functools.partial(ch.unary_unary(job.method), job.payload, timeout=REQUEST_TIMEOUT)
                     for ch in channels]
            out = closed_loop(unary_slot, calls, job, start, end)
        else:
            out = closed_loop(stream_slot, [ch.stream_stream(job.method) for ch in channels], job, start, end)
    out["late_start"] = late
    return out


def closed_loop(slot, calls: list, job: Job, start: float, end: float) -> dict:
    """One thread per slot, each running ``slot`` with its own call until ``end``."""
    latencies = [[] for _ in calls]
    errors = [Counter() for _ in calls]
    threads = [threading.Thread(target=slot, args=(call, job, start, end, latencies[i], errors[i]))
               for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": np.fromiter((x for rec in latencies for x in rec), dtype=np.float64),
            "errors": dict(sum(errors, Counter()))}


class CallFailed(Exception):
    """A client library's failed call, carrying the gRPC status name it reported (as RpcError.code().name)."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def error_name(exc: Exception) -> str:
    return exc.status if isinstance(exc, CallFailed) else exc.code().name


def triton_calls(job: Job, obs: np.ndarray):
    """tritonclient: one InferenceServerClient for the process (its infer is thread-safe), an InferInput per slot."""
    import tritonclient.grpc as triton  # here, in the load generator: `import serving.bench` stays light
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(job.address)

    def slot_call():
        inputs = [triton.InferInput("observations", list(obs.shape), "FP32")]
        inputs[0].set_data_from_numpy(obs)

        def call() -> np.ndarray:
            try:
                return client.infer(job.model, inputs, client_timeout=REQUEST_TIMEOUT).as_numpy("actions")
            except InferenceServerException as exc:  # tritonclient's form of a grpc.RpcError
                raise CallFailed(str(exc.status() or "UNKNOWN").removeprefix("StatusCode."),
                                 exc.message()) from None
        return call

    return client, [slot_call() for _ in range(job.slots)]


def policy_client_calls(job: Job, obs: np.ndarray):
    """batchrl's PolicyClient: one for the process (one channel, as every other phase), shared by the slots."""
    from batchrl.serving.client import PolicyClient

    client = PolicyClient(job.address, timeout=REQUEST_TIMEOUT)
    client.wait_ready(REQUEST_TIMEOUT)
    return client, [functools.partial(client.act, job.model, obs)] * job.slots


CLIENT_LIBRARIES = {"triton": triton_calls, "batchrl": policy_client_calls}


def client_library_job(job: Job, start: float, end: float) -> dict:
    obs = np.frombuffer(job.payload, dtype=np.float32).reshape(job.shape)
    client, calls = CLIENT_LIBRARIES[job.kind](job, obs)
    try:
        # One call before the warm-up: it connects, and a wrong request fails the job with the server's words.
        try:
            actions = calls[0]()
        except (grpc.RpcError, CallFailed) as exc:
            raise RuntimeError(f"{job.kind} client: first call to {job.address} failed: "
                               f"{exc if isinstance(exc, CallFailed) else f'{exc.code().name}: {exc.details()}'}"
                               ) from None
        if actions.shape[:1] != obs.shape[:1]:
            raise RuntimeError(f"{job.kind} client: {len(obs)} observation(s) got actions of shape "
                               f"{list(actions.shape)}")
        late = max(0.0, time.perf_counter() - (start - job.warmup))
        out = closed_loop(unary_slot, calls, job, start, end)
    finally:
        client.close()
    out["late_start"] = late
    return out


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


def unary_slot(call, job: Job, start: float, end: float, record: list, errors: Counter) -> None:
    """Closed loop: ``call()`` (one request, blocking) back to back; the latency of those ending in the window."""
    _sleep_until(start - job.warmup)
    while (t0 := time.perf_counter()) < end:
        try:
            call()
        except (grpc.RpcError, CallFailed) as exc:
            if start <= time.perf_counter() < end:
                errors[error_name(exc)] += 1
            continue
        t1 = time.perf_counter()
        if start <= t1 < end:
            record.append(t1 - t0)


def stream_slot(call, job: Job, start: float, end: float, record: list, errors: Counter) -> None:
    _sleep_until(start - job.warmup)
    while time.perf_counter() < end:  # a failed stream is counted and replaced
        requests: queue.SimpleQueue = queue.SimpleQueue()
        responses = call(iter(requests.get, None), timeout=end - time.perf_counter() + REQUEST_TIMEOUT)
        try:
            for message in job.prelude:
                requests.put(message)
                next(responses)
            while (t0 := time.perf_counter()) < end:
                requests.put(job.payload)
                next(responses)
                t1 = time.perf_counter()
                if start <= t1 < end:
                    record.append(t1 - t0)
            requests.put(None)
            for _ in responses:
                pass
        except grpc.RpcError as exc:
            if start <= time.perf_counter() < end:
                errors[exc.code().name] += 1
        except StopIteration:
            if start <= time.perf_counter() < end:
                errors["STREAM_ENDED_EARLY"] += 1


def open_loop(call, job: Job, start: float, end: float) -> dict:
    """Send on schedule without waiting for answers; latency from the scheduled time (so a late send
    counts against the server's answer, not in its favour)."""
    latencies: list[float] = []
    errors: Counter = Counter()
    pending = 0
    idle = threading.Condition()

    def done(scheduled: float, future: grpc.Future) -> None:
        nonlocal pending
        t1 = time.perf_counter()
        code = future.code()
        with idle:  # callbacks may run on more than one gRPC thread
            if start <= scheduled < end:
                if code == grpc.StatusCode.OK:
                    latencies.append(t1 - scheduled)
                else:
                    errors[code.name] += 1
            pending -= 1
            idle.notify_all()

    interval, late_sends, sends = 1.0 / job.rate, 0, 0
    scheduled = start - job.warmup + job.offset
    while scheduled < end:
        _sleep_until(scheduled)
        if scheduled >= start:
            sends += 1
            late_sends += time.perf_counter() - scheduled > 1e-3
        with idle:
            pending += 1
        call.future(job.payload, timeout=REQUEST_TIMEOUT).add_done_callback(functools.partial(done, scheduled))
        scheduled += interval
    with idle:
        idle.wait_for(lambda: pending == 0, timeout=REQUEST_TIMEOUT + 5)
        unanswered = pending
    if unanswered:
        errors["UNANSWERED"] += unanswered
    return {"latencies": np.asarray(latencies, dtype=np.float64), "errors": dict(errors), "sends": sends,
            "late_sends": late_sends}


class LoadGenerators:
    """``n`` spawned processes pinned to the client CPUs, reused by every measurement."""

    def __init__(self, n: int, cpus: tuple[int, ...] | None):
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_load_worker, args=(child, cpus), name=f"bench-load-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def wait_ready(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if not conn.poll(STARTUP_TIMEOUT) or conn.recv() != "ready":
                raise RuntimeError(f"load generator {proc.name} did not start within {STARTUP_TIMEOUT:.0f} s "
                                   f"(exit code {proc.exitcode})")

    def send(self, jobs: list[Job]) -> None:
        for conn, job in zip(self.conns, jobs):
            conn.send(job)

    def collect(self, jobs: list[Job]) -> list[dict]:
        results = []
        for conn, proc, job in zip(self.conns, self.procs, jobs):
            wait = job.start_wall + job.duration - time.time() + REQUEST_TIMEOUT + 10
            if not conn.poll(max(wait, 1.0)):
                raise RuntimeError(f"load generator {proc.name} gave no result for {job.method} "
                                   f"(alive: {proc.is_alive()})")
            result = conn.recv()
            if "failure" in result:
                raise RuntimeError(f"load generator {proc.name} failed on {job.method}: {result['failure']}")
            results.append(result)
        return results

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:  # idle workers exit at once; one interrupted mid-job is ended
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


# -- in-process onnxruntime (a spawned process on the server CPUs) -------------
def _in_process_worker(conn: Connection, path: str, threads: int, batch_sizes: list[int], warmup: float,
                       duration: float, cpus: tuple[int, ...] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        import onnxruntime as ort

        from batchrl.serving.runtime import load_model

        model = load_model("in-process", 0, Path(path), ["CPUExecutionProvider"], threads)  # the server's options
        rng = np.random.default_rng(0)
        runs = []
        for batch in batch_sizes:
            feeds = (model.warm_up_feeds() if model.is_sequence else
                     {"observations": rng.standard_normal((batch, *model.observation_shape)).astype(np.float32)})
            until = time.perf_counter() + warmup
            while time.perf_counter() < until:
                model.run(feeds)
            latencies, cpu0 = [], time.process_time()
            start = time.perf_counter()
            end = start + duration
            while (t0 := time.perf_counter()) < end:
                model.run(feeds)
                latencies.append(time.perf_counter() - t0)
            runs.append({"batch": batch, "latencies": np.asarray(latencies), "cpu": time.process_time() - cpu0,
                         "elapsed": time.perf_counter() - start})
        conn.send({"onnxruntime": ort.__version__, "runs": runs})
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        conn.send({"failure": f"{type(exc).__name__}: {exc}"})


def in_process(path: Path, s: Settings, batch_sizes: list[int], cpus: tuple[int, ...] | None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_in_process_worker, daemon=True, name="bench-in-process",
                       args=(child, str(path), s.threads, batch_sizes, s.warmup, s.duration, cpus))
    proc.start()
    child.close()
    try:
        if not parent.poll(STARTUP_TIMEOUT + len(batch_sizes) * (s.warmup + s.duration) + 10):
            raise RuntimeError(f"in-process onnxruntime run on {path} gave no result (exit code {proc.exitcode})")
        result = parent.recv()
        if "failure" in result:
            raise RuntimeError(f"in-process onnxruntime run on {path} failed: {result['failure']}")
        return result
    finally:
        proc.join(timeout=2)  # it exits right after sending; still running only when interrupted
        if proc.is_alive():
            proc.kill()


# -- rows ----------------------------------------------------------------------
@dataclass
class Row:
    phase: int
    name: str
    target: str
    concurrency: int | None  # None: open loop, in flight is whatever the schedule and the server make it
    batch_size: int
    requests: int
    errors: dict[str, int]
    qps: float
    obs_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    cpu_ms_per_request: float | None
    # Busy fraction of the CPUs each side may use: a side near 100% is the bottleneck of the row.
    server_cpu_util: float | None = None
    client_cpu_util: float | None = None
    note: str = ""


def percentiles(latencies: np.ndarray) -> tuple[float | None, float | None, float | None]:
    if latencies.size == 0:
        return None, None, None
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3
    return float(p50), float(p90), float(p99)


def make_row(phase: int, name: str, target: str, concurrency: int | None, batch: int, latencies: np.ndarray,
             errors: dict[str, int], seconds: float, cpu: float | None, note: str = "", **utilisation) -> Row:
    n = int(latencies.size)
    return Row(phase, name, target, concurrency, batch, n, dict(sorted(errors.items())), n / seconds,
               n * batch / seconds, *percentiles(latencies), (cpu * 1e3 / n) if cpu is not None and n else None,
               note=note, **utilisation)


@dataclass
class Workload:
    """What one kind of request looks like on the wire."""

    method: str
    kind: str
    payload: bytes
    prelude: tuple[bytes, ...] = ()
    batch: int = 1
    model: str = ""                # client libraries: the model, and the shape of the observation in payload
    shape: tuple[int, ...] = ()


@dataclass
class Servers:
    on: ServerProcess    # the policy server as `batchrl serve` runs it
    off: ServerProcess   # the same with batching off
    echo: ServerProcess


@dataclass
class Workloads:
    echo_unary: Workload
    echo_stream: Workload
    single: Workload              # Act, one observation
    batch: Workload               # Act, --batch-size observations
    episode: Workload | None      # Episode stream steps: sequence policies only
    triton: Workload | None       # tritonclient ModelInfer, one observation: feed-forward policies only
    policy_client: Workload | None  # PolicyClient.act, the same observation: feed-forward policies only


class Bench:
    def __init__(self, s: Settings, pool: LoadGenerators, pinning: Pinning, servers: Servers | None,
                 work: Workloads | None, model_path: Path | None, phases: int = N_PHASES):
        """``servers``, ``work`` and ``model_path``: what run_phases() needs (measure() needs none of them)."""
        self.s, self.pool, self.pinning, self.servers, self.work = s, pool, pinning, servers, work
        self.phases = phases
        self.model_path = model_path
        self.rows: list[Row] = []
        self.in_process_meta: dict = {}  # onnxruntime version and model file of phase 5
        every = len(os.sched_getaffinity(0))
        self.server_cpus = every if pinning.server is None else len(pinning.server)
        self.client_cpus = every if pinning.client is None else len(pinning.client)

    def measure(self, phase: int, name: str, server: ServerProcess, work: Workload, concurrency: int | None,
                rate: float | None = None, connections: bool = False) -> Row:
        """Closed loop at ``concurrency`` in flight, or (``rate`` given) open loop at ``rate`` req/s;
        ``connections``: a connection per in-flight slot."""
        s = self.s
        server.check_alive(f"the start of phase {phase} ({name})")
        shares = split(concurrency, s.processes) if rate is None else [1] * s.processes
        start_wall = time.time() + LEAD + s.warmup
        jobs = [Job(server.address, work.method, "open" if rate is not None else work.kind, work.payload,
                    work.prelude, work.model, work.shape, slots=n, rate=(rate or 0.0) / len(shares),
                    offset=(i / rate if rate else 0.0),
                    start_wall=start_wall, warmup=s.warmup, duration=s.duration, connections=connections)
                for i, n in enumerate(shares)]
        clients = [proc.pid for proc in self.pool.procs[:len(jobs)]]
        self.pool.send(jobs)
        time.sleep(max(0.0, start_wall - time.time()))
        cpu0, client0 = server.cpu_seconds(), sum(map(cpu_seconds, clients))
        time.sleep(max(0.0, start_wall + s.duration - time.time()))
        cpu1, client1 = server.cpu_seconds(), sum(map(cpu_seconds, clients))
        results = self.pool.collect(jobs)
        server.check_alive(f"phase {phase} ({name})")  # its errors would only say UNAVAILABLE
        latencies = np.concatenate([r["latencies"] for r in results])
        errors: Counter = Counter()
        for r in results:
            errors.update(r["errors"])
        notes = []
        if len(set(shares)) > 1:
            notes.append(f"{'+'.join(map(str, shares))} in flight per process")
        late = max(r["late_start"] for r in results)
        if late > 0.05:
            notes.append(f"a load generator started {late:.2f} s late (shorter warm-up)")
        if rate is not None:
            sends, late_sends = sum(r["sends"] for r in results), sum(r["late_sends"] for r in results)
            notes.append(f"offered {rate:.0f} req/s; {late_sends / max(sends, 1):.1%} of sends >1 ms late")
        row = make_row(phase, name, server.name, concurrency, work.batch, latencies, errors, s.duration,
                       cpu1 - cpu0, "; ".join(notes),
                       server_cpu_util=(cpu1 - cpu0) / s.duration / self.server_cpus,
                       client_cpu_util=(client1 - client0) / s.duration / self.client_cpus)
        self.add(row)
        return row

    def add(self, row: Row) -> None:
        self.rows.append(row)
        errors = f", errors {row.errors}" if row.errors else ""
        p99 = "n/a" if row.p99_ms is None else f"{row.p99_ms:.3f} ms"
        load = "open loop" if row.concurrency is None else f"concurrency {row.concurrency}"
        busy = f", server CPU {pct(row.server_cpu_util)}" + (
            "" if row.client_cpu_util is None else f", client CPU {pct(row.client_cpu_util)}")
        progress(f"[{row.phase}/{self.phases}] {row.name} ({row.target}), {load}, batch "
                 f"{row.batch_size}: {row.qps:,.0f} req/s, {row.obs_per_s:,.0f} obs/s, p99 {p99}{busy}{errors}")

    # -- the phases, in order ---------------------------------------------------
    def run_phases(self) -> None:
        sequence = self.work.episode is not None
        self.unary_floor_and_act(sequence)
        self.streams(sequence)
        self.batches(sequence)
        self.local(sequence)
        self.batching(sequence)
        self.half_load(sequence)
        self.client_libraries(sequence)

    def unary_floor_and_act(self, sequence: bool) -> None:
        for c in self.s.concurrency:
            self.measure(1, "echo unary", self.servers.echo, self.work.echo_unary, c)
        if sequence:
            progress(f"[2/{N_PHASES}] skipped: a sequence policy does not answer Act")
            return
        for c in self.s.concurrency:
            self.measure(2, "Act unary", self.servers.on, self.work.single, c)

    def streams(self, sequence: bool) -> None:
        streams = min(STREAM_CONCURRENCY, self.s.grpc_threads)
        if streams < STREAM_CONCURRENCY:
            progress(f"note: {streams} streams instead of {STREAM_CONCURRENCY}: each open stream holds one of "
                     f"the {self.s.grpc_threads} server gRPC threads")
        self.measure(3, "echo stream", self.servers.echo, self.work.echo_stream, streams)
        if sequence:
            self.measure(3, "Episode stream", self.servers.on, self.work.episode, streams)

    def batches(self, sequence: bool) -> None:
        if sequence:
            progress(f"[4/{N_PHASES}] skipped: a sequence policy takes one observation per step")
            return
        for c in BATCH_CONCURRENCIES:
            self.measure(4, "Act batch", self.servers.on, self.work.batch, c)

    def local(self, sequence: bool) -> None:
        sizes = [1] if sequence else [1, self.s.batch_size]
        progress(f"[5/{N_PHASES}] in-process onnxruntime on {self.model_path}, batch {sizes}, "
                 f"{self.s.threads} intra-op thread(s)")
        result = in_process(self.model_path, self.s, sizes, self.pinning.server)
        self.in_process_meta = {"onnxruntime": result["onnxruntime"], "path": str(self.model_path)}
        for r in result["runs"]:
            self.add(make_row(5, "in-process onnxruntime", "session.run", 1, r["batch"], r["latencies"], {},
                              r["elapsed"], r["cpu"], "server CPU: the in-process runner's own",
                              server_cpu_util=r["cpu"] / r["elapsed"] / self.server_cpus))

    def batching(self, sequence: bool) -> None:
        # Streams hold a server worker each, so a sequence policy gets at most --grpc-threads of them.
        clients = min(BATCHING_CONCURRENCY, self.s.grpc_threads) if sequence else BATCHING_CONCURRENCY
        work = self.work.episode if sequence else self.work.single
        self.measure(6, "batching on", self.servers.on, work, clients)
        self.measure(6, "batching off", self.servers.off, work, clients)

    def half_load(self, sequence: bool) -> None:
        if sequence:
            progress(f"[7/{N_PHASES}] skipped: the open loop sends unary Act requests, which a sequence policy does "
                     "not answer")
            return
        best = max((r for r in self.rows if r.phase == 2), key=lambda r: r.qps)
        if best.qps <= 0:
            raise RuntimeError("phase 2 completed no Act request: no load to halve for phase 7")
        self.measure(7, "open loop, half load", self.servers.on, self.work.single, None, rate=HALF_LOAD * best.qps)

    def client_libraries(self, sequence: bool) -> None:
        if sequence:
            progress(f"[8/{N_PHASES}] skipped: tritonclient ModelInfer and PolicyClient.act without a session "
                     "need a feed-forward policy (a sequence policy answers Episode streams and sequence_id requests)")
            return
        c = CLIENT_LIBRARY_CONCURRENCY
        triton = self.measure(8, "tritonclient ModelInfer", self.servers.on, self.work.triton, c)
        ours = self.measure(8, "batchrl PolicyClient.act", self.servers.on, self.work.policy_client, c)
        # Each row names the other, so the pair reads as one comparison wherever a row is quoted.
        for row, other, what in ((triton, ours, "InferenceServerClient.infer + as_numpy"),
                                 (ours, triton, "PolicyClient.act")):
            versus = f"{row.qps / other.qps:.2f}x the QPS of {other.name}" if other.qps > 0 else ""
            row.note = "; ".join(x for x in (f"{what}, one client per process", versus, row.note) if x)


# -- the run -------------------------------------------------------------------
def model_info(address: str, name: str) -> policy_pb2.ModelInfo:
    from batchrl.serving.client import PolicyClient

    with PolicyClient(address) as client:
        models = client.list_models()
    for info in models:
        if info.name == name:
            return info
    raise ValueError(f"model {name!r} did not load on the server (loaded: {[m.name for m in models]}); "
                     "see the server log")


def act_workload(model: str, obs: np.ndarray) -> Workload:
    request = policy_pb2.ActRequest(model=model, observations=encode(obs))
    return Workload(ACT_METHOD, "unary", request.SerializeToString(), batch=len(obs))


def episode_workload(model: str, obs: np.ndarray) -> Workload:
    """Open, a first step (no reward yet), then steps earning reward 0: the measured messages."""
    step = policy_pb2.StepRequest(observation=encode(obs))
    opening = (policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model=model)).SerializeToString(),
               policy_pb2.EpisodeRequest(step=step).SerializeToString())
    step.reward = 0.0
    return Workload(EPISODE_METHOD, "stream", policy_pb2.EpisodeRequest(step=step).SerializeToString(), opening)


def probe(address: str, work: Workload, action_shape: tuple[int, ...]) -> int:
    """Send one request as the benchmark will, check the answer and return its size in bytes."""
    with channel(address) as ch:
        if work.kind == "unary":
            raw = ch.unary_unary(work.method)(work.payload, timeout=REQUEST_TIMEOUT)
            actions = decode(policy_pb2.ActResponse.FromString(raw).actions, "actions")
            expected = (work.batch, *action_shape)
        else:
            messages = iter([*work.prelude, work.payload])
            raw = list(ch.stream_stream(work.method)(messages, timeout=REQUEST_TIMEOUT))[-1]
            actions = decode(policy_pb2.EpisodeResponse.FromString(raw).step.action, "action")
            expected = action_shape
    if actions.shape != expected:
        raise RuntimeError(f"{work.method} on {address} answered actions of shape {list(actions.shape)}, "
                           f"expected {list(expected)}")
    return len(raw)


def warn_about_model_config(s: Settings) -> None:
    path = s.repository / s.model / "config.json"
    try:
        overrides = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return  # the server refuses the model and says why
    if overrides:
        progress(f"warning: {path} sets {overrides}; it overrides the benchmark's server options "
                 "(batching off, --threads) for this model")


def run(s: Settings) -> dict:
    check_settings(s)
    warn_about_model_config(s)
    pinning = choose_pinning(s.server_cores, s.client_cores)
    uneven = [c for c in s.concurrency if c > s.processes and c % s.processes]
    if uneven:
        progress(f"note: concurrency {uneven} does not divide over {s.processes} processes; the shares differ "
                 "by one request so the total stays exact")
    load_before = os.getloadavg()
    started: list[ServerProcess] = []
    pool = None
    try:
        progress(f"starting {s.processes} load generator(s) and the policy servers")
        pool = LoadGenerators(s.processes, pinning.client)
        on = policy_server("policy server", s, pinning)
        started.append(on)
        off = policy_server("policy server, batching off", s, pinning,
                            ["--max-batch", "1", "--max-queue-delay-us", "0"])
        started.append(off)
        on.wait_ready()
        off.wait_ready()
        version = max(model_info(on.address, s.model).versions, key=lambda v: v.version)  # what Act answers with
        manifest = version.manifest
        obs_shape, action_shape = tuple(manifest.observation_space.shape), tuple(manifest.action_space.shape)
        sequence = manifest.context_length > 0
        obs = np.random.default_rng(0).standard_normal((s.batch_size, *obs_shape)).astype(np.float32)
        single, batch = act_workload(s.model, obs[:1]), act_workload(s.model, obs)
        episode = episode_workload(s.model, obs[0]) if sequence else None
        library = {} if sequence else {"model": s.model, "shape": obs[:1].shape, "payload": obs[:1].tobytes()}
        # Check every request shape on the server that will get it, and measure the response to imitate.
        response_bytes = probe(on.address, episode or single, action_shape)
        probe(off.address, episode or single, action_shape)
        if not sequence:
            probe(on.address, batch, action_shape)
        echo_request = (episode or single).payload  # the echo gets the policy request's own bytes
        echo = echo_server(s, pinning, response_bytes)
        started.append(echo)
        echo.wait_ready()
        pool.wait_ready()
        affinity = {srv.name: srv.affinity() for srv in started}
        progress(f"servers up ({', '.join(f'{srv.name} :{srv.port}' for srv in started)}); "
                 f"{'sequence' if sequence else 'feed-forward'} model {s.model} version {version.version}; "
                 f"{pinning.note}")
        work = Workloads(Workload(ECHO_METHOD, "unary", echo_request), Workload(STREAM_METHOD, "stream", echo_request),
                         single, batch, episode,
                         Workload(model_infer_method(), "triton", **library) if library else None,
                         Workload(ACT_METHOD, "batchrl", **library) if library else None)
        model_path = version_dirs(s.repository / s.model)[version.version] / MODEL_FILE
        bench = Bench(s, pool, pinning, Servers(on, off, echo), work, model_path)
        bench.run_phases()
    finally:
        stop_all(started)
        if pool is not None:
            pool.close()
    return report_data(s, bench.rows, bench.in_process_meta, pinning, affinity, sequence, version.version,
                       response_bytes, len(echo_request), load_before)


# -- report --------------------------------------------------------------------
def find(rows: list[Row], phase: int, name: str, **match) -> list[Row]:
    return [r for r in rows if r.phase == phase and r.name == name
            and all(getattr(r, k) == v for k, v in match.items())]


def headline(rows: list[Row], s: Settings, sequence: bool) -> dict:
    out: dict[str, dict] = {}
    if sequence:
        echo, policy = find(rows, 3, "echo stream"), find(rows, 3, "Episode stream")
        c = echo[0].concurrency
        out["a"] = ratio(f"Episode stream steps/s / EchoStream messages/s, concurrency {c}", policy[0].qps,
                         echo[0].qps, TARGET_ACT_VS_ECHO)
        out["b"] = {"label": "served / in-process batch obs/s", "value": None,
                    "why": "a sequence policy takes one observation per step"}
        out["c"] = {"label": "p99 at half the max load", "value": None,
                    "why": "the open loop sends unary Act requests, which a sequence policy does not answer"}
    else:
        common = sorted({r.concurrency for r in find(rows, 1, "echo unary")}
                        & {r.concurrency for r in find(rows, 2, "Act unary")})
        c = STREAM_CONCURRENCY if STREAM_CONCURRENCY in common else common[-1]
        label = f"Act QPS / echo QPS, single observation, concurrency {c}"
        if c != STREAM_CONCURRENCY:
            label += f" (no {STREAM_CONCURRENCY} in --concurrency: the highest measured)"
        out["a"] = ratio(label, find(rows, 2, "Act unary", concurrency=c)[0].qps,
                         find(rows, 1, "echo unary", concurrency=c)[0].qps, TARGET_ACT_VS_ECHO)
        served = max(find(rows, 4, "Act batch"), key=lambda r: r.obs_per_s)
        local = find(rows, 5, "in-process onnxruntime", batch_size=s.batch_size)[0]
        out["b"] = ratio(f"Act batch-{s.batch_size} obs/s (best: concurrency {served.concurrency}) / in-process "
                         f"onnxruntime batch-{s.batch_size} obs/s", served.obs_per_s, local.obs_per_s,
                         TARGET_SERVED_VS_IN_PROCESS)
        half = find(rows, 7, "open loop, half load")[0]
        best = max(find(rows, 2, "Act unary"), key=lambda r: r.qps)
        out["c"] = {"label": f"p99 latency (ms) at half the max load: open loop at {HALF_LOAD * best.qps:,.0f} req/s, "
                             f"half of {best.qps:,.0f} (Act unary, concurrency {best.concurrency})",
                    "value": half.p99_ms, "p50_ms": half.p50_ms, "p90_ms": half.p90_ms,
                    "offered_qps": HALF_LOAD * best.qps, "target": None}
    on, off = find(rows, 6, "batching on")[0], find(rows, 6, "batching off")[0]
    clients = "Episode streams" if sequence else "single-observation Act clients"
    out["d"] = ratio(f"batching gain: QPS batching on / off, {on.concurrency} {clients}", on.qps, off.qps, None)
    label = f"tritonclient QPS / PolicyClient QPS at concurrency {CLIENT_LIBRARY_CONCURRENCY}"
    if sequence:
        out["e"] = {"label": label, "value": None, "why": "phase 8 needs a feed-forward policy"}
    else:
        triton, ours = find(rows, 8, "tritonclient ModelInfer")[0], find(rows, 8, "batchrl PolicyClient.act")[0]
        out["e"] = ratio(f"{label}, one observation per request: {triton.qps:,.0f} vs {ours.qps:,.0f} req/s, "
                         f"p99 {fmt(triton.p99_ms, 3)} vs {fmt(ours.p99_ms, 3)} ms (informational)",
                         triton.qps, ours.qps, None)
        out["e"].update(p99_ms={"tritonclient": triton.p99_ms, "PolicyClient": ours.p99_ms})
    return out


def ratio(label: str, numerator: float, denominator: float, target: float | None) -> dict:
    value = numerator / denominator if denominator > 0 else None
    met = None if target is None or value is None else value >= target
    return {"label": label, "value": value, "numerator": numerator, "denominator": denominator,
            "target": target, "met": met}


def machine() -> dict:
    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)),
            "processor": platform.processor(), "cpu_model": model_name, "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__}


def report_data(s: Settings, rows: list[Row], in_process_meta: dict, pinning: Pinning, affinity: dict,
                sequence: bool, version: int, response_bytes: int, request_bytes: int,
                load_before: tuple[float, float, float]) -> dict:
    return {
        "command": s.command(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "machine": {**machine(), "onnxruntime": in_process_meta.get("onnxruntime"),
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "pinning": {"server_cpus": pinning.server, "client_cpus": pinning.client, "note": pinning.note,
                    "observed_server_affinity": affinity},
        "model": {"name": s.model, "version": version, "sequence": sequence, "path": in_process_meta.get("path"),
                  "single_request_bytes": request_bytes, "single_response_bytes": response_bytes},
        "headline": headline(rows, s, sequence),
        "phases": [asdict(r) for r in rows],
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def markdown(data: dict) -> str:
    s, m, pin = data["settings"], data["machine"], data["pinning"]
    lines = [f"# Serving benchmark: {data['model']['name']} (version {data['model']['version']})", "",
             "Written by `python -m benchmarks.serve_bench` (its docstring explains the method); every "
             "number below comes from this one run.", "", "## Headline", "",
             "| | ratio | value | target | met |", "|---|---|---|---|---|"]
    for key, h in data["headline"].items():
        value = fmt(h["value"]) + (" ms" if key == "c" and h["value"] is not None else "")
        if h["value"] is None and "why" in h:
            value = f"n/a ({h['why']})"
        target = "" if h.get("target") is None else f">= {h['target']}"
        met = {True: "yes", False: "no", None: ""}[h.get("met")]
        lines.append(f"| ({key}) | {h['label']} | {value} | {target} | {met} |")
    cpu = f"{m['cpu_model']}" + (f", platform.processor() {m['processor']!r}" if m["processor"] else
                                 ", platform.processor() empty")
    lines += ["", "## Conditions", "",
              f"- Machine: nproc {m['nproc']} (usable CPUs {m['usable_cpus']}), {cpu}; {m['platform']}; "
              f"Python {m['python']}, grpcio {m['grpcio']}, onnxruntime {m['onnxruntime']} (CPU).",
              f"- Load average before / after: {' '.join(f'{x:.2f}' for x in m['load_average_before'])} / "
              f"{' '.join(f'{x:.2f}' for x in m['load_average_after'])} (other work on the machine shows here).",
              f"- Pinning: {pin['note']}; observed server affinity {pin['observed_server_affinity']}.",
              f"- Load: {s['processes']} generator process(es), concurrency "
              f"{','.join(map(str, s['concurrency']))} (phases 1-2; phase 8 at {CLIENT_LIBRARY_CONCURRENCY}), "
              f"{s['duration']:g} s per measurement after {s['warmup']:g} s warm-up; server: {s['grpc_threads']} gRPC "
              f"threads, {s['threads']} onnxruntime intra-op thread(s), CPU.",
              f"- Single-observation Act: {data['model']['single_request_bytes']} request bytes, "
              f"{data['model']['single_response_bytes']} response bytes (the echo answers as many).",
              f"- Reproduce: `{data['command']}`", "", "## Results", "",
              "Server / client CPU: the busy fraction of the CPUs each side may use over the window (near "
              "100%: that side limits the row).", "",
              "| phase | target | concurrency | batch | requests | errors | QPS | obs/s | p50 ms | p90 ms | "
              "p99 ms | server CPU ms/req | server CPU | client CPU | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["phases"]:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        concurrency = "open loop" if r["concurrency"] is None else r["concurrency"]
        lines.append(f"| {r['phase']}. {r['name']} | {r['target']} | {concurrency} | {r['batch_size']} | "
                     f"{r['requests']:,} | {errors} | {fmt(r['qps'], 0)} | {fmt(r['obs_per_s'], 0)} | "
                     f"{fmt(r['p50_ms'], 3)} | {fmt(r['p90_ms'], 3)} | {fmt(r['p99_ms'], 3)} | "
                     f"{fmt(r['cpu_ms_per_request'], 3)} | {pct(r['server_cpu_util'])} | "
                     f"{pct(r['client_cpu_util'])} | {r['note']} |")
    return "\n".join(lines) + "\n"


def fresh_output() -> Path:
    """A folder no earlier run wrote, so a first run never overwrites anyone's results."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = Path(f"serve-bench-{stamp}"), 1
    while folder.exists():
        n += 1
        folder = Path(f"serve-bench-{stamp}-{n}")
    return folder / "serving"


def write(data: dict, output: Path) -> tuple[Path, Path]:
    output.parent.mkdir(parents=True, exist_ok=True)
    md, js = Path(f"{output}.md"), Path(f"{output}.json")
    md.write_text(markdown(data))
    js.write_text(json.dumps(data, indent=2) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    parser = command_parser("python -m benchmarks.serve_bench", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=d.model, help="model name in the repository")
    parser.add_argument("--repository", "-r", type=Path, default=d.repository, help="model repository root")
    parser.add_argument("--duration", type=float, default=d.duration, help="measured seconds per measurement")
    parser.add_argument("--warmup", type=float, default=d.warmup,
                        help="unmeasured seconds of load before each measurement")
    parser.add_argument("--processes", type=int, default=d.processes, help="load-generator processes")
    parser.add_argument("--concurrency", default=",".join(map(str, d.concurrency)),
                        help="requests in flight for the single-observation phases, comma-separated")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="observations per request in the throughput phase")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="onnxruntime intra-op threads, server and in-process")
    parser.add_argument("--grpc-threads", type=int, default=d.grpc_threads, help="gRPC worker threads of every server")
    parser.add_argument("--server-cores", default=d.server_cores, help="CPUs for the servers, as taskset -c")
    parser.add_argument("--client-cores", default=d.client_cores, help="CPUs for the load generators")
    parser.add_argument("--output", type=Path, default=None,
                        help="writes OUTPUT.md and OUTPUT.json (default: a new folder serve-bench-<UTC time>/serving "
                             "in the working directory; the published results: benchmarks/results/serving)")
    args = parser.parse_args(argv)
    args.output = args.output or fresh_output()
    settings = Settings(model=args.model, repository=args.repository, duration=args.duration, warmup=args.warmup,
                        processes=args.processes, concurrency=parse_concurrency(args.concurrency),
                        batch_size=args.batch_size, threads=args.threads, grpc_threads=args.grpc_threads,
                        server_cores=args.server_cores, client_cores=args.client_cores, output=args.output)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally blocks stop every subprocess.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        data = run(settings)
    except KeyboardInterrupt:
        progress("interrupted; servers and load generators stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    md, js = write(data, settings.output)
    for key, h in data["headline"].items():
        progress(f"({key}) {h['label']}: {fmt(h['value'])}")
    progress(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
