"""`batchrl sweep`: the product of algorithms, datasets, seeds and settings, one training run per trial,
scheduled as Ray tasks (a local Ray by default, an existing cluster by address).

A sweep file (YAML) names its runs folder, its output folder and one or more grids:

    name: hopper-iql-beta            # default: the file's name
    runs: runs/hopper-iql-beta       # run folders (relative paths: to the sweep file's folder)
    output: results                  # the table (NAME.md, NAME.json) and plot (NAME.png)
    notes: [what the table leaves out and why]   # optional: written under the table's heading
    grids:                           # or one grid's keys at the top level
      - algorithms: {iql: 100000}    # name -> steps, or a list (with steps:); each has the settings of set:
        datasets: [bench/hopper/medium-v0]
        seeds: [0, 1, 2]
        set: {beta: [1.0, 3.0]}      # algorithm settings; a list is a product, "256,256" a tuple value;
                                     # a list of mappings is one variant each: [{}, {policy: gaussian}]
        eval_every: 10000
        eval_episodes: 10
        checkpoint_every: 5000
        library: batchrl             # a peer library's grid names it and its trainer, "module:function"
        trainer: ""                  # (benchmarks.peer:run trains d3rlpy)

Each trial is one run folder under ``runs``. A trial whose result.json exists is skipped; one with a
checkpoint resumes from it (the trainer's exact resume, under its run-folder lock); one that fails is
reported with its log (``<run folder>.log``) and the others go on. Trials run in Ray worker processes of
their own (one per trial) with one CPU and one torch thread each.
"""
from __future__ import annotations

import importlib
import itertools
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from batchrl.errors import UserError

GRID_KEYS = {"algorithms", "datasets", "seeds", "steps", "set", "eval_every", "eval_episodes", "checkpoint_every",
             "library", "trainer", "device"}
SWEEP_KEYS = {"name", "runs", "output", "grids", "notes"}
STATE = "sweep.json"  # in the runs folder: every trial's state, start, finish and log


@dataclass(frozen=True)
class Trial:
    algorithm: str
    dataset: str
    seed: int
    steps: int
    settings: tuple[tuple[str, str], ...] = ()  # algorithm settings that differ from its defaults
    eval_every: int = 10_000
    eval_episodes: int = 10
    checkpoint_every: int = 5_000
    library: str = "batchrl"
    trainer: str = ""  # "module:function(trial, run_dir) -> result" for another library; "" is batchrl's Trainer
    device: str = "cpu"

    @property
    def label(self) -> str:
        prefix = "" if self.library == "batchrl" else f"{self.library} "
        return prefix + self.algorithm + "".join(f" {k}={v}" for k, v in self.settings)

    def run_dir(self, runs: Path) -> Path:
        prefix = "" if self.library == "batchrl" else f"{self.library}-"
        variant = "".join(f"-{k}{v}" for k, v in self.settings)
        episodes = "" if self.eval_episodes == 10 else f"-e{self.eval_episodes}"
        steps = f"{self.steps // 1000}k" if self.steps % 1000 == 0 else str(self.steps)
        return runs / self.dataset.replace("/", "_") / f"{prefix}{self.algorithm}{variant}-{steps}{episodes}-s{self.seed}"


@dataclass
class Sweep:
    name: str
    runs: Path
    output: Path
    trials: list[Trial]
    source: Path  # the sweep file, as given
    notes: tuple[str, ...] = ()  # written under the table's heading


def load_sweep(path: str | Path) -> Sweep:
    """A sweep file's trials, in the file's order (each grid seed-major, so every cell's first seed comes early)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping of {sorted(SWEEP_KEYS | GRID_KEYS)}")
    grids = raw.get("grids", [{k: v for k, v in raw.items() if k not in SWEEP_KEYS}])
    unknown = set(raw) - SWEEP_KEYS - (GRID_KEYS if "grids" not in raw else set())
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(SWEEP_KEYS)}"
                         + ("" if "grids" in raw else f" and a grid's keys {sorted(GRID_KEYS)}"))
    name = str(raw.get("name", path.stem))
    notes = raw.get("notes", [])
    notes = [notes] if isinstance(notes, str) else notes
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"{path}: notes must be a string or a list of strings, got {raw['notes']!r}")
    base = path.resolve().parent
    trials = [t for i, grid in enumerate(grids, 1) for t in expand(grid, f"{path}: grid {i}")]
    seen = {}
    for trial in trials:
        other = seen.setdefault(trial.run_dir(Path()), trial)
        if other != trial:
            raise ValueError(f"{path}: two trials share the run folder {trial.run_dir(Path())}: {other} and {trial}")
    return Sweep(name, (base / str(raw.get("runs", f"runs/{name}"))).resolve(),
                 (base / str(raw.get("output", "results"))).resolve(),
                 list(dict.fromkeys(trials)), path, tuple(notes))


def expand(grid: dict, where: str) -> list[Trial]:
    from batchrl.training.trainer import algorithm_config

    if not isinstance(grid, dict):
        raise ValueError(f"{where}: a grid is a mapping of {sorted(GRID_KEYS)}, got {grid!r}")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; a grid has {sorted(GRID_KEYS)}")
    for key in ("algorithms", "datasets"):
        if not grid.get(key):
            raise ValueError(f"{where}: {key} is required (a list)")
    algorithms = grid["algorithms"]
    if isinstance(algorithms, list):
        if "steps" not in grid:
            raise ValueError(f"{where}: give steps, or algorithms as a mapping name -> steps")
        algorithms = {a: grid["steps"] for a in algorithms}
    settings = grid.get("set") or {}
    variants = []
    for one in settings if isinstance(settings, list) else [settings]:
        if not isinstance(one, dict):
            raise ValueError(f"{where}: set is a mapping of setting -> value or list of values (or a list of such "
                             f"mappings), got {one!r}")
        choices = [[(k, _text(v)) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in sorted(one.items())]
        variants += [tuple(v) for v in itertools.product(*choices)]
    options = {k: grid[k] for k in ("eval_every", "eval_episodes", "checkpoint_every", "library", "trainer",
                                    "device") if k in grid}
    trials = []
    for seed in grid.get("seeds", [0]):
        for algorithm, steps in algorithms.items():
            for variant in variants:
                if algorithm in _algorithms():
                    algorithm_config(algorithm, dict(variant))  # a bad setting fails here, not in a trial
                for dataset in grid["datasets"]:
                    trials.append(Trial(str(algorithm), str(dataset), int(seed), int(steps), variant, **options))
    for trial in trials:
        if trial.library == "batchrl" and trial.algorithm not in _algorithms():
            raise ValueError(f"{where}: unknown algorithm {trial.algorithm!r}; choose one of {sorted(_algorithms())}")
        if trial.library != "batchrl" and not trial.trainer:
            raise ValueError(f"{where}: library {trial.library!r} needs its trainer (module:function)")
    return trials


def _text(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _algorithms():
    from batchrl.training.algorithms import ALGORITHMS

    return ALGORITHMS


# -- one trial (in a Ray worker process) ---------------------------------------------------------------
def log_path(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")


def train_trial(trial: Trial, run_dir: Path) -> dict:
    """Train (or resume) the trial in ``run_dir``; returns its result.json content."""
    import torch

    torch.set_num_threads(1)
    if trial.trainer:
        module, _, function = trial.trainer.partition(":")
        return getattr(importlib.import_module(module), function)(trial, run_dir)
    from batchrl.training.trainer import CHECKPOINT, RESULT, TrainConfig, Trainer, lock_run

    if (run_dir / RESULT).exists():
        return json.loads((run_dir / RESULT).read_text())
    if (run_dir / CHECKPOINT).exists():
        trainer = Trainer(run_dir, progress=False)
    else:
        if run_dir.exists():  # started, but stopped before its first checkpoint: start again
            with lock_run(run_dir):  # unless another process is training it
                shutil.rmtree(run_dir)
        config = TrainConfig(algorithm=trial.algorithm, dataset=trial.dataset, seed=trial.seed, steps=trial.steps,
                             eval_every=trial.eval_every, eval_episodes=trial.eval_episodes,
                             checkpoint_every=trial.checkpoint_every, device=trial.device, algo=dict(trial.settings))
        trainer = Trainer(run_dir, config, progress=False)
    return trainer.run()


def run_logged(trial: Trial, run_dir: str, cwd: str) -> dict:
    """The Ray task: the trial with its output in its log file; the times and process it ran in."""
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # a trainer module of the sweep's project (benchmarks.peer)
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path(run_dir), "a") as log:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            print(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} pid {os.getpid()}: {trial}", flush=True)
            result = train_trial(trial, run_dir)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    return {"result": result, "started": started, "finished": time.time(), "pid": os.getpid()}


# -- the driver ---------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, cpus: int | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Run every unfinished trial as a Ray task; returns the counts (done, skipped, failed)."""
    import ray
    from tqdm.auto import tqdm

    from batchrl.training.trainer import RESULT

    state = _read_state(sweep)
    todo = [t for t in sweep.trials if not (t.run_dir(sweep.runs) / RESULT).exists()]
    skipped = len(sweep.trials) - len(todo)
    for trial in sweep.trials:
        if trial not in todo:
            state.setdefault(_key(sweep, trial), {}).update(status="finished")
    counts = {"trials": len(sweep.trials), "skipped": skipped, "done": 0, "failed": 0}
    if not todo:
        _write_state(sweep, state)
        return counts
    env = {k: os.environ[k] for k in ("MINARI_DATASETS_PATH", "BATCHRL_CACHE") if os.environ.get(k)}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=80 * 1024 ** 2)
    task = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(run_logged)
    try:
        pending = {task.remote(t, str(t.run_dir(sweep.runs)), os.getcwd()): t for t in todo}
        bar = tqdm(total=len(sweep.trials), initial=skipped, desc=f"sweep {sweep.name}", unit="trial",
                   disable=not progress, dynamic_ncols=True)
        bar.set_postfix(running=min(len(pending), int(ray.cluster_resources().get("CPU", 1))), failed=0)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ref)
            run_dir = trial.run_dir(sweep.runs)
            entry = state.setdefault(_key(sweep, trial), {})
            entry["log"] = str(log_path(run_dir))
            try:
                out = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a trial's failure (RayTaskError, a dead worker) is reported
                counts["failed"] += 1
                entry.update(status="failed", error=_last_line(exc))
                bar.write(f"failed {trial.label} on {trial.dataset} seed {trial.seed}: {_last_line(exc)} "
                          f"(log: {log_path(run_dir)})")
            else:
                counts["done"] += 1
                result = out["result"]
                entry.update(status="finished", started=out["started"], finished=out["finished"], pid=out["pid"])
                score = result.get("normalized_score")
                bar.write(f"done {trial.label} on {trial.dataset} seed {trial.seed}: "
                          + (f"normalised {score:.1f}" if score is not None else f"return {result['return_mean']:.1f}")
                          + f", {result['updates_per_s']:.1f} updates/s")
            _write_state(sweep, state)
            bar.update(1)
            bar.set_postfix(running=min(len(pending), int(ray.cluster_resources().get("CPU", 1))),
                            failed=counts["failed"])
        bar.close()
    finally:
        ray.shutdown()
    return counts


def _key(sweep: Sweep, trial: Trial) -> str:
    return str(trial.run_dir(sweep.runs).relative_to(sweep.runs))


def _read_state(sweep: Sweep) -> dict:
    path = sweep.runs / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(sweep: Sweep, state: dict) -> None:
    sweep.runs.mkdir(parents=True, exist_ok=True)
    tmp = sweep.runs / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, sweep.runs / STATE)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def main(config: str, cpus: int | None, address: str | None, report_only: bool) -> int:
    from batchrl.training.report import write_report

    sweep = load_sweep(config)
    if not sweep.trials:
        raise UserError(f"{config} holds no trials")
    counts = None
    if not report_only:
        counts = run_sweep(sweep, cpus, address)
    table = write_report(sweep)
    if counts is not None:
        print(f"{counts['done']} trained, {counts['skipped']} already finished, {counts['failed']} failed, "
              f"of {counts['trials']} trials; runs in {sweep.runs}")
    print(f"table: {table}")
    return 1 if counts and counts["failed"] else 0

