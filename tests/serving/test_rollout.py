"""Served rollouts equal in-process onnxruntime evaluation; the CLI drives serve, rollout and eval."""
import re
import subprocess
import sys
import time

import gymnasium as gym
import onnxruntime as ort
import pytest

from batchrl.serving.repository import Registry
from batchrl.rollout import rollout
from batchrl.serving.server import build_server
from batchrl.training.evaluation import run_episodes


def test_served_rollout_equals_in_process_evaluation(repository):
    registry = Registry.open(repository, ["CPUExecutionProvider"])
    served = build_server(registry, "127.0.0.1:0")
    server, port = served.server, served.port
    server.start()
    try:
        lines = []
        served = rollout(f"127.0.0.1:{port}", "pendulum", "Pendulum-v1", episodes=3, seed=11, print_fn=lines.append)
    finally:
        server.stop(grace=None)
    session = ort.InferenceSession(str(repository / "pendulum" / "2" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    returns, _ = run_episodes(gym.make("Pendulum-v1"), lambda o, _: session.run(None, {"observations": o[None]})[0][0],
                              3, 11)
    assert served.returns == returns  # bit-for-bit: same float32 inputs, same graph
    assert len(lines) == 4 and "normalised score" in lines[-1]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "batchrl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_serve_rollout_and_eval_agree(repository, minari_root):
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "serve", "-r", str(repository), "--address",
                             "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        log = []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            log.append(line)
            match = re.search(r"\(port (\d+)\); onnxruntime providers in use: CPUExecutionProvider", line)
            port = match and match.group(1)
        assert port, "".join(log)
        served = run_cli("rollout", "--model", "pendulum", "--env", "Pendulum-v1", "--episodes", "2",
                         "--seed", "5", "--server", f"127.0.0.1:{port}")
        assert served.returncode == 0, served.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0  # SIGTERM drains and exits cleanly
    local = run_cli("eval", str(repository / "pendulum"), "--episodes", "2", "--seed", "5")
    assert local.returncode == 0, local.stderr
    served_returns = re.findall(r"return (-?\d+\.\d+) over", served.stdout)
    local_returns = re.findall(r"return (-?\d+\.\d+)\n", local.stdout)
    assert len(served_returns) == 2 and served_returns == local_returns


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = run_cli("export", str(tmp_path), "--name", "x")
    assert result.returncode == 1 and "is not a run folder" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_cli_eval_of_a_run_reproduces_its_final_evaluation(trained_run):
    import json

    result = json.loads((trained_run / "result.json").read_text())
    out = run_cli("eval", str(trained_run), "--episodes", "1", "--seed", "0")
    assert out.returncode == 0, out.stderr
    assert "(iql, step 300)" in out.stdout
    assert f"mean return {result['return_mean']:.2f}" in out.stdout
