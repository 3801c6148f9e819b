"""The serving benchmark (`python -m benchmarks.serve_bench`) end to end on a tiny budget, the echo server, and the benchmark's small parts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from benchmarks.serve_bench import fresh_output, parse_concurrency, parse_cpus, split
from benchmarks.echo import ECHO_METHOD, STREAM_METHOD, build_echo_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_bench_serve_measures_every_phase_and_writes_the_report(tmp_path):
    out = tmp_path / "results" / "serving"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_bench", "--repository", str(ROOT / "models"), "--model",
         "hopper-iql", "--duration", "0.5", "--warmup", "0.2", "--concurrency", "1,4", "--processes", "2",
         "--batch-size", "8", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0, result.stderr
    assert "[8/8]" in result.stderr  # a progress line per phase

    data = json.loads(Path(f"{out}.json").read_text())
    rows = data["phases"]
    assert {r["phase"] for r in rows} == set(range(1, 9))
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == {}, row
        assert row["qps"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
    by = lambda phase: [r for r in rows if r["phase"] == phase]  # noqa: E731
    assert [r["concurrency"] for r in by(1)] == [r["concurrency"] for r in by(2)] == [1, 4]
    assert [(r["concurrency"], r["batch_size"]) for r in by(4)] == [(1, 8), (4, 8)]
    assert [r["batch_size"] for r in by(5)] == [1, 8]
    assert [(r["name"], r["concurrency"]) for r in by(6)] == [("batching on", 64), ("batching off", 64)]
    assert by(7)[0]["concurrency"] is None  # open loop
    # The same load through the two client libraries, side by side at the headline's concurrency.
    assert [(r["name"], r["concurrency"], r["batch_size"], r["target"]) for r in by(8)] == [
        ("tritonclient ModelInfer", 32, 1, "policy server"), ("batchrl PolicyClient.act", 32, 1, "policy server")]
    assert "the QPS of batchrl PolicyClient.act" in by(8)[0]["note"]
    # The server was busy, and that was seen in /proc: CPU time comes in clock ticks (10 ms), so one
    # short phase on a loaded machine may see none, but the phases together must.
    served = by(1) + by(2) + by(6) + by(7) + by(8)
    assert all(r["cpu_ms_per_request"] >= 0 for r in served)
    assert sum(r["cpu_ms_per_request"] * r["requests"] for r in served) > 0

    headline = data["headline"]
    assert set(headline) == {"a", "b", "c", "d", "e"}
    assert all(h["value"] > 0 for h in headline.values())
    assert headline["a"]["target"] == 0.7 and headline["b"]["target"] == 0.4
    assert headline["e"]["target"] is None
    assert headline["e"]["numerator"] == by(8)[0]["qps"] and headline["e"]["denominator"] == by(8)[1]["qps"]
    # The response the echo imitates was measured on the real server, not assumed.
    assert data["model"]["single_response_bytes"] > 0

    if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset"):
        assert set(map(tuple, data["pinning"]["observed_server_affinity"].values())) == {(0,)}
    else:
        assert "not pinned" in data["pinning"]["note"]

    md = Path(f"{out}.md").read_text()
    for key in "abcde":
        assert f"| ({key}) |" in md
    assert "Act QPS / echo QPS" in md and "batching gain" in md and "p99 latency" in md
    assert "tritonclient QPS / PolicyClient QPS at concurrency 32" in md
    assert "| 8. tritonclient ModelInfer |" in md and "| 8. batchrl PolicyClient.act |" in md
    assert data["command"] in md and "--concurrency 1,4" in data["command"]


def test_echo_answers_with_the_configured_sizes():
    server, port = build_echo_server("127.0.0.1:0", grpc_threads=4, response_bytes=37, stream_response_bytes=5)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_METHOD)(b"x" * 64, timeout=10) == bytes(37)
            replies = list(channel.stream_stream(STREAM_METHOD)(iter([b"a", b"bb", b"ccc"]), timeout=10))
        assert replies == [bytes(5)] * 3
    finally:
        server.stop(None)


def test_echo_cli_prints_its_port_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.echo", "--response-bytes", "3", "--grpc-threads", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_METHOD)(b"", timeout=10) == bytes(3)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_concurrency_is_split_exactly_over_processes():
    assert split(64, 4) == [16] * 4
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(1, 4) == [1]  # never an idle process holding a connection
    assert parse_concurrency("64,1,8,8") == (1, 8, 64)


@pytest.mark.parametrize("text, message", [("1,x", "'x' is not an integer"), ("0", "0 requests in flight")])
def test_bad_concurrency_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_concurrency(text)


def test_cpu_lists_read_like_taskset():
    assert parse_cpus("0", "--server-cores") == (0,)
    assert parse_cpus("0-2,5", "--server-cores") == (0, 1, 2, 5)
    with pytest.raises(ValueError, match="--client-cores '2-1'"):
        parse_cpus("2-1", "--client-cores")


def test_benchmark_imports_no_torch_minari_gymnasium_or_tritonclient():
    code = "import sys, json, benchmarks.serve_bench, benchmarks.echo; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    mods = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert "grpc" in mods and not {"torch", "minari", "gymnasium"} & mods
    assert "tritonclient" not in mods  # only the load generators import it, for phase 8


def test_default_output_is_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = fresh_output()
    first.parent.mkdir()
    second = fresh_output()
    assert first.parent != second.parent and not second.parent.exists()
    assert first.parent.name.startswith("serve-bench-") and first.name == second.name == "serving"
