"""Mistakes a user can make on the command line, each refused by the real `batchrl` in one line on stderr (no
traceback) with its exit status (issue 32, item 2); and Ctrl-C under --nproc 2, which says only where it stopped."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"  # the shipped repository: hopper-dt is a sequence model, hopper-iql a feed-forward one
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # torch then sees no GPU on any machine: the "machine without CUDA" case
NO_DATASETS = {"MINARI_DATASETS_PATH": str(ROOT / "tests")}  # a folder that holds no dataset (Minari makes a missing one)
NO_CUDA = "device 'cuda': this machine has no CUDA GPU that torch can use; available: cpu"

# name: (arguments, extra environment, exit status, the one line on stderr)
CASES = {
    "train_cuda": (["train", "--algo", "iql", "--dataset", "test/pendulum/play-v0", "--device", "cuda"], NO_GPU, 1,
                   f"batchrl train: error: {NO_CUDA}"),
    "train_nproc_cuda": (["train", "--nproc", "2", "--algo", "iql", "--dataset", "test/pendulum/play-v0", "--device",
                          "cuda"], NO_GPU, 1, f"batchrl train: error: {NO_CUDA}"),
    "ope_cuda": (["ope", str(MODELS / "hopper-iql"), "--device", "cuda"], NO_GPU, 1, f"batchrl ope: error: {NO_CUDA}"),
    "eval_cuda": (["eval", str(MODELS / "hopper-iql"), "--device", "cuda"], NO_GPU, 1,
                  f"batchrl eval: error: {NO_CUDA}"),
    "set_float": (["train", "--algo", "iql", "--dataset", "test/pendulum/play-v0", "--set", "beta=abc"], {}, 2,
                  "batchrl train: error: --set beta=abc: expected a number (float) (see batchrl train --help)"),
    "server_without_port": (["models", "list", "--server", "localhost"], {}, 2,
                             "batchrl models: error: argument --server: 'localhost': expected HOST:PORT (e.g. "
                             "127.0.0.1:50051) (see batchrl models --help)"),
    "nproc_dataset": (["train", "--nproc", "2", "--algo", "iql", "--dataset", "test/none-v0"], NO_DATASETS, 1,
                      f"batchrl train: error: Minari dataset 'test/none-v0' not found under MINARI_DATASETS_PATH="
                      f"{NO_DATASETS['MINARI_DATASETS_PATH']} (nor is it a folder); datasets there: none; get one "
                      "with `minari download DATASET_ID`"),
    "nproc_resume_no_run": (["train", "--nproc", "2", "--resume"], {}, 2,
                            "batchrl train: error: --resume needs --run-dir (see batchrl train --help)"),
    "width_zero": (["train", "--algo", "iql", "--dataset", "test/pendulum/play-v0", "--set", "hidden=0"], {}, 2,
                   "batchrl train: error: --set hidden=0: expected comma-separated integers >= 1 (e.g. 256,256) (see "
                   "batchrl train --help)"),
    "wait_not_seconds": (["models", "list", "--wait", "0"], {}, 2,
                         "batchrl models: error: argument --wait: '0': expected seconds > 0 (e.g. 30) (see batchrl "
                         "models --help)"),
    "wait_given": (["rollout", "--model", "m", "--server", "127.0.0.1:1", "--wait", "0.5"], {}, 1,
                   "batchrl rollout: error: no server answered at 127.0.0.1:1 within 0.5 s; start one with `batchrl "
                   "serve`, or pass --server HOST:PORT"),
    "workers_sequence_memory": (["serve", "-r", str(MODELS), "--workers", "2", "--address", "127.0.0.1:0"], {}, 1,
                                "batchrl serve: error: sessions need a shared store with --workers 2: a session in "
                                "one process's memory could not take its next Step in another; start the server "
                                "with --session-store redis://HOST:PORT/DB (sequence policies here: hopper-dt)"),
}


def batchrl(args: list[str], cwd: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrl.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar's redraw (train shows one on stderr)


def one_line(stderr: str) -> str:
    """The one line on ``stderr`` besides progress bars; fails on more, or on a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every case of CASES run at once (each a fresh interpreter: most of its time is importing):
    {name: (exit status, stderr)}. (--server's usage error, status 2, is refused before any connection.)"""
    cwd = tmp_path_factory.mktemp("cli")  # outside the checkout: the installed command, not the source tree
    procs = {name: batchrl(args, cwd, env) for name, (args, env, _, _) in CASES.items()}
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        out[name] = (proc.returncode, err)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_its_status(outcomes, case):
    code, err = outcomes[case]
    assert (code, one_line(err)) == (CASES[case][2], CASES[case][3])


def test_a_port_in_use_is_one_line_without_grpc_core_log(tmp_path):
    """grpc core logs its own ERROR line (add_port.cc) when it cannot bind; the plain probe first says it alone."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = batchrl(["serve", "-r", str(tmp_path), "--address", f"127.0.0.1:{port}"], tmp_path)
        _, err = proc.communicate(timeout=120)
    assert (proc.returncode, one_line(err)) == (
        1, f"batchrl serve: error: cannot listen on 127.0.0.1:{port}: Address already in use (another server?)")


@pytest.mark.timeout(180)
def test_ctrl_c_under_nproc_2_says_only_where_it_stopped(minari_root, tmp_path):
    """Ctrl-C reaches torchrun's agent and both ranks (the terminal's whole process group): the parent
    exits 130 as one process does, and stderr holds the ranks' one line, not torchrun's SignalException
    traceback, its warnings or its OMP_NUM_THREADS banner."""
    run = tmp_path / "run"
    env = {"MINARI_DATASETS_PATH": str(minari_root), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun's banner case
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "train", "--nproc", "2", "--algo", "bc",
                             "--dataset", "test/pendulum/play-v0", "--steps", "1000000", "--log-every", "5",
                             "--eval-every", "1000000", "--device", "cpu", "--run-dir", str(run),
                             "--set", "hidden=16,16", "--set", "batch_size=32"],
                            cwd=tmp_path, env={**environment, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and '"train"' in metrics.read_text()):  # both ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = one_line(err)
    assert proc.returncode == 130, err
    assert line.startswith("batchrl train: error: SIGINT: stopped at step ") and "--nproc 2 --resume" in line, err
    for noise in ("SignalException", "OMP_NUM_THREADS", "death signal"):
        assert noise not in err, err
