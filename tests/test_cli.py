"""The command line as a newcomer meets it: every mistake is one line on stderr with exit status 1
(2 for usage errors), Ctrl-C keeps the work, resume is exact or refuses, --help shows defaults.

Each case runs the real `batchrl` command in a subprocess."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from batchrl.training.trainer import CHECKPOINT, load_checkpoint
from tests.serving import blackbox


def batchrl(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "batchrl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line(result, status: int, *fragments: str) -> str:
    """The command failed with ``status`` and said so in exactly one line holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_one_line_naming_the_address(trained_run):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for extra in ((), ("--env", "Pendulum-v1")):
        result = batchrl("rollout", "--model", "pendulum", "--server", address, *extra)
        one_line(result, 1, f"no server answered at {address}", "batchrl serve")
    one_line(batchrl("models", "list", "--server", address), 1, f"no server answered at {address}")


def test_environment_mistakes_are_one_line(trained_run, repository):
    one_line(batchrl("eval", trained_run, "--env", "NoSuchEnv-v0"), 1,
             "cannot make environment 'NoSuchEnv-v0'", "NoSuchEnv")
    assert importlib.util.find_spec("Box2D") is None  # the project installs no Box2D
    one_line(batchrl("eval", repository / "pendulum", "--env", "LunarLanderContinuous-v3"), 1,
             "cannot make environment 'LunarLanderContinuous-v3'", "Box2D")
    # Pendulum's observations have 3 numbers, MountainCarContinuous's 2 (both have 1-dim actions)
    one_line(batchrl("eval", trained_run, "--env", "MountainCarContinuous-v0"), 1,
             "'MountainCarContinuous-v0' gives observations of size 2", "expects 3")
    one_line(batchrl("eval", repository / "pendulum", "--env", "MountainCarContinuous-v0"), 1,
             "gives observations of size 2", "expects 3")


def test_served_mistakes_are_one_line(repository):
    with blackbox.serving(repository) as server:
        one_line(batchrl("rollout", "--model", "pendulum", "--env", "MountainCarContinuous-v0",
                         "--server", server.address), 1, "gives observations of size 2", "model 'pendulum' expects 3")
        one_line(batchrl("rollout", "--model", "nope", "--env", "Pendulum-v1", "--server", server.address), 1,
                 "model 'nope' is not served", "pendulum")
        one_line(batchrl("models", "load", "pendulum", "--server", server.address), 1,
                 "UNAUTHENTICATED")  # no admin token configured anywhere


def test_training_mistakes_are_one_line_and_leave_nothing_behind(minari_root, trained_run, tmp_path):
    run = tmp_path / "runs" / "new"
    one_line(batchrl("train", "--algo", "bc", "--dataset", "nope/missing-v0", "--run-dir", run), 1,
             "Minari dataset 'nope/missing-v0' not found", "test/pendulum/play-v0", "minari download")
    assert not (tmp_path / "runs").exists()  # not even the parent it created
    result = batchrl("train", "--algo", "bc", "--dataset", "nope/missing-v0", "--run-dir", run)
    assert "download=True" not in result.stderr  # Minari's Python-API hint does not apply here
    one_line(batchrl("train", "--resume", "--run-dir", run), 1, f"{run} holds no run to resume")
    assert not (tmp_path / "runs").exists()
    one_line(batchrl("train", "--algo", "sac", "--dataset", "test/pendulum/play-v0", "--run-dir", run), 1,
             "unknown algorithm 'sac'")
    one_line(batchrl("train", "--algo", "bc", "--dataset", "test/pendulum/play-v0", "--set", "betta=1",
                     "--run-dir", run), 1, "no setting 'betta'")
    assert not (tmp_path / "runs").exists()
    one_line(batchrl("train", "--algo", "iql", "--dataset", "test/pendulum/play-v0", "--run-dir", trained_run), 1,
             "already holds a run", "--resume")
    one_line(batchrl("train", "--dataset", "test/pendulum/play-v0"), 2, "--algo and --dataset are required")
    one_line(batchrl("export", tmp_path / "nothing", "--name", "x"), 1, "not a run folder")


def test_resume_without_a_checkpoint_refuses(minari_root, trained_run, tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.json").write_text((trained_run / "config.json").read_text())  # started, stopped before step 1
    one_line(batchrl("train", "--resume", "--run-dir", run), 1, "has no checkpoint to resume from",
             "every 150 steps")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # nothing written, nothing deleted (.lock released)


def test_debug_shows_the_traceback(tmp_path):
    result = batchrl("export", tmp_path / "nothing", "--name", "x", env={"BATCHRL_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "not a run folder" in result.stderr
    result = batchrl("--debug", "export", tmp_path / "nothing", "--name", "x")
    assert "Traceback" in result.stderr


def test_help_shows_the_defaults_the_readme_relies_on_and_version():
    serve = batchrl("serve", "--help").stdout
    for default in ("127.0.0.1:50051", "(default: models)", "(default: 64)", "(default: 1024)", "(default: 1)",
                    "(default: 0.0)"):
        assert default in " ".join(serve.split()), default
    rollout = " ".join(batchrl("rollout", "--help").stdout.split())
    assert "(default: 127.0.0.1:50051)" in rollout and "(default: 5)" in rollout
    train = " ".join(batchrl("train", "--help").stdout.split())
    for default in ("(default: 0)", "(default: 10000)", "(default: 100000)", "required unless --resume"):
        assert default in train, default
    models = " ".join(batchrl("models", "--help").stdout.split())
    assert "(default: 127.0.0.1:50051)" in models
    version = batchrl("--version")
    assert version.returncode == 0 and re.fullmatch(r"batchrl \S+\n", version.stdout)


SLOW_TRAIN = ["--algo", "iql", "--dataset", "test/pendulum/play-v0", "--steps", "1200", "--eval-every", "600",
              "--eval-episodes", "1", "--log-every", "50", "--checkpoint-every", "100000", "--device", "cpu",
              "--set", "hidden=32,32", "--set", "batch_size=32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_sigint_writes_a_checkpoint_and_resume_equals_an_uninterrupted_run(minari_root, tmp_path):
    straight = batchrl("train", *SLOW_TRAIN, "--run-dir", tmp_path / "straight", env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "batchrl.cli", "train", *SLOW_TRAIN, "--run-dir", str(run)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # mid-run: past two train rows
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "step/s" not in line]  # the progress bar aside
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    stopped = int(re.search(r"SIGINT: stopped at step (\d+) of 1200 and wrote a checkpoint", lines[0]).group(1))
    assert 100 <= stopped < 1200 and f"batchrl train --resume --run-dir {run}" in lines[0]
    assert int(torch.load(run / CHECKPOINT, weights_only=True)["step"]) == stopped
    assert not (run / "result.json").exists()

    resumed = batchrl("train", "--resume", "--run-dir", run, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step {stopped} of 1200" in resumed.stderr

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    for group, tensors in a["algorithm"]["modules"].items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(tensor, b["algorithm"]["modules"][group][key], rtol=0, atol=0)
    rows = [[{k: v for k, v in json.loads(x).items() if k != "updates_per_s"}
             for x in (folder / "metrics.jsonl").read_text().splitlines()] for folder in (tmp_path / "straight", run)]
    assert rows[0] == rows[1]  # bit for bit, no duplicate steps, the train row across the stop included
    assert json.loads((run / "result.json").read_text())["return_mean"] == \
        json.loads((tmp_path / "straight" / "result.json").read_text())["return_mean"]
