"""Data-parallel training on 2 real processes (torchrun --standalone, gloo on the loopback)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchrl.training.data import load_dataset
from batchrl.training.distributed import RANK_SEED_STRIDE
from batchrl.training.trainer import TrainConfig, build_algorithm, load_checkpoint, read_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
SETTINGS = {"iql": ["hidden=32,32", "batch_size=64"],
            "dt": ["embed=32", "layers=2", "heads=2", "context_length=8", "batch_size=32", "dropout=0", "warmup_steps=1"],
            "td3bc": ["hidden=32,32", "batch_size=64"]}


def train(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrl.cli", "train", "--nproc", "2", *args], cwd=ROOT,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == code, out
    return out


def new_run(run_dir: Path, algorithm: str, steps: int, *extra: str) -> subprocess.Popen:
    sets = [a for s in SETTINGS[algorithm] for a in ("--set", s)]
    return train("--algo", algorithm, "--dataset", "test/pendulum/play-v0", "--steps", str(steps), "--eval-every",
                 str(steps), "--eval-episodes", "1", "--log-every", "10", "--device", "cpu", "--run-dir",
                 str(run_dir), *sets, *extra)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "updates_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def concatenated(a, b):
    kind = type(a)
    return kind(*(torch.cat([x, y]) for x, y in zip(vars(a).values(), vars(b).values())))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ["iql", "dt"])
def test_two_ranks_equal_one_process_fed_both_ranks_batches(minari_root, tmp_path, algorithm):
    """IQL steps three optimisers per update; the DT's loss is a mean over unpadded steps (unequal per rank)
    and its gradient is clipped after the average. Each rank draws batch_size / 2; one process fed both
    halves, concatenated, must reach rank 0's parameters (within 1e-5; the largest difference, a few 1e-6, is in the
    DT's attention key bias, whose true gradient is zero: Adam turns its rounding noise into steps of the size of
    the learning rate, in each run differently)."""
    run_dir = tmp_path / algorithm
    out = finish(new_run(run_dir, algorithm, 50))
    assert out.count("run folder:") == 1  # rank 0 reports
    config = read_config(run_dir)
    ckpt = load_checkpoint(run_dir)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    data = load_dataset(config.dataset)
    mean, std = data.observation_stats()
    returns = data.episode_returns
    torch.manual_seed(config.seed)
    algo = build_algorithm(config, data.obs_dim, data.act_dim, float(returns.max() - returns.min()),
                           torch.device("cpu"))
    samplers = [algo.sampler(data, mean, std, torch.device("cpu"), config.seed + r * RANK_SEED_STRIDE)
                for r in (0, 1)]
    half = algo.batch_size // 2
    for _ in range(50):
        algo.update(concatenated(*(s.sample(half) for s in samplers)))
    ranked = ckpt["algorithm"]["modules"]
    alone = algo.state_dict()["modules"]
    assert sorted(ranked) == sorted(alone)
    for module in alone:
        for key, value in alone[module].items():
            torch.testing.assert_close(ranked[module][key], value, rtol=0, atol=1e-5, msg=f"{module}.{key}")
    # and not by accident: after 50 updates the parameters have moved far beyond the tolerance
    torch.manual_seed(config.seed)
    start = build_algorithm(config, data.obs_dim, data.act_dim, 1.0, torch.device("cpu")).state_dict()["modules"]
    moved = max(float((ranked[m][k].float() - v.float()).abs().max()) for m in start for k, v in start[m].items()
                if v.is_floating_point())
    assert moved > 1e-3


@pytest.mark.timeout(300)
def test_every_module_of_every_algorithm_stays_synchronised():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tests.training.ddp_sync"], cwd=ROOT, env={**os.environ, **ENV},
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("{")]  # rank 0's report
    report = json.loads(line)
    from batchrl.training.algorithms import ALGORITHMS

    assert sorted(report) == sorted(ALGORITHMS)
    for name, r in report.items():
        assert r["compared"] == sorted([f"modules.{m}" for m in r["modules"]] +
                                       [f"optimizers.{o}" for o in r["optimizers"]]), name
        assert r["caught"] and r["moved"] in r["caught"], (name, r)


@pytest.mark.timeout(600)
def test_a_two_rank_run_stopped_by_sigterm_resumes_exactly(minari_root, tmp_path):
    """TD3+BC draws target noise on each rank from its own stream: a resumed run must restore both."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    finish(new_run(whole, "td3bc", 300))
    proc = new_run(stopped, "td3bc", 300)
    deadline = time.monotonic() + 300
    while not ((stopped / "metrics.jsonl").exists() and "train" in (stopped / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks; they stop at one step
    out = finish(proc, 128 + signal.SIGTERM)  # as one process: 128 + the signal
    assert out.count("SIGTERM: stopped at step") == 1, out
    ckpt = load_checkpoint(stopped)
    assert 10 <= ckpt["step"] < 300 and len(ckpt["ranks"]) == 2
    out = finish(subprocess.Popen([sys.executable, "-m", "batchrl.cli", "train", "--resume", "--run-dir",
                                   str(stopped)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True), 1)  # one process cannot continue it
    assert f"{stopped} was trained by 2 process(es), not 1: its batches resume exactly only with --nproc 2" in out, out
    out = finish(train("--resume", "--run-dir", str(stopped)))
    assert f"resuming {stopped} from step {ckpt['step']} of 300" in out
    a, b = load_checkpoint(whole), load_checkpoint(stopped)
    for module, state in a["algorithm"]["modules"].items():
        for key, value in state.items():
            assert torch.equal(value, b["algorithm"]["modules"][module][key]), f"{module}.{key}"
    assert rows(whole) == rows(stopped)  # the train rows average both ranks' metrics, restored from the checkpoint

