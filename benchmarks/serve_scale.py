"""Serving beyond one process (`python -m benchmarks.serve_scale`): what shared sessions, streaming Act,
failover and worker processes cost or give, measured in one run with the load generators, pinning and
rows of the serving benchmark (benchmarks/serve_bench.py).

Phases:
1. sessions: Decision Transformer Episode streams (one session each, Steps back to back) at
   ``--sessions`` concurrent sessions against `batchrl serve` with the in-process store, then the same
   server with ``--session-store`` on Redis. Headline: Redis steps/s over in-process steps/s.
2. ActStream against unary Act, one observation, ``--in-flight`` calls (streams) at once on the
   feed-forward model. Headline: ActStream messages/s over Act requests/s.
3. failover gap: three replicas sharing Redis (pinned to the server cores), ``--failover-sessions``
   sessions stepping back to back through PolicyClient with Failover (back-off ``--backoff``), each
   starting at a different replica; one replica is SIGKILLed. For every session that was on it: the
   time from the kill to its first step answered by another replica.
4. workers: `batchrl serve --workers N` for each N of ``--workers``, unary Act from
   ``--worker-connections`` connections (one per in-flight call: SO_REUSEPORT spreads connections, not
   calls); requests/s per N and the RSS of each worker. This shows scaling only with the load
   generators on cores of their own and at least N server cores (say where it ran).

Redis is the one at ``--redis`` (default $REDIS_URL, else 127.0.0.1:6379), not pinned: the report says so.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from batchrl.cli import command_parser
from batchrl.protos.batchrl.v1 import policy_pb2
from benchmarks import serve_bench as sb

ACT_STREAM_METHOD = f"/{sb.SERVICE_NAME}/ActStream"
TARGET_REDIS_VS_MEMORY = 0.7
TARGET_STREAM_VS_UNARY = 1.3
PHASES = 4


@dataclass(frozen=True)
class Scale:
    bench: sb.Settings               # repository, durations, load generators, pinning (the serving benchmark's)
    sequence_model: str = "hopper-dt"
    sessions: int = 32
    in_flight: int = 32
    rounds: int = 3                  # phases 1 and 2 alternate their two measurements this many times
    redis: str = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    failover_sessions: tuple[int, ...] = (12, 48)  # one kill per count: light load, then busy replicas
    backoff: float = 0.05
    workers: tuple[int, ...] = (1, 2, 4, 8)
    worker_connections: int = 64

    def command(self) -> str:
        b = self.bench
        return " ".join(["python -m benchmarks.serve_scale", "--repository", str(b.repository), "--model", b.model,
                         "--sequence-model", self.sequence_model, "--duration", f"{b.duration:g}", "--warmup",
                         f"{b.warmup:g}", "--processes", str(b.processes), "--sessions", str(self.sessions),
                         "--in-flight", str(self.in_flight), "--rounds", str(self.rounds),
                         "--failover-sessions", ",".join(map(str, self.failover_sessions)),
                         "--backoff", f"{self.backoff:g}", "--workers", ",".join(map(str, self.workers)),
                         "--worker-connections", str(self.worker_connections), "--server-cores", b.server_cores,
                         "--client-cores", b.client_cores, "--output", str(b.output)])


class Group(sb.ServerProcess):
    """`batchrl serve --workers N`: its CPU time and memory are its workers' too."""

    def workers(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def cpu_seconds(self) -> float:
        return sum(sb.cpu_seconds(pid) for pid in [self.proc.pid, *self.workers()])

    def rss_mib(self) -> list[float]:
        """Resident memory of each process that serves (the lone server, or each worker)."""
        sizes = []
        for pid in self.workers() or [self.proc.pid]:
            with open(f"/proc/{pid}/status") as f:
                sizes += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")]
        return sizes


def server(name: str, scale: Scale, pinning: sb.Pinning, *extra: str, workers: int = 1) -> Group:
    b = scale.bench
    argv = [*pinning.prefix(), sys.executable, "-m", "batchrl.cli", "serve", "-r", str(b.repository),
            "--address", "127.0.0.1:0", "--device", "cpu", "--threads", str(b.threads), "--grace", "1",
            "--workers", str(workers), *extra]
    # A group is ready when its supervisor says all its workers serve.
    return Group(name, argv, r"workers serving on .*\(port (\d+)\)" if workers > 1 else r"\(port (\d+)\)")


def redis_store(scale: Scale, prefix: str) -> list[str]:
    return ["--session-store", scale.redis, "--session-key-prefix", prefix]


def clear_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def observation(address: str, model: str) -> np.ndarray:
    version = max(sb.model_info(address, model).versions, key=lambda v: v.version)
    shape = tuple(version.manifest.observation_space.shape)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def sessions_phase(bench: sb.Bench, scale: Scale, pinning: sb.Pinning, prefix: str) -> dict:
    memory = server("DT, in-process store", scale, pinning)
    shared = server("DT, Redis store", scale, pinning, *redis_store(scale, prefix))
    try:
        for srv in (memory, shared):
            srv.wait_ready()
        work = sb.episode_workload(scale.sequence_model, observation(memory.address, scale.sequence_model))
        qps = alternate(scale, {srv: functools.partial(bench.measure, 1, "Episode steps", srv, work, scale.sessions)
                                for srv in (memory, shared)})
    finally:
        sb.stop_all([memory, shared])
    return sb.ratio(f"DT Step throughput, Redis store / in-process store, {scale.sessions} sessions, median of "
                    f"{scale.rounds}", qps[shared], qps[memory], TARGET_REDIS_VS_MEMORY)


def alternate(scale: Scale, measurements: dict) -> dict:
    """Each measurement once per round, in turn, for ``scale.rounds`` rounds: the median req/s of each."""
    qps = {key: [] for key in measurements}
    for _ in range(scale.rounds):
        for key, measure in measurements.items():
            qps[key].append(measure().qps)
    return {key: float(np.median(values)) for key, values in qps.items()}


def act_stream_phase(bench: sb.Bench, scale: Scale, pinning: sb.Pinning) -> dict:
    srv = server("feed-forward", scale, pinning)
    try:
        srv.wait_ready()
        obs = observation(srv.address, scale.bench.model)[None]
        request = policy_pb2.ActRequest(model=scale.bench.model, observations=sb.encode(obs)).SerializeToString()
        measure = functools.partial(bench.measure, 2, server=srv, concurrency=scale.in_flight)
        qps = alternate(scale, {
            "unary": functools.partial(measure, name="Act unary", work=sb.Workload(sb.ACT_METHOD, "unary", request)),
            "stream": functools.partial(measure, name="ActStream",
                                        work=sb.Workload(ACT_STREAM_METHOD, "stream", request))})
    finally:
        sb.stop_all([srv])
    return sb.ratio(f"ActStream msgs/s / unary Act req/s, {scale.in_flight} in flight, median of {scale.rounds}",
                    qps["stream"], qps["unary"], TARGET_STREAM_VS_UNARY)


def failover_phase(scale: Scale, pinning: sb.Pinning, prefix: str, sessions: int) -> dict:
    from batchrl.serving.client import Failover, PolicyClient

    replicas = [server(f"replica {i}", scale, pinning, *redis_store(scale, prefix)) for i in range(3)]
    everywhere = os.sched_getaffinity(0)
    try:
        for srv in replicas:
            srv.wait_ready()
        addresses = [srv.address for srv in replicas]
        obs = observation(addresses[0], scale.sequence_model)
        if pinning.client is not None:  # the stepping threads, started below, inherit it
            os.sched_setaffinity(0, pinning.client)
        stop, killed_at, gaps, errors = threading.Event(), [None], {}, []
        steps, latencies = [0] * sessions, []  # (latencies: of the steps before the kill)
        ready = threading.Barrier(sessions + 1)

        def play(i: int) -> None:
            rotated = addresses[i % 3:] + addresses[:i % 3]
            failover = Failover(tries=8, backoff=scale.backoff, deadline=30)
            try:
                with PolicyClient(rotated, failover=failover) as client:
                    sid = client.open_session(scale.sequence_model).session_id
                    ready.wait()
                    while not stop.is_set():
                        before, sent = client.retries, time.perf_counter()
                        client.step(sid, obs, None if steps[i] == 0 else 0.0, index=steps[i])
                        answered = time.perf_counter()
                        if killed_at[0] is None:
                            latencies.append(answered - sent)
                        steps[i] += 1
                        if client.retries > before and killed_at[0] is not None and i not in gaps:
                            gaps[i] = answered - killed_at[0]
                    client.close_session(sid)
            except Exception as exc:  # noqa: BLE001 - reported in the results
                errors.append(f"session {i}: {exc!r}")

        threads = [threading.Thread(target=play, args=(i,)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        ready.wait()
        time.sleep(scale.bench.warmup + scale.bench.duration / 2)
        killed_at[0] = time.perf_counter()
        replicas[0].proc.send_signal(signal.SIGKILL)
        time.sleep(scale.bench.duration / 2)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sb.stop_all(replicas)
        os.sched_setaffinity(0, everywhere)
    moved = sorted(gaps.values())
    on_killed = len(range(0, sessions, 3))
    ms = (lambda q: float(np.percentile(moved, q)) * 1e3) if moved else (lambda q: None)
    result = {"sessions": sessions, "on_killed_replica": on_killed, "moved": len(moved),
              "backoff_ms": scale.backoff * 1e3, "p50_ms": ms(50), "p99_ms": ms(99),
              "max_ms": moved[-1] * 1e3 if moved else None, "steps": sum(steps), "errors": errors,
              "step_p50_ms_before": float(np.median(latencies)) * 1e3 if latencies else None,
              "step_p99_ms_before": float(np.percentile(latencies, 99)) * 1e3 if latencies else None}
    sb.progress(f"[3/{PHASES}] failover gap over {len(moved)} moved sessions: p50 {sb.fmt(result['p50_ms'], 1)} ms, "
                f"p99 {sb.fmt(result['p99_ms'], 1)} ms, "
                f"{len(errors)} error(s)")
    return result


def workers_phase(bench: sb.Bench, scale: Scale, pinning: sb.Pinning, prefix: str) -> list[dict]:
    out = []
    for n in scale.workers:  # (the repository's sequence models need the shared store with several workers)
        group = server(f"--workers {n}", scale, pinning, *redis_store(scale, prefix), workers=n)
        try:
            group.wait_ready()
            obs = observation(group.address, scale.bench.model)[None]
            request = policy_pb2.ActRequest(model=scale.bench.model, observations=sb.encode(obs)).SerializeToString()
            row = bench.measure(4, "Act unary", group, sb.Workload(sb.ACT_METHOD, "unary", request),
                                scale.worker_connections, connections=True)
            out.append({"workers": n, "qps": row.qps, "p99_ms": row.p99_ms, "errors": row.errors,
                        "rss_mib": group.rss_mib(), "server_cpu_util": row.server_cpu_util})
        finally:
            sb.stop_all([group])
    return out


def run(scale: Scale) -> dict:
    b = scale.bench
    sb.check_settings(b)
    pinning = sb.choose_pinning(b.server_cores, b.client_cores)
    load_before = os.getloadavg()
    prefix = f"bench-scale-{uuid.uuid4().hex[:8]}:"
    pool = sb.LoadGenerators(b.processes, pinning.client)
    try:
        pool.wait_ready()
        bench = sb.Bench(b, pool, pinning, None, None, None, phases=PHASES)
        sessions = sessions_phase(bench, scale, pinning, prefix)
        stream = act_stream_phase(bench, scale, pinning)
        failover = [failover_phase(scale, pinning, prefix, n) for n in scale.failover_sessions]
        workers = workers_phase(bench, scale, pinning, prefix)
    finally:
        pool.close()
        clear_prefix(scale.redis, prefix)
    server_cpus = len(pinning.server) if pinning.server is not None else len(os.sched_getaffinity(0))
    return {"command": scale.command(), "machine": sb.machine(), "pinning": pinning.note, "server_cpus": server_cpus,
            "load_before": load_before, "load_after": os.getloadavg(), "redis": scale.redis,
            "settings": {**asdict(scale), "bench": {k: str(v) for k, v in asdict(b).items()}},
            "headline": {"sessions": sessions, "act_stream": stream}, "failover": failover, "workers": workers,
            "rows": [asdict(r) for r in bench.rows]}


def markdown(data: dict) -> str:
    h = data["headline"]
    lines = ["# Serving beyond one process", "", f"`{data['command']}`", "",
             f"Machine: {data['machine']['cpu_model']}, {data['machine']['nproc']} CPUs; {data['pinning']}; "
             f"Redis: {data['redis']} (not pinned); load average before {data['load_before'][0]:.2f}, after "
             f"{data['load_after'][0]:.2f}.{' ' + data['note'] if data.get('note') else ''}", "",
             "| figure | value | target |", "|---|---|---|"]
    for r in h.values():
        lines.append(f"| {r['label']} ({sb.fmt(r['numerator'], 0)} / {sb.fmt(r['denominator'], 0)}) | "
                     f"{sb.fmt(r['value'])} | >= {r['target']} ({'met' if r['met'] else 'not met'}) |")
    for f in data["failover"]:
        lines.append(f"| failover gap, {f['sessions']} sessions on 3 replicas: SIGKILL to the first step answered "
                     f"elsewhere, p99 over {f['moved']} moved sessions (of {f['on_killed_replica']} on the killed "
                     f"replica) | {sb.fmt(f['p99_ms'], 1)} ms (p50 {sb.fmt(f['p50_ms'], 1)}, max "
                     f"{sb.fmt(f['max_ms'], 1)}; before the kill a step took {sb.fmt(f['step_p50_ms_before'], 1)} ms "
                     f"at p50, {sb.fmt(f['step_p99_ms_before'], 1)} at p99) | < 100 ms (the client moves to another "
                     f"replica at once; its {f['backoff_ms']:g} ms back-off starts after every address failed); "
                     f"{len(f['errors'])} error(s) reached a caller |")
    lines += ["", "Workers (`--workers N`, one connection per in-flight call):", ""]
    if max(w["workers"] for w in data["workers"]) > data["server_cpus"]:
        lines += [f"All workers share the {data['server_cpus']} server CPU(s) given: these rows show what more "
                  "processes cost on the same cores, not scaling. Scaling needs at least N server cores and load "
                  "generators on cores of their own (`--server-cores 0-7 --client-cores 8-15`).", ""]
    lines += [
              "| N | Act req/s | p99 ms | errors | server CPU busy | RSS per worker (MiB) |", "|---|---|---|---|---|---|"]
    for w in data["workers"]:
        lines.append(f"| {w['workers']} | {w['qps']:,.0f} | {sb.fmt(w['p99_ms'], 3)} | {w['errors'] or ''} | "
                     f"{sb.pct(w['server_cpu_util'])} | {', '.join(f'{m:.0f}' for m in w['rss_mib'])} |")
    lines += ["", "Every measured row:", "", "| phase | name | target | in flight | req/s | p50 ms | p99 ms | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['phase']} | {r['name']} | {r['target']} | {r['concurrency']} | {r['qps']:,.0f} | "
                     f"{sb.fmt(r['p50_ms'], 3)} | {sb.fmt(r['p99_ms'], 3)} | {r['errors'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    d, ds = Scale(sb.Settings()), sb.Settings()
    parser = command_parser("python -m benchmarks.serve_scale", "Serving beyond one process: shared sessions, "
                            "ActStream, failover and worker processes, measured in one run.")
    parser.add_argument("--repository", "-r", type=Path, default=ds.repository)
    parser.add_argument("--model", default=ds.model, help="the feed-forward model (phases 2 and 4)")
    parser.add_argument("--sequence-model", default=d.sequence_model, help="the sequence model (phases 1 and 3)")
    parser.add_argument("--duration", type=float, default=ds.duration, help="measured seconds per measurement")
    parser.add_argument("--warmup", type=float, default=ds.warmup)
    parser.add_argument("--processes", type=int, default=ds.processes, help="load-generator processes")
    parser.add_argument("--sessions", type=int, default=d.sessions)
    parser.add_argument("--in-flight", type=int, default=d.in_flight)
    parser.add_argument("--rounds", type=int, default=d.rounds, help="alternations of phases 1 and 2 (medians)")
    parser.add_argument("--redis", default=d.redis, help="Redis URL for the shared store")
    parser.add_argument("--failover-sessions", default=",".join(map(str, d.failover_sessions)),
                        help="sessions stepping in phase 3, one kill per count")
    parser.add_argument("--backoff", type=float, default=d.backoff, help="the failover client's first back-off")
    parser.add_argument("--workers", default=",".join(map(str, d.workers)), help="worker counts of phase 4")
    parser.add_argument("--worker-connections", type=int, default=d.worker_connections)
    parser.add_argument("--server-cores", default=ds.server_cores, help="CPUs for the servers, as taskset -c")
    parser.add_argument("--client-cores", default=ds.client_cores, help="CPUs for the load generators")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else the machine ran)")
    parser.add_argument("--output", type=Path, default=None,
                        help="results as OUTPUT.md and OUTPUT.json (default: serve-bench-<time>/serving-scale, "
                             "a new folder; published: benchmarks/results/serving-scale)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = sb.fresh_output().parent / "serving-scale"
    bench = replace(ds, model=args.model, repository=args.repository, duration=args.duration, warmup=args.warmup,
                    processes=args.processes, server_cores=args.server_cores, client_cores=args.client_cores,
                    output=args.output)
    scale = Scale(bench, args.sequence_model, args.sessions, args.in_flight, args.rounds, args.redis,
                  sb.parse_concurrency(args.failover_sessions), args.backoff, sb.parse_concurrency(args.workers),
                  args.worker_connections)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally blocks stop every server it started.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        data = run(scale)
    except KeyboardInterrupt:
        sb.progress("interrupted; servers and load generators stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    data["note"] = args.note
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.md").write_text(markdown(data))
    Path(f"{args.output}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
