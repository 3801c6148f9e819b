"""The training loop: sampling, device, progress, logging, evaluation, checkpoints, resume.

A run folder holds:
  config.json     the run's configuration (algorithm config resolved)
  version.json    provenance: one entry per training session (the first, then one per resume) with
                  the batchrl version, the git commit of the code that trained, torch, and the step
                  it started from; export copies the commits into the manifest
  metrics.jsonl   one JSON row per log interval ("train") and per evaluation ("eval")
  curve.png       the learning curve (normalised score or return, and losses)
  checkpoint.pt   the latest checkpoint (tensors and plain values only: loads with weights_only)
  result.json     the final evaluation, written when the run completes
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from batchrl.errors import Interrupted, UserError
from batchrl.version import package_version
from batchrl.protos.sequence import ContextSpec
from batchrl.training import distributed
from batchrl.training.algorithms import ALGORITHMS, Context, OfflineAlgorithm
from batchrl.training.device import resolve_device  # noqa: F401 - also this module's API
from batchrl.training.data import load_dataset
from batchrl.training.evaluation import Act, evaluate, make_eval_env, sequence_agent, stateless
from batchrl.training.memory import keep_freed_memory
from batchrl.training.policy import DeployedPolicy, DeployedSequencePolicy

CHECKPOINT = "checkpoint.pt"
VERSION = "version.json"
RESULT = "result.json"
METRICS = "metrics.jsonl"
STOP_CHECK = 16  # data-parallel ranks agree on a stop (SIGTERM, Ctrl-C) every this many steps


@dataclass
class TrainConfig:
    algorithm: str
    dataset: str
    steps: int = 100_000
    seed: int = 0
    eval_every: int = 10_000
    eval_episodes: int = 10
    eval_seed: int = 0          # evaluation episode i is reset with seed eval_seed + i
    log_every: int = 1_000
    checkpoint_every: int = 10_000
    device: str = "auto"
    compile: bool = False      # torch.compile the algorithm's networks (compile_networks)
    algo: dict = field(default_factory=dict)  # algorithm config, resolved from its dataclass

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        for name in ("steps", "eval_every", "eval_episodes", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.algo = dataclasses.asdict(algorithm_config(self.algorithm, self.algo))


def algorithm_config(name: str, overrides: dict[str, typing.Any]):
    """The algorithm's config dataclass with ``overrides`` applied (strings are parsed by field type)."""
    cls = ALGORITHMS[name][0]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{name} has no setting {key!r}; settings: {sorted(known)}")
        values[key] = _coerce(hints[key], value, key)
    return cls(**values)


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
    try:
        if origin is tuple:  # layer widths
            items = value.split(",") if isinstance(value, str) else value
            widths = tuple(int(v) for v in items)
            if not widths or min(widths) < 1:
                raise ValueError
            return widths
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return hint(value)
    except (TypeError, ValueError):
        raise SettingError(key, value, _EXPECTED.get(hint) or _EXPECTED.get(origin)
                           or getattr(hint, "__name__", str(hint))) from None


_EXPECTED = {float: "a number (float)", int: "an integer (int)", bool: "true or false (bool)",
             tuple: "comma-separated integers >= 1 (e.g. 256,256)"}


class SettingError(ValueError):
    """An algorithm setting whose value does not parse as its type (the CLI names it as its --set)."""

    def __init__(self, key: str, value, expected: str):
        super().__init__(f"setting {key}={value}: expected {expected}")
        self.key, self.value, self.expected = key, value, expected


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def read_provenance(run_dir: Path) -> list[dict]:
    """The run's training sessions, oldest first (a version.json written before sessions were kept: one)."""
    path = Path(run_dir) / VERSION
    if not path.exists():
        return []
    recorded = json.loads(path.read_text())
    return recorded["sessions"] if "sessions" in recorded else [recorded]


def training_code(run_dir: Path) -> str:
    """The commit(s) of the code that trained the run, in order, joined by '+' when a resume changed it."""
    return "+".join(dict.fromkeys(s["code"] for s in read_provenance(run_dir))) or "unknown"


def compile_networks(algo: OfflineAlgorithm) -> None:
    """torch.compile (inductor) the forward of each of the algorithm's compile units, in place (parameter names
    unchanged), for the passes that train: a pass without gradients (target networks, evaluation) runs eagerly,
    so an evaluation's growing contexts and batch of one compile nothing.

    fallback_random makes random draws inside compiled code (the Decision Transformer's dropout) come from
    torch's generators as in eager mode, so a checkpoint's RNG state replays them and resume stays exact.
    """
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    for unit in algo.compile_units():
        eager, compiled = unit.forward, torch.compile(unit.forward)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return (_compiled if torch.is_grad_enabled() else _eager)(*args, **kwargs)

        unit.forward = forward


def build_algorithm(config: TrainConfig, obs_dim: int, act_dim: int, return_range: float,
                    device: torch.device) -> OfflineAlgorithm:
    cls = ALGORITHMS[config.algorithm][1]
    ctx = Context(obs_dim=obs_dim, act_dim=act_dim, total_steps=config.steps, return_range=return_range,
                  device=device)
    return cls(algorithm_config(config.algorithm, config.algo), ctx)


def policy_act(policy: DeployedPolicy) -> Act:
    """The deployed policy as an evaluation ``Act`` (a rolling context per episode for sequence models)."""
    if isinstance(policy, DeployedSequencePolicy):
        spec = ContextSpec(int(policy.obs_mean.numel()), int(policy.action_low.numel()), policy.context_length,
                           policy.max_timestep)
        return sequence_agent(policy.run, spec, policy.target_return)
    return stateless(policy.act)


def rng_state(sampler, device: torch.device) -> dict:
    """Every random stream an update draws from: the sampler's generator (on the training device), torch's
    CPU generator and, on CUDA, the device's generator (noise, dropout and sampled actions draw there)."""
    state = {"rng_device": device.type, "sampler_rng": sampler.generator.get_state(),
             "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, sampler, device: torch.device) -> None:
    """Restore ``rng_state``'s streams (the states are read on the CPU, wherever the checkpoint was mapped)."""
    saved = state.get("rng_device", "cpu")  # checkpoints older than the field were written on the CPU
    if saved != device.type:
        raise UserError(f"the checkpoint's random streams were drawn on {saved}, not {device.type}: a run resumes "
                        f"exactly only on the device type it trained on (resume with --device {saved}, or start a "
                        "new run)")
    sampler.generator.set_state(state["sampler_rng"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path, map_location="cpu") -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in run folder {run_dir} (expected {path})")
    return torch.load(path, map_location=map_location, weights_only=True)


# Settings added after runs had been written, with the value those runs trained with (the setting's first
# default): a config.json without the key resumes and exports as it trained, whatever the default is now.
VALUES_BEFORE_THE_SETTING = {"cql": {"backup": "sample"}, "iql": {"actor_std": "clamp"}}


def read_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} is missing")
    raw = json.loads(path.read_text())
    raw["algo"] = {**VALUES_BEFORE_THE_SETTING.get(raw.get("algorithm"), {}), **raw.get("algo", {})}
    return TrainConfig(**raw)


def load_policy(run_dir: Path, device: str = "cpu") -> tuple[TrainConfig, DeployedPolicy, dict]:
    """The run's latest checkpoint as a DeployedPolicy (eval mode), with its config and checkpoint."""
    config = read_config(run_dir)
    ckpt = load_checkpoint(run_dir, map_location=device)
    norm = ckpt["normalization"]
    algo = build_algorithm(config, int(norm["obs_mean"].numel()), int(norm["action_low"].numel()),
                           float(ckpt["return_range"]), torch.device(device))
    algo.load_state_dict(ckpt["algorithm"])
    policy = algo.deployed(norm["obs_mean"].cpu().numpy(), norm["obs_std"].cpu().numpy(),
                             norm["action_low"].cpu().numpy(), norm["action_high"].cpu().numpy(),
                             float(ckpt.get("best_return", float("nan")))).to(device)
    return config, policy.eval(), ckpt


def _saved_device(run_dir: Path) -> str:
    """The device a run to resume trained on ("cpu" where there is no such run: the resume fails later)."""
    return read_config(run_dir).device if (Path(run_dir) / "config.json").is_file() else "cpu"


LOCK = ".lock"


def lock_run(run_dir: Path):
    """An exclusive lock on the run folder until unlock_run: two trainers writing one run would
    interleave checkpoints and metrics.

    The holder deletes the file when it releases the run (unlock_run), so a locker re-checks after
    flock that the file it locked is still the one at the path: one locked just before the holder
    deleted it is stale, and the locker tries again with the new file.
    """
    path = run_dir / LOCK
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"run folder {run_dir} is in use by another training process") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()  # the previous holder deleted it after we opened it: lock the new file


def unlock_run(run_dir: Path, handle) -> None:
    """Release the run folder: delete .lock while still holding it (see lock_run), then let go."""
    if handle.closed:
        return
    try:
        os.unlink(run_dir / LOCK)
    except FileNotFoundError:
        pass
    handle.close()


class LogWindow:
    """Sums of the update metrics since the last train row (some updates, e.g. delayed actors, skip
    some metrics, so each metric keeps its own count)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def row(self) -> dict:
        """The mean of each metric and the update rate; empties the window."""
        row = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        row["updates_per_s"] = self.steps / max(self.seconds, 1e-9)
        self.__init__()
        return row

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict | None) -> None:
        self.__init__()
        if state:
            self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
            self.steps, self.seconds = int(state["steps"]), float(state["seconds"])


class Trainer:
    """Trains a new run (``config`` given) or resumes the run in ``run_dir`` (``config`` None).

    Resuming restores the algorithm's networks, optimisers and schedules, the
    sampler's and torch's RNG state and the step, so the resumed run continues
    exactly as the uninterrupted one would have.
    """

    def __init__(self, run_dir: str | Path, config: TrainConfig | None = None, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.progress = progress
        resume = config is None
        self._lock = None
        self._stop_signal: int | None = None
        # One of several processes when torchrun launched this one (batchrl train --nproc N): rank 0 owns the run
        # folder (lock, files); every rank trains.
        self.world = distributed.join(resolve_device(config.device if config else _saved_device(self.run_dir)))
        failure = None
        try:
            self._start(config, resume) if self.world.main else self._open(config, resume)
        except BaseException as exc:  # noqa: BLE001 - raised below, once every rank knows
            failure = exc
        failed = [rank for rank, bad in enumerate(distributed.gather(failure is not None, self.world)) if bad]
        if failure is None and failed:
            failure = UserError(f"rank {failed[0]} of {self.world.size} could not start (its error is above)")
        if failure is not None:
            raise failure

    def _start(self, config: TrainConfig | None, resume: bool) -> None:
        if resume and not (self.run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.run_dir} holds no run to resume (no config.json)")
        created = self.run_dir  # the top-most folder this trainer creates: removed if it cannot start
        while not created.parent.exists():
            created = created.parent
        created = None if self.run_dir.exists() else created
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_run(self.run_dir)
        try:
            self._open(config, resume)
        except BaseException:
            self.close()
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _open(self, config: TrainConfig | None, resume: bool) -> None:
        ckpt_path = self.run_dir / CHECKPOINT
        if resume:
            config = read_config(self.run_dir)
            if not ckpt_path.exists():
                raise UserError(f"{self.run_dir} has no checkpoint to resume from (one is written every "
                                f"{config.checkpoint_every} steps, and when training is stopped by Ctrl-C or "
                                "SIGTERM); delete the folder and train again")
        elif self.world.main and (self.run_dir / "config.json").exists():  # (rank 0 writes it: the others don't check)
            raise FileExistsError(f"{self.run_dir} already holds a run; resume it with --resume, or delete the "
                                  "folder to start again")
        self.config = config
        self.device = resolve_device(config.device)
        keep_freed_memory()  # (the update's large buffers are reused, not faulted in again each step)
        torch.manual_seed(config.seed)  # the same initial networks on every rank
        self.data = load_dataset(config.dataset)
        self.obs_mean, self.obs_std = self.data.observation_stats()
        returns = self.data.episode_returns
        self.return_range = float(returns.max() - returns.min())
        self.best_return = float(returns.max())
        self.algo = build_algorithm(config, self.data.obs_dim, self.data.act_dim, self.return_range, self.device)
        world = self.world
        if self.algo.batch_size % world.size:
            raise UserError(f"batch_size {self.algo.batch_size} does not split evenly over {world.size} processes: "
                            f"choose --nproc dividing it, or --set batch_size=... (a multiple of {world.size})")
        self.batch_size = self.algo.batch_size // world.size  # each rank's share: the effective batch is batch_size
        distributed.synchronise(self.algo, world)
        if world.rank:
            torch.manual_seed(world.seed(config.seed))  # this rank's own noise, dropout and sampled actions
        if config.compile:
            compile_networks(self.algo)
        self.sampler = self.algo.sampler(self.data, self.obs_mean, self.obs_std, self.device,
                                         world.seed(config.seed))
        self.policy = self.algo.deployed(self.obs_mean, self.obs_std, self.data.action_low,
                                      self.data.action_high, self.best_return).to(self.device)
        self.step = 0
        self.train_seconds = 0.0
        # The train metrics gathered since the last train row: saved with a checkpoint, so a run
        # stopped between rows logs the same row when it resumes.
        self.window = LogWindow()
        if resume:
            self._restore(load_checkpoint(self.run_dir, map_location=self.device))
        self._env = None
        if not world.main:
            return
        self._write_json("config.json", dataclasses.asdict(config))
        sessions = read_provenance(self.run_dir) if resume else []
        sessions.append({"batchrl": package_version(), "code": code_version(), "torch": torch.__version__,
                         "from_step": self.step, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         **({"processes": world.size} if world.distributed else {})})
        self._write_json(VERSION, {"sessions": sessions})

    # -- checkpoints -------------------------------------------------------
    def _payload(self) -> dict:
        streams = rng_state(self.sampler, self.device)
        # Every rank's streams and metric sums, so a multi-process run resumes exactly.
        ranks = distributed.gather({**streams, "log_window": self.window.state_dict()}, self.world)
        return {
            **({"world_size": self.world.size, "ranks": ranks} if self.world.distributed else {}),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "return_range": self.return_range,
            "best_return": self.best_return,  # a sequence policy's default target return
            "algorithm": self.algo.state_dict(),
            "log_window": self.window.state_dict(),
            **streams,
            "normalization": {
                "obs_mean": torch.as_tensor(self.obs_mean), "obs_std": torch.as_tensor(self.obs_std),
                "action_low": torch.as_tensor(self.data.action_low),
                "action_high": torch.as_tensor(self.data.action_high),
            },
        }

    def _restore(self, ckpt: dict) -> None:
        saved = int(ckpt.get("world_size", 1))
        if saved != self.world.size:
            raise UserError(f"{self.run_dir} was trained by {saved} process(es), not {self.world.size}: its batches "
                            f"resume exactly only with --nproc {saved}")
        self.algo.load_state_dict(ckpt["algorithm"])
        own = ckpt["ranks"][self.world.rank] if "ranks" in ckpt else ckpt
        set_rng_state(own, self.sampler, self.device)
        self.step = int(ckpt["step"])
        self.train_seconds = float(ckpt["train_seconds"])
        self.window.load_state_dict(own.get("log_window"))  # absent from checkpoints older than it
        # Rows logged after the checkpoint are replayed by the resumed run: drop them.
        path = self.run_dir / METRICS
        if self.world.main and path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(r + "\n" for r in rows))

    def checkpoint(self) -> None:
        """Every rank calls it (it gathers their random streams, and checks that they hold one model); rank 0
        writes."""
        distributed.check_synchronised(self.algo, self.world)
        payload = self._payload()
        if self.world.main:
            save_checkpoint(self.run_dir / CHECKPOINT, payload)

    # -- evaluation --------------------------------------------------------
    def evaluate(self):
        if self._env is None:
            self._env = make_eval_env(self.config.dataset)
        self.policy.eval()
        result = evaluate(self._env, policy_act(self.policy), self.config.eval_episodes, self.config.eval_seed,
                          self.data.ref_min_score, self.data.ref_max_score)
        self._log({"kind": "eval", "step": self.step, "return_mean": result.mean_return,
                   "return_std": result.std_return, "normalized_score": result.normalized_score,
                   "normalized_std": result.normalized_std})
        return result

    # -- loop --------------------------------------------------------------
    def run(self) -> dict:
        """Train to the configured step count and return the final result. SIGINT or SIGTERM (when
        run in the main thread) stops it at the current step with a checkpoint: Interrupted."""
        try:
            with self._stopping_on_signals():
                return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder (run() does this when it returns)."""
        if self._lock is not None:
            unlock_run(self.run_dir, self._lock)

    @contextlib.contextmanager
    def _stopping_on_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def stop(signum, frame):
            self._stop_signal = signum
            for number, handler in previous.items():  # a second signal acts as it would have
                signal.signal(number, handler)

        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _train(self) -> dict:
        cfg = self.config
        window = self.window
        world = self.world
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algorithm} {cfg.dataset}", unit="step",
                   disable=not (self.progress and world.main), dynamic_ncols=True)
        tick = time.perf_counter()
        while self.step < cfg.steps:
            stop = self._stop_signal is not None
            if world.distributed:  # every rank stops at the same step, whichever the signal reached (agreed
                # every STOP_CHECK steps: one collective a step would cost the fastest updates a third of their speed)
                stop = self.step % STOP_CHECK == 0 and distributed.any_rank(stop, self.device)
            if stop:
                self._count_training_time(tick)
                self.checkpoint()
                bar.close()
                number = self._stop_signal or signal.SIGTERM
                resume = f"batchrl train{f' --nproc {world.size}' if world.distributed else ''} --resume"
                raise Interrupted(f"{signal.Signals(number).name}: stopped at step {self.step} of {cfg.steps} and "
                                  f"wrote a checkpoint; continue with: {resume} --run-dir {self.run_dir}", number)
            window.add(self.algo.update(self.sampler.sample(self.batch_size)))
            self.step += 1
            bar.update(1)
            log, evaluate, checkpoint = (self.step % cfg.log_every == 0, self.step % cfg.eval_every == 0,
                                         self.step % cfg.checkpoint_every == 0)
            last = self.step == cfg.steps
            if not (log or evaluate or checkpoint or last):
                continue
            self._count_training_time(tick)  # training time only: evaluation and I/O are excluded
            if log or last:
                if world.distributed:  # the metrics of the whole batch: the mean over ranks
                    window.sums = {k: distributed.average(v) for k, v in sorted(window.sums.items())}
                row = window.row()
                row.update(kind="train", step=self.step)
                self._log(row)
                losses = [k for k in row if k not in ("kind", "step", "updates_per_s")]
                bar.set_postfix({k: f"{row[k]:.3g}" for k in losses[:3]})
            if (evaluate or last) and world.main:  # the other ranks go on and wait for it at their next collective
                result = self.evaluate()
                score = result.normalized_score if result.normalized_score is not None else result.mean_return
                bar.set_postfix_str(f"eval {score:.1f}")
            if checkpoint or last:
                self.checkpoint()
                if world.main:
                    self.plot()
            tick = time.perf_counter()
        bar.close()
        return self._finish() if world.main else {}

    def _count_training_time(self, since: float) -> None:
        elapsed = time.perf_counter() - since
        self.train_seconds += elapsed
        self.window.seconds += elapsed

    def _finish(self) -> dict:
        last_eval = [r for r in self.metrics() if r["kind"] == "eval" and r["step"] == self.step]
        result = last_eval[-1] if last_eval else None
        if result is None:  # (else the last step's evaluation is in curve.png already)
            self.evaluate()
            result = self.metrics()[-1]
            self.plot()
        summary = {
            "algorithm": self.config.algorithm, "dataset": self.config.dataset, "seed": self.config.seed,
            "steps": self.step, "eval_episodes": self.config.eval_episodes,
            "return_mean": result["return_mean"], "return_std": result["return_std"],
            "normalized_score": result["normalized_score"], "normalized_std": result["normalized_std"],
            "train_seconds": self.train_seconds,
            "updates_per_s": self.step / max(self.train_seconds, 1e-9),
        }
        self._write_json(RESULT, summary)
        return summary

    # -- files -------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if not self.world.main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        path = self.run_dir / METRICS
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def _write_json(self, name: str, payload: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.run_dir / name)

    def plot(self) -> None:
        plot_curve(self.metrics(), self.run_dir / "curve.png", f"{self.config.algorithm} on {self.config.dataset}")


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if r["kind"] == "eval"]
    trains = [r for r in rows if r["kind"] == "train"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if evals:
        use_norm = evals[0]["normalized_score"] is not None
        key, std = ("normalized_score", "normalized_std") if use_norm else ("return_mean", "return_std")
        x = np.array([r["step"] for r in evals])
        y = np.array([r[key] for r in evals])
        s = np.array([r[std] for r in evals])
        ax1.plot(x, y, marker="o")
        ax1.fill_between(x, y - s, y + s, alpha=0.2)
        ax1.set_ylabel("normalised score" if use_norm else "return")
    ax1.set_xlabel("gradient step")
    ax1.set_title(title)
    if trains:
        x = [r["step"] for r in trains]
        for key in (k for k in trains[0] if k.endswith("_loss")):
            ax2.plot(x, [r.get(key, np.nan) for r in trains], label=key)
        ax2.set_yscale("symlog")
        ax2.legend()
    ax2.set_xlabel("gradient step")
    ax2.set_title("training losses")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
