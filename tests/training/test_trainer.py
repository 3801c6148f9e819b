"""The trainer: run folder contents, weights-only checkpoints, exact resume."""
import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import torch

from batchrl.errors import Interrupted, UserError
from batchrl.training.trainer import (CHECKPOINT, TrainConfig, Trainer, load_checkpoint, load_policy, lock_run,
                                      unlock_run)


def config(**kw):
    base = dict(algorithm="iql", dataset="test/pendulum/play-v0", steps=120, eval_every=60, eval_episodes=1,
                log_every=20, checkpoint_every=60, device="cpu", algo={"hidden": (16, 16), "batch_size": 32})
    return TrainConfig(**{**base, **kw})


def crash_at(trainer: Trainer, step: int) -> None:
    """Run ``trainer`` until its update at ``step`` fails as a power cut would stop it."""
    update = trainer.algo.update

    def crashing(batch):
        if trainer.step == step:
            raise RuntimeError("power cut")
        return update(batch)

    trainer.algo.update = crashing
    with pytest.raises(RuntimeError, match="power cut"):
        trainer.run()


def test_run_folder_holds_config_version_metrics_curve_checkpoint_and_result(trained_run):
    for name in ("config.json", "version.json", "metrics.jsonl", "curve.png", CHECKPOINT, "result.json"):
        assert (trained_run / name).is_file(), name
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [150, 300]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(50, 301, 50))
    result = json.loads((trained_run / "result.json").read_text())
    assert result["steps"] == 300 and result["normalized_score"] is not None
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["algo"]["expectile"] == 0.7 and cfg["algo"]["beta"] == 3.0 and cfg["algo"]["hidden"] == [32, 32]
    [session] = json.loads((trained_run / "version.json").read_text())["sessions"]
    assert session["code"] and session["from_step"] == 0 and session["batchrl"]
    assert (trained_run / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_loads_with_weights_only(trained_run):
    ckpt = torch.load(trained_run / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 300
    assert set(ckpt["algorithm"]["modules"]) == {"actor", "critic", "value", "critic_target"}


def test_resume_continues_exactly(minari_root, tmp_path):
    straight = Trainer(tmp_path / "straight", config(), progress=False)
    straight.run()

    # A crash at step 110: after the checkpoint at 60, and after train rows at 80 and 100 were logged.
    crash_at(Trainer(tmp_path / "resumed", config(), progress=False), 110)
    logged = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [20, 40, 60, 60, 80, 100] and not (tmp_path / "resumed" / "result.json").exists()
    # A fresh Trainer resumes from the checkpoint at 60 and replays 61..120; the rows at 80 and 100
    # written after that checkpoint must not appear twice.
    resumed = Trainer(tmp_path / "resumed", progress=False)
    assert resumed.step == 60
    resumed.run()

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for group in ("actor", "critic", "value", "critic_target"):
        for key, tensor in a["algorithm"]["modules"][group].items():
            torch.testing.assert_close(tensor, b["algorithm"]["modules"][group][key], rtol=0, atol=0)
    assert a["algorithm"]["schedulers"]["actor"]["last_epoch"] == b["algorithm"]["schedulers"]["actor"]["last_epoch"] == 120
    # provenance: the first session, then one entry per resume (the first is never rewritten)
    first = json.loads((tmp_path / "straight" / "version.json").read_text())["sessions"]
    sessions = json.loads((tmp_path / "resumed" / "version.json").read_text())["sessions"]
    assert [s["from_step"] for s in first] == [0] and [s["from_step"] for s in sessions] == [0, 60]
    rows_a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "updates_per_s"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


def test_refuses_to_overwrite_a_run(trained_run):
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(trained_run, config(), progress=False)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown algorithm 'sac'"):
        config(algorithm="sac")
    with pytest.raises(ValueError, match="no setting 'betta'"):
        config(algo={"betta": 1})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        config(steps=0)


def test_loaded_policy_acts_within_bounds(trained_run):
    _, policy, _ = load_policy(trained_run)
    action = policy.act([1.0, 0.0, 0.0])
    assert action.shape == (1,) and -2.0 <= action[0] <= 2.0


def test_one_trainer_per_run_folder(minari_root, tmp_path):
    first = Trainer(tmp_path / "run", config(), progress=False)
    with pytest.raises(RuntimeError, match="in use by another training process"):
        Trainer(tmp_path / "run", config(), progress=False)
    del first


def test_a_compiled_run_resumes_exactly(minari_root, tmp_path, monkeypatch):
    """`--compile` (the one compile smoke test of CI): the Decision Transformer, whose dropout draws inside the
    compiled code, stopped after its checkpoint and resumed, ends where the uninterrupted compiled run ends."""
    import tqdm

    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # (inductor's progress bars start no monitor thread)
    dt = dict(algorithm="dt", steps=6, eval_every=6, eval_episodes=1, log_every=3, checkpoint_every=3, compile=True,
              algo={"embed": 16, "layers": 1, "context_length": 4, "batch_size": 8})
    Trainer(tmp_path / "straight", config(**dt), progress=False).run()
    crash_at(Trainer(tmp_path / "resumed", config(**dt), progress=False), 5)
    resumed = Trainer(tmp_path / "resumed", progress=False)
    assert resumed.config.compile and resumed.step == 3
    resumed.run()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for key, tensor in a["algorithm"]["modules"]["model"].items():
        torch.testing.assert_close(tensor, b["algorithm"]["modules"]["model"][key], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm, key, before", [("cql", "backup", "sample"), ("iql", "actor_std", "clamp")])
def test_a_config_written_before_a_setting_existed_reads_as_it_trained(tmp_path, algorithm, key, before):
    from batchrl.training.trainer import read_config

    written = dataclasses.asdict(TrainConfig(algorithm=algorithm, dataset="d", algo={key: before}))
    assert written["algo"][key] == before
    del written["algo"][key]  # as config.json was written before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert read_config(tmp_path).algo[key] == before
    written["algo"][key] = "mean" if algorithm == "cql" else "sigmoid"  # a recorded value is kept
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert read_config(tmp_path).algo[key] == written["algo"][key]


def test_the_lock_file_exists_only_while_a_trainer_holds_the_run(minari_root, trained_run, tmp_path):
    """The README's promise: .lock is there while a trainer holds the run, and gone when it lets go at the
    end, on an error and on Ctrl-C (a failed start: tests/test_cli.py's resume without a checkpoint)."""
    assert (trained_run / "result.json").exists() and not (trained_run / ".lock").exists()  # the normal end

    short = dict(steps=40, eval_every=40, checkpoint_every=40)  # stopped before any evaluation
    crashed = Trainer(tmp_path / "crashed", config(**short), progress=False)
    assert (tmp_path / "crashed" / ".lock").exists()
    crash_at(crashed, 10)
    assert not (tmp_path / "crashed" / ".lock").exists()

    stopped = Trainer(tmp_path / "stopped", config(**short), progress=False)
    update = stopped.algo.update

    def interrupting(batch):
        if stopped.step == 10:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, mid-run
        return update(batch)

    stopped.algo.update = interrupting
    with pytest.raises(Interrupted, match="SIGINT: stopped at step"):
        stopped.run()
    assert (tmp_path / "stopped" / CHECKPOINT).exists() and not (tmp_path / "stopped" / ".lock").exists()
    resumed = Trainer(tmp_path / "stopped", progress=False)  # the released run is free again
    assert (tmp_path / "stopped" / ".lock").exists()
    resumed.close()
    assert not (tmp_path / "stopped" / ".lock").exists()


def test_the_run_lock_stays_exclusive_while_holders_delete_it(tmp_path):
    """Holders delete .lock as they let go: a locker that opened the file just before must not take the run
    beside the next holder. Threads lock through their own open files (flock excludes those as it does
    processes) and check that no two ever hold the run at once."""
    holding, overlaps, taken = [], [], []

    def contend(deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                handle = lock_run(tmp_path)
            except UserError:
                continue
            holding.append(1)
            if len(holding) > 1:
                overlaps.append(len(holding))
            taken.append(1)
            time.sleep(0)  # let the others try while this one holds the run
            holding.pop()
            unlock_run(tmp_path, handle)

    deadline = time.monotonic() + 1.5
    threads = [threading.Thread(target=contend, args=(deadline,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and len(taken) > 100 and not (tmp_path / ".lock").exists()
