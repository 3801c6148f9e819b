"""Where the policy server's time goes: single-observation Act at 32 in flight, with its stages taken
away one at a time, beside the bare gRPC echo of `benchmarks.serve_bench` (headline (a)).

    python -m benchmarks.serve_stages            # writes benchmarks/results/serving-stages.md and .json

Every variant is the real server (``serving.server.build_server`` over the real
repository, gRPC worker pool and metrics) with one part replaced, run as its own
process pinned like bench-serve (servers on ``--server-cores``, the load
generators of ``serving.bench`` on ``--client-cores``) and measured the same way
(closed loop, pre-serialized requests, server CPU from /proc):

- ``full``: `batchrl serve` as shipped;
- ``batcher, no onnxruntime``: the batcher with a model run that returns zeros
  (no onnxruntime call, so no GIL release inside the run);
- ``no batcher``: every request calls onnxruntime itself (``session.run``
  concurrently from the request threads);
- ``no model``: decode and validation of the observation and the encoded
  response, but neither batcher nor onnxruntime;
- ``constant answer``: Act returns a prebuilt response (gRPC, protobuf, the
  error guard and the metrics only).

A profiling aid for the serving code, not a product benchmark: it patches
the server in its own process only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

STAGES = {
    "full": "`batchrl serve` as shipped",
    "batcher, no onnxruntime": "batcher kept; the model run returns zeros",
    "no batcher": "each request calls onnxruntime itself",
    "no model": "decode, validation, response; no batcher, no onnxruntime",
    "constant answer": "Act returns a prebuilt response",
}


# -- one variant's server (a subprocess) ----------------------------------------
def serve(stage: str, repository: Path, grpc_threads: int, threads: int) -> None:
    from batchrl.serving import server as srv
    from batchrl.serving.batcher import BatchLimits
    from batchrl.serving.metrics import Metrics
    from batchrl.serving.repository import Registry
    from batchrl.serving.runtime import LoadedModel
    from batchrl.serving.signals import StopSignals

    if stage == "batcher, no onnxruntime":
        LoadedModel.run = lambda self, feeds: np.zeros((len(next(iter(feeds.values()))), *self.action_shape), np.float32)
    elif stage == "no batcher":
        LoadedModel.infer = lambda self, feeds, deadline=None: self.run(feeds)
    elif stage == "no model":
        LoadedModel.infer = lambda self, feeds, deadline=None: np.zeros((len(next(iter(feeds.values()))),
                                                                         *self.action_shape), np.float32)
    elif stage == "constant answer":
        def constant(self, call, request, deadline):
            model = self._model(call, request.model, None)
            return srv.policy_pb2.ActResponse(model=model.name, version=model.version,
                                              actions=srv.encode(np.zeros((1, *model.action_shape), np.float32)))
        srv.PolicyService._act = constant
    elif stage != "full":
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    metrics = Metrics()
    registry = Registry.open(repository, ["CPUExecutionProvider"], threads, BatchLimits(), metrics=metrics)
    served = srv.build_server(registry, srv.ServerOptions(grpc_threads=grpc_threads), metrics=metrics)
    signals = StopSignals()
    served.start()
    print(f"metrics on port {metrics.serve(0, '127.0.0.1')}", flush=True)
    print(f"serving (port {served.port})", flush=True)
    signals.wait()
    served.stop()


# -- the driver ----------------------------------------------------------------------
def run(args) -> dict:
    from benchmarks import serve_bench as bench

    s = bench.Settings(model=args.model, repository=args.repository, duration=args.duration, warmup=args.warmup,
                       processes=args.processes, threads=args.threads, grpc_threads=args.grpc_threads, server_cores=args.server_cores,
                       client_cores=args.client_cores)
    bench.check_settings(s)
    pinning = bench.choose_pinning(s.server_cores, s.client_cores)
    started, pool = [], None
    try:
        pool = bench.LoadGenerators(s.processes, pinning.client)
        servers = {}
        for stage in STAGES:
            argv = [*pinning.prefix(), sys.executable, "-m", "benchmarks.serve_stages", "--serve", stage,
                    "--repository", str(s.repository), "--grpc-threads", str(s.grpc_threads), "--threads", str(s.threads)]
            servers[stage] = bench.ServerProcess(stage, argv, r"\(port (\d+)\)")
            started.append(servers[stage])
        for server in servers.values():
            server.wait_ready()
        info = bench.model_info(servers["full"].address, s.model)
        manifest = max(info.versions, key=lambda v: v.version).manifest
        if manifest.context_length > 0:
            raise ValueError(f"{s.model} is a sequence policy; Act needs a feed-forward one")
        obs = np.random.default_rng(0).standard_normal((1, *manifest.observation_space.shape)).astype(np.float32)
        single = bench.act_workload(s.model, obs)
        action_shape = tuple(manifest.action_space.shape)
        response_bytes = bench.probe(servers["full"].address, single, action_shape)
        for stage in STAGES:
            bench.probe(servers[stage].address, single, action_shape)
        echo = bench.echo_server(s, pinning, response_bytes)
        started.append(echo)
        echo.wait_ready()
        pool.wait_ready()
        measure = bench.Bench(s, pool, pinning, None, None, Path()).measure
        rows, batching = {}, {}
        for _ in range(args.rounds):  # alternate, so drift on the machine spreads over every variant
            for name, server, work in [("echo", echo, bench.Workload(bench.ECHO_METHOD, "unary", single.payload))] + [
                    (stage, servers[stage], single) for stage in STAGES]:
                before = batch_totals(server, s.model)
                rows.setdefault(name, []).append(measure(1, name, server, work, args.concurrency))
                after = batch_totals(server, s.model)
                if before and after[1] > before[1]:
                    batching.setdefault(name, []).append((after[0] - before[0]) / (after[1] - before[1]))
    finally:
        bench.stop_all(started)
        if pool is not None:
            pool.close()
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "pinning": pinning.note,
            "rows": {name: [{"qps": r.qps, "cpu_ms_per_request": r.cpu_ms_per_request, "errors": r.errors,
                             "server_cpu_util": r.server_cpu_util} for r in runs] for name, runs in rows.items()},
            "requests_per_model_run": batching}


def batch_totals(server, model: str) -> tuple[float, float] | None:
    """(requests, model runs) so far, from the server's batchrl_batch_requests histogram; None for
    a server without metrics (the echo) or without batcher runs."""
    port = next((int(line.rsplit(" ", 1)[1]) for line in server.log if line.startswith("metrics on port ")), None)
    if port is None:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f'batchrl_batch_requests_{suffix}{{model="{model}"}}'):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return (values["sum"], values["count"]) if len(values) == 2 else (0.0, 0.0)


def write(data: dict, output: Path) -> Path:
    rows = data["rows"]
    mean = {name: float(np.mean([r["qps"] for r in runs])) for name, runs in rows.items()}
    cpu = {name: float(np.mean([r["cpu_ms_per_request"] for r in runs])) * 1e3 for name, runs in rows.items()}
    a = data["settings"]
    lines = [
        "# Where the policy server's time goes (Act, one observation, concurrency "
        f"{a['concurrency']})", "",
        "Written by `python -m benchmarks.serve_stages` (its docstring explains the method). Each variant is the "
        "real server with one part replaced; rounds alternate the variants. " + data["pinning"] + ".", "",
        "| server | what it does | QPS per round | mean QPS | / echo | server CPU µs/request | requests per model run "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        what = "bare gRPC echo (benchmarks/echo.py), raw bytes" if name == "echo" else STAGES[name]
        errors = sum(sum(r["errors"].values()) for r in runs)
        per_round = ", ".join(f"{r['qps']:,.0f}" for r in runs)
        runs_per = data["requests_per_model_run"].get(name)
        gathered = f"{np.mean(runs_per):.2f}" if runs_per else "–"
        lines.append(f"| {name} | {what} | {per_round} | {mean[name]:,.0f} | "
                     f"{mean[name] / mean['echo']:.2f} | {cpu[name]:.0f} | {gathered} | {errors} |")
    command = (f"python -m benchmarks.serve_stages --model {a['model']} --repository {a['repository']} "
               f"--duration {a['duration']:g} --rounds {a['rounds']} --concurrency {a['concurrency']} "
               f"--server-cores {a['server_cores']} --client-cores {a['client_cores']}")
    lines += ["", f"Reproduce: `{command}`", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    md = output.with_suffix(".md")
    md.write_text("\n".join(lines))
    output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=list(STAGES), help=argparse.SUPPRESS)  # a variant's server process
    parser.add_argument("--model", default="hopper-iql")
    parser.add_argument("--repository", "-r", type=Path, default=Path("models"))
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per variant and round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--grpc-threads", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--client-cores", default="1")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/serving-stages"))
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.repository, args.grpc_threads, args.threads)
        return 0
    start = time.time()
    md = write(run(args), args.output)
    print(f"wrote {md} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
