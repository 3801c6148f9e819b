"""The scale-out serving benchmark (`python -m benchmarks.serve_scale`) end to end on a tiny budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_serve_scale_measures_every_figure_and_writes_the_report(tmp_path, redis_url):
    out = tmp_path / "serving-scale"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_scale", "--repository", str(ROOT / "models"), "--duration", "0.4",
         "--warmup", "0.2", "--processes", "2", "--sessions", "4", "--in-flight", "4", "--rounds", "1",
         "--failover-sessions", "3,6", "--workers", "1,2", "--worker-connections", "4", "--redis", redis_url,
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0, result.stderr
    data = json.loads(Path(f"{out}.json").read_text())

    rows = data["rows"]
    assert [(r["phase"], r["name"], r["target"]) for r in rows] == [
        (1, "Episode steps", "DT, in-process store"), (1, "Episode steps", "DT, Redis store"),
        (2, "Act unary", "feed-forward"), (2, "ActStream", "feed-forward"),
        (4, "Act unary", "--workers 1"), (4, "Act unary", "--workers 2")]
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == {}, row
    sessions, stream = data["headline"]["sessions"], data["headline"]["act_stream"]
    assert sessions["numerator"] == rows[1]["qps"] and sessions["denominator"] == rows[0]["qps"]
    assert stream["numerator"] == rows[3]["qps"] and stream["denominator"] == rows[2]["qps"]
    assert (sessions["target"], stream["target"]) == (0.7, 1.3)

    assert [(f["sessions"], f["on_killed_replica"], f["moved"]) for f in data["failover"]] == [(3, 1, 1), (6, 2, 2)]
    for failover in data["failover"]:  # (session i starts on replica i % 3; replica 0 is killed)
        assert failover["errors"] == [] and 0 < failover["p50_ms"] <= failover["p99_ms"] <= failover["max_ms"]
    assert [(w["workers"], len(w["rss_mib"])) for w in data["workers"]] == [(1, 1), (2, 2)]
    assert all(w["qps"] > 0 and all(m > 10 for m in w["rss_mib"]) for w in data["workers"])

    md = Path(f"{out}.md").read_text()
    assert "DT Step throughput, Redis store / in-process store" in md and "ActStream msgs/s / unary Act" in md
    assert "failover gap" in md and "| 2 |" in md
    # Nothing of the run is left in Redis.
    import redis

    assert not list(redis.Redis.from_url(redis_url).scan_iter("bench-scale-*"))
