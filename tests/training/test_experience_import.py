"""`batchrl data import`: experience rows written as real Parquet shards (protos/experience.py's schema) or a
user's CSV, reassembled into Minari datasets that load with Minari and train with `batchrl train`."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import minari
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrl import cli
from batchrl.errors import UserError
from batchrl.protos import experience
from batchrl.training.data import load_dataset
from batchrl.training.experience_import import _columns, import_experience
from tests.conftest import PENDULUM_REF, pendulum_episodes, write_dataset


def episode(seed: int, steps: int, ending: str = "terminated", obs_dim: int = 3) -> dict:
    """A hand-made episode of Pendulum's sizes (observations [N+1, obs_dim], actions [N, 1])."""
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(steps + 1, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-2, 2, size=(steps, 1)).astype(np.float32), "rewards": rng.normal(size=steps),
            "ending": ending}


def rows(session: str, ep: dict, start: float = 0.0) -> list[dict]:
    """The experience log's rows of ``ep``: step rows 0..N-1, then the end row N, one second apart from ``start``."""
    n = len(ep["actions"])
    return [{"session_id": session, "step": t, "observation": ep["observations"][t].tolist(),
             "action": ep["actions"][t].tolist() if t < n else None,
             "reward": float(ep["rewards"][t - 1]) if t else None, "ending": ep["ending"] if t == n else None,
             "model": "pendulum", "version": 1, "time": datetime.fromtimestamp(start + t, tz=timezone.utc)}
            for t in range(n + 1)]


def write_shards(folder, all_rows: list[dict], shards: int = 2, seed: int = 0) -> None:
    """The rows shuffled into ``shards`` Parquet shards of small row groups, as several server processes write."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(all_rows))
    for i, part in enumerate(np.array_split(order, shards)):
        table = pa.Table.from_pylist([all_rows[j] for j in part], schema=experience.schema())
        pq.write_table(table, folder / f"experience-host{i}-{100 + i}-20250101T000000Z-0.parquet", row_group_size=4)


def run_import(source, output, **options):
    return import_experience([str(source)], str(output), progress=False, chunk_rows=8, **options)


def episodes_of(dataset) -> list:
    ds = minari.MinariDataset(dataset) if not isinstance(dataset, str) else minari.load_dataset(dataset)
    return list(ds.iterate_episodes())


def check_episode(got, observations, actions, rewards, terminated: bool) -> None:
    """``got`` holds exactly these arrays, and its last step (only) is flagged as it ended."""
    np.testing.assert_array_equal(got.observations, observations)
    np.testing.assert_array_equal(got.actions, actions)
    np.testing.assert_array_equal(got.rewards, rewards)
    flags = np.arange(len(actions)) == len(actions) - 1
    np.testing.assert_array_equal(got.terminations, flags & terminated)
    np.testing.assert_array_equal(got.truncations, flags & (not terminated))


def check_whole(got, ep: dict) -> None:
    check_episode(got, ep["observations"], ep["actions"], ep["rewards"], ep["ending"] == "terminated")


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def test_shards_in_any_order_reassemble_exactly(tmp_path, root):
    eps = [episode(1, 5), episode(2, 9, "truncated"), episode(3, 3)]
    log = rows("b-second", eps[0], 0) + rows("a-third", eps[1], 100) + rows("c-first", eps[2], -100)
    write_shards(tmp_path / "log", log, shards=2)
    summary = run_import(tmp_path / "log", "test/imported/exact-v0", env="Pendulum-v1")
    got = episodes_of("test/imported/exact-v0")
    assert len(got) == 3  # sessions in the order of their first row's time, whatever their id
    for ep, written in zip((eps[2], eps[0], eps[1]), got):
        check_whole(written, ep)
    assert summary.counts["episodes"] == 3 and summary.counts["steps"] == 17 and summary.files == 2
    data = load_dataset("test/imported/exact-v0")  # as batchrl train reads it
    assert (data.env_id, data.size, data.episode_lengths.tolist()) == ("Pendulum-v1", 17, [3, 5, 9])
    np.testing.assert_array_equal(data.next_observations[:3], eps[2]["observations"][1:])
    meta = minari.load_dataset("test/imported/exact-v0").storage.metadata
    assert meta["dataset_id"] == "test/imported/exact-v0" and meta["minari_version"] == minari.__version__
    assert json.loads(meta["eval_env_spec"])["id"] == "Pendulum-v1"


def test_a_retried_step_appears_once_and_a_row_after_the_end_is_ignored(tmp_path, root):
    ep = episode(4, 6)
    log = rows("s", ep)
    retried = dict(log[2], time=datetime.fromtimestamp(50, tz=timezone.utc))
    after_end = dict(log[3], step=6, time=datetime.fromtimestamp(60, tz=timezone.utc))  # as the OIP path may log
    write_shards(tmp_path / "log", log + [retried, after_end], shards=3)
    summary = run_import(tmp_path / "log", tmp_path / "out", env="Pendulum-v1")
    (got,) = episodes_of(tmp_path / "out" / "data")
    check_whole(got, ep)
    assert (summary.counts["duplicates"], summary.counts["after_end"]) == (1, 1)


def test_a_gap_splits_the_episode(tmp_path, root):
    ep = episode(5, 8)
    log = [r for r in rows("s", ep) if r["step"] != 4]  # step 4 lost to a kill
    write_shards(tmp_path / "log", log)
    summary = run_import(tmp_path / "log", tmp_path / "out", env="Pendulum-v1")
    before, after = episodes_of(tmp_path / "out" / "data")
    # Rows 0..3: row 3's observation ends the part, its action (whose reward is unknown) is dropped; truncated.
    check_episode(before, ep["observations"][:4], ep["actions"][:3], ep["rewards"][:3], terminated=False)
    # Rows 5..8: row 5's reward (earned by the lost action 4) is dropped; the end row ends it as logged.
    check_episode(after, ep["observations"][5:], ep["actions"][5:], ep["rewards"][5:], terminated=True)
    assert {k: summary.counts[k] for k in ("gaps", "split", "split_parts", "episodes", "steps")} == \
        {"gaps": 1, "split": 1, "split_parts": 2, "episodes": 2, "steps": 6}


def test_an_unfinished_episode_is_truncated_or_dropped(tmp_path, root):
    done, cut = episode(6, 4), episode(7, 6, "truncated")
    log = rows("done", done) + rows("cut", cut, 100)[:-1] + rows("lone", episode(8, 2), 200)[:1]
    write_shards(tmp_path / "log", log)
    summary = run_import(tmp_path / "log", tmp_path / "kept", env="Pendulum-v1")
    first, unfinished = episodes_of(tmp_path / "kept" / "data")
    check_whole(first, done)
    check_episode(unfinished, cut["observations"][:6], cut["actions"][:5], cut["rewards"][:5], terminated=False)
    assert (summary.counts["unfinished"], summary.counts["single_dropped"]) == (1, 1)
    assert "unfinished episodes (no end row) truncated at their last row: 1" in str(summary)
    summary = run_import(tmp_path / "log", tmp_path / "dropped", env="Pendulum-v1", drop_unfinished=True)
    (only,) = episodes_of(tmp_path / "dropped" / "data")
    check_whole(only, done)
    assert "unfinished episodes (no end row) dropped: 1" in str(summary)


def test_merge_copies_the_dataset_first_and_keeps_its_environment_and_scores(tmp_path, root, capsys):
    write_dataset(root, "test/base/play-v0", pendulum_episodes(2, 15, seed=3))
    ep = episode(9, 5)
    write_shards(tmp_path / "log", rows("s", ep))
    assert cli.main(["data", "import", str(tmp_path / "log"), "--output", "test/base/more-v0",
                     "--merge", "test/base/play-v0"]) == 0
    out = capsys.readouterr().out
    assert "after the 2 episodes, 30 steps of 'test/base/play-v0' (--merge)" in out
    assert "wrote 1 episodes, 5 steps" in out
    assert "from dataset 'test/base/play-v0': environment Pendulum-v1, reference scores -1200.0 .. -150.0" in out
    base, merged = episodes_of("test/base/play-v0"), episodes_of("test/base/more-v0")
    assert len(merged) == 3
    for original, copy in zip(base, merged):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(copy, key), getattr(original, key))
    check_whole(merged[2], ep)
    data = load_dataset("test/base/more-v0")
    assert (data.ref_min_score, data.ref_max_score, data.env_id) == (*PENDULUM_REF, "Pendulum-v1")
    meta = minari.load_dataset("test/base/more-v0").storage.metadata
    assert meta["author"] == {"batchrl tests"} and meta["algorithm_name"] == "test"
    # The same with rows of another size: refused, naming both sizes.
    write_shards(tmp_path / "wide", rows("w", episode(10, 3, obs_dim=4)))
    with pytest.raises(UserError, match="observations of size 4, but dataset 'test/base/play-v0' has "
                                        "observations of size 3"):
        run_import(tmp_path / "wide", "test/base/wide-v0", merge="test/base/play-v0")
    assert not (root / "test/base/wide-v0").exists()


def test_a_user_csv_with_a_column_mapping_imports_and_trains(tmp_path, root):
    eps = [episode(11, 30), episode(12, 25, "truncated")]
    lines = ["obs_2,ep,act,obs_0,t,r,done,obs_1"]  # columns in any order: obs_* is ordered by its suffix
    for name, ep in zip(("first", "second"), eps):
        n = len(ep["actions"])
        for t in range(n + 1):
            o = [float(v) for v in ep["observations"][t]]
            action = repr(float(ep["actions"][t, 0])) if t < n else ""
            reward = repr(float(ep["rewards"][t])) if t < n else "999"  # reward-of action: the end row's is ignored
            lines.append(f"{o[2]!r},{name},{action},{o[0]!r},{t},{reward},{ep['ending'] if t == n else ''},{o[1]!r}")
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    mapping = ["--map", "session_id=ep", "--map", "step=t", "--map", "observation=obs_*", "--map", "action=act",
               "--map", "reward=r", "--map", "ending=done"]
    out = tmp_path / "from-csv"
    assert cli.main(["data", "import", str(tmp_path / "log.csv"), "--output", str(out), "--env", "Pendulum-v1",
                     "--reward-of", "action", *mapping]) == 0
    first, second = episodes_of(out / "data")
    check_whole(first, eps[0])
    check_whole(second, eps[1])
    assert cli.main(["train", "--algo", "bc", "--dataset", str(out), "--steps", "20", "--eval-every", "20",
                     "--eval-episodes", "1", "--log-every", "10", "--checkpoint-every", "20", "--device", "cpu",
                     "--set", "hidden=16", "--set", "batch_size=16", "--run-dir", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 20


def test_columns_and_sizes_that_do_not_fit_are_named(tmp_path, root, capsys):
    names = [f"obs_{i}" for i in (10, 2, 0, 1, 9, 3, 4, 5, 6, 7, 8)] + ["obs_x"]
    assert _columns(names, "obs_*", "observation", tmp_path) == [f"obs_{i}" for i in range(11)]
    (tmp_path / "log.csv").write_text("ep,t,a,r,done\ns,0,1.0,,\n")
    assert cli.main(["data", "import", str(tmp_path / "log.csv"), "--output", str(tmp_path / "out"),
                     "--map", "session_id=ep", "--map", "step=t", "--map", "observation=obs_*"]) == 1
    error = capsys.readouterr().err
    assert "has no column 'obs_*' for observation" in error and "its columns: ep, t, a, r, done" in error
    write_shards(tmp_path / "wide", rows("w", episode(13, 3, obs_dim=4)))
    with pytest.raises(UserError, match="observations of size 4, but environment 'Pendulum-v1' has observations "
                                        "of size 3"):
        run_import(tmp_path / "wide", tmp_path / "out", env="Pendulum-v1")
    log = rows("s", episode(17, 4))
    log[2]["observation"] = None
    write_shards(tmp_path / "hole", log)
    with pytest.raises(UserError, match="session 's', step 2: no observation"):  # found while writing
        run_import(tmp_path / "hole", tmp_path / "out", env="Pendulum-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hole", "log.csv", "wide"]  # nothing staged left


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path, root):
    write_shards(tmp_path / "log", rows("s", episode(14, 3)))
    run_import(tmp_path / "log", "test/again-v0")
    with pytest.raises(UserError, match="--overwrite replaces it"):
        run_import(tmp_path / "log", "test/again-v0")
    summary = run_import(tmp_path / "log", "test/again-v0", overwrite=True)
    assert "no environment spec written" in str(summary)
    (got,) = episodes_of("test/again-v0")
    ds = minari.load_dataset("test/again-v0")
    assert ds.env_spec is None and ds.action_space.low.tolist() == [float(got.actions.min())]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["again-v0", "namespace_metadata.json"]  # no staging


def test_a_model_gives_the_spaces_environment_and_reference_scores(tmp_path, root):
    import onnx
    from onnx import TensorProto, helper

    from batchrl.protos.batchrl.v1 import manifest_pb2
    from batchrl.protos.contract import MANIFEST_KEY, manifest_to_json

    manifest = manifest_pb2.ModelManifest(algorithm="bc", dataset_id="test/pendulum/play-v0", env_id="Pendulum-v1",
                                          ref_min_score=-1000.0, ref_max_score=-100.0)
    manifest.observation_space.shape.append(3)
    manifest.observation_space.low.extend([-np.inf] * 3)
    manifest.observation_space.high.extend([np.inf] * 3)
    manifest.action_space.shape.append(1)
    manifest.action_space.low.append(-2.0)
    manifest.action_space.high.append(2.0)
    graph = helper.make_graph([helper.make_node("Identity", ["observations"], ["actions"])], "policy",
                              [helper.make_tensor_value_info("observations", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph)
    model.metadata_props.add(key=MANIFEST_KEY, value=manifest_to_json(manifest))
    onnx.save(model, str(tmp_path / "model.onnx"))
    write_shards(tmp_path / "log", rows("s", episode(15, 4)))
    summary = run_import(tmp_path / "log", "test/served-v0", model=tmp_path / "model.onnx")
    data = load_dataset("test/served-v0")
    assert (data.env_id, data.ref_min_score, data.ref_max_score) == ("Pendulum-v1", -1000.0, -100.0)
    assert (data.action_low.tolist(), data.action_high.tolist()) == ([-2.0], [2.0])
    assert "environment Pendulum-v1, reference scores -1000.0 .. -100.0" in str(summary)
    write_shards(tmp_path / "wide", rows("w", episode(16, 3, obs_dim=4)))
    with pytest.raises(UserError, match=f"observations of size 4, but the model {tmp_path}/model.onnx has "
                                        "observations of size 3"):
        run_import(tmp_path / "wide", "test/served-v1", model=tmp_path / "model.onnx")


def test_the_servers_own_log_imports(tmp_path, root):
    """Shards written by `batchrl serve --log-experience`'s writer (two sessions interleaved, one step retried)."""
    from batchrl.serving.experience import ExperienceLog

    eps = {"a": episode(20, 6), "b": episode(21, 4, "truncated")}
    log = ExperienceLog(tmp_path / "log", shard_bytes=400)
    for t in range(7):  # as concurrent clients send them
        for name, ep in eps.items():
            n = len(ep["actions"])
            if t < n:
                log.step(name, "pendulum", 1, t, ep["observations"][t], ep["actions"][t],
                         float(ep["rewards"][t - 1]) if t else None)
            elif t == n:
                log.end(name, "pendulum", 1, n, ep["observations"][n], float(ep["rewards"][n - 1]), ep["ending"])
            if (name, t) == ("a", 2):  # the client retried: the server answered the same step again
                log.step(name, "pendulum", 1, t, ep["observations"][t], ep["actions"][t], float(ep["rewards"][t - 1]))
    log.close()
    assert len(list((tmp_path / "log").glob("experience-*.parquet"))) > 1
    summary = run_import(tmp_path / "log", "test/served/log-v0", env="Pendulum-v1")
    first, second = episodes_of("test/served/log-v0")
    check_whole(first, eps["a"])
    check_whole(second, eps["b"])
    assert (summary.counts["duplicates"], summary.counts["episodes"]) == (1, 2)


# -- issue 31, item 14: non-finite values, copies of a step that differ, a CSV without an ending column ----------
def csv_log(path, eps: dict[str, dict], poison: tuple[int, str, str] | None = None, extra: list[str] = ()) -> None:
    """A user's CSV of ``eps`` (columns ep,t,obs_0..2,act,r,done; the reward of the row's own action, an end row
    holding the final observation); ``poison`` (step of the first episode, field, text) writes text there."""
    lines = ["ep,t,obs_0,obs_1,obs_2,act,r,done"]
    for name, ep in eps.items():
        n = len(ep["actions"])
        for t in range(n + 1):
            cells = {"obs_1": repr(float(ep["observations"][t, 1])), "act": repr(float(ep["actions"][t, 0])) if t < n
                     else "", "r": repr(float(ep["rewards"][t])) if t < n else ""}
            if poison and name == next(iter(eps)) and t == poison[0]:
                cells[poison[1]] = poison[2]
            o = [float(v) for v in ep["observations"][t]]
            lines.append(f"{name},{t},{o[0]!r},{cells['obs_1']},{o[2]!r},{cells['act']},{cells['r']},"
                         f"{ep['ending'] if t == n else ''}")
    path.write_text("\n".join(lines + list(extra)) + "\n")


CSV_MAP = {"session_id": "ep", "step": "t", "observation": "obs_*", "action": "act", "reward": "r", "ending": "done"}


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["observation", "action", "reward"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_non_finite_value_is_refused_naming_its_place(tmp_path, root, fmt, field, text):
    """NaN, inf and -inf alike, in observations, actions and rewards, of a user's CSV and of the log's Parquet:
    one line naming the file, the line or row, the session, the step and the column; nothing written."""
    ep = episode(30, 5)
    if fmt == "csv":
        column = {"observation": "obs_1", "action": "act", "reward": "r"}[field]
        csv_log(tmp_path / "log.csv", {"s": ep}, poison=(3, column, text))
        source, options = tmp_path / "log.csv", {"mapping": CSV_MAP, "reward_of": "action"}
        where = f"{source} line 5, session 's', step 3: the {field} (column {column!r})"  # line 1 is the header
    else:
        log = rows("s", ep)
        value = float(text)
        if field == "observation":
            log[3]["observation"][1] = value
        else:
            log[3][field] = [value] if field == "action" else value
        source, options = tmp_path / "experience-one.parquet", {}
        pq.write_table(pa.Table.from_pylist(log, schema=experience.schema()), source)
        element = " element 1" if field == "observation" else ""
        where = f"{source} row 3, session 's', step 3: the {field} (column {field!r}{element})"
    with pytest.raises(UserError) as refused:
        run_import(source, tmp_path / "out", env="Pendulum-v1", **options)
    message = str(refused.value)
    assert message.startswith(where) and f"holds {text}; expected a finite number" in message, message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_non_finite_value_is_refused_where_no_episode_needs_it(tmp_path, root):
    """The end row's reward, which --reward-of action ignores, holding inf: refused all the same."""
    ep = episode(35, 4)
    csv_log(tmp_path / "log.csv", {"s": ep}, poison=(4, "r", "inf"))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'log.csv'} line 6, session 's', step 4: the reward "
                                                  "(column 'r') holds inf")):
        run_import(tmp_path / "log.csv", tmp_path / "out", env="Pendulum-v1", mapping=CSV_MAP, reward_of="action")


def conflicting_log(folder, ep: dict, changed: dict) -> None:
    """The log of ``ep`` in two shards: step 2 logged again 30 s later with ``changed`` values (in the shard whose
    name sorts first, so only the time says which copy came first), and step 4 retried with the same values."""
    log = rows("s", ep, start=0)
    later = dict(log[2], **changed, time=datetime.fromtimestamp(30, tz=timezone.utc))
    retried = dict(log[4], time=datetime.fromtimestamp(40, tz=timezone.utc))
    folder.mkdir()
    for name, part in (("a", [later]), ("b", log + [retried])):
        pq.write_table(pa.Table.from_pylist(part, schema=experience.schema()),
                       folder / f"experience-{name}-1-20250101T000000Z-0.parquet")


def test_copies_of_a_step_that_differ_are_refused_unless_on_conflict_says_which(tmp_path, root, capsys):
    ep = episode(31, 6)
    changed = {"observation": [9.0, 8.0, 7.0], "action": [1.5], "reward": 42.0}
    conflicting_log(tmp_path / "log", ep, changed)
    shard_b = tmp_path / "log" / "experience-b-1-20250101T000000Z-0.parquet"
    with pytest.raises(UserError, match=re.escape(
            f"{shard_b} row 2, session 's', step 2 and its copy at {tmp_path / 'log'}/experience-a-1-"
            "20250101T000000Z-0.parquet row 0 differ in observation and action and reward (1 step(s) have copies "
            "that differ); give --on-conflict first or last")):
        run_import(tmp_path / "log", tmp_path / "refused", env="Pendulum-v1")
    assert not (tmp_path / "refused").exists()

    summary = run_import(tmp_path / "log", tmp_path / "first", env="Pendulum-v1", on_conflict="first")
    (got,) = episodes_of(tmp_path / "first" / "data")
    check_whole(got, ep)  # the earlier copy, though its shard sorts second
    assert (summary.counts["duplicates"], summary.counts["conflicts"]) == (1, 1)  # the identical retry: no conflict
    assert "duplicate rows removed: 1; steps whose copies differ: 1 (kept the first copy of each)" in str(summary)

    assert cli.main(["data", "import", str(tmp_path / "log"), "--output", str(tmp_path / "last"), "--env",
                     "Pendulum-v1", "--on-conflict", "last"]) == 0
    assert "steps whose copies differ: 1 (kept the last copy of each)" in capsys.readouterr().out
    (got,) = episodes_of(tmp_path / "last" / "data")
    observations, actions, rewards = ep["observations"].copy(), ep["actions"].copy(), ep["rewards"].copy()
    observations[2], actions[2], rewards[1] = changed["observation"], changed["action"], changed["reward"]
    check_episode(got, observations, actions, rewards, terminated=True)


def test_copies_of_an_end_that_differ_and_csv_copies_are_ordered_by_line(tmp_path, root):
    """Two end rows naming different endings conflict; in a CSV (no time) the first copy is the earlier line."""
    ep = episode(32, 3)
    end_again = f"s,3,{','.join(repr(float(v)) for v in ep['observations'][3])},,,truncated"
    csv_log(tmp_path / "log.csv", {"s": ep}, extra=["s,1,0.5,0.25,0.125,1.0,7.0,", end_again])
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'log.csv'} line 3, session 's', step 1 and its copy "
                                                  f"at {tmp_path / 'log.csv'} line 6 differ in observation and "
                                                  "action and reward (2 step(s) have copies that differ)")):
        run_import(tmp_path / "log.csv", tmp_path / "out", env="Pendulum-v1", mapping=CSV_MAP, reward_of="action")
    run_import(tmp_path / "log.csv", tmp_path / "first", env="Pendulum-v1", mapping=CSV_MAP, reward_of="action",
               on_conflict="first")
    (got,) = episodes_of(tmp_path / "first" / "data")
    check_whole(got, ep)
    run_import(tmp_path / "log.csv", tmp_path / "last", env="Pendulum-v1", mapping=CSV_MAP, reward_of="action",
               on_conflict="last")
    (got,) = episodes_of(tmp_path / "last" / "data")
    observations, actions, rewards = ep["observations"].copy(), ep["actions"].copy(), ep["rewards"].copy()
    observations[1], actions[1], rewards[1] = [0.5, 0.25, 0.125], [1.0], 7.0
    check_episode(got, observations, actions, rewards, terminated=False)  # the later end row: truncated


def test_a_csv_without_an_ending_column_imports_each_episode_truncated_at_its_last_row(tmp_path, root):
    eps = {"one": episode(33, 4), "two": episode(34, 3)}
    lines = ["ep,t,obs_0,obs_1,obs_2,act,r"]  # a row per step: observation, action, the reward it earned
    for name, ep in eps.items():
        lines += [f"{name},{t},{','.join(repr(float(v)) for v in ep['observations'][t])},"
                  f"{float(ep['actions'][t, 0])!r},{float(ep['rewards'][t])!r}" for t in range(len(ep["actions"]))]
    (tmp_path / "steps.csv").write_text("\n".join(lines) + "\n")
    mapping = {k: v for k, v in CSV_MAP.items() if k != "ending"}
    summary = run_import(tmp_path / "steps.csv", tmp_path / "out", env="Pendulum-v1", mapping=mapping,
                         reward_of="action")
    got = episodes_of(tmp_path / "out" / "data")
    for written, ep in zip(got, eps.values()):  # the last row's observation ends it; its action is dropped
        n = len(ep["actions"])
        check_episode(written, ep["observations"][:n], ep["actions"][:n - 1], ep["rewards"][:n - 1],
                      terminated=False)
    assert (summary.counts["episodes"], summary.counts["unfinished"]) == (2, 2)
    assert "files without an ending column (no end rows: their episodes are unfinished): 1" in str(summary)
    with pytest.raises(UserError, match="has no column 'done' for ending"):  # named by --map, it must exist
        run_import(tmp_path / "steps.csv", tmp_path / "named", env="Pendulum-v1", mapping=CSV_MAP)


def test_the_readmes_csv_example_imports_as_written(tmp_path, root):
    """The README's CSV, written as shown, imported by the README's command run as written (`batchrl` spawned)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (table,) = [b for b in re.findall(r"```csv\n(.*?)```", readme, re.S) if "obs_" in b]
    (command,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "data import" in b and "--map" in b]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0].endswith("batchrl") and argv[1:3] == ["data", "import"]
    source = next(a for a in argv[3:] if a.endswith(".csv"))
    (tmp_path / source).write_text(table)
    done = subprocess.run([str(Path(sys.executable).parent / "batchrl"), *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = argv[argv.index("--output") + 1]
    data = [line.split(",") for line in table.splitlines()[1:]]
    header = table.splitlines()[0].split(",")
    column = {name: np.array([[float(row[header.index(c)]) for c in header if c.startswith(name)] for row in data])
              for name in ("obs_", "act_")}
    (got,) = episodes_of(tmp_path / output / "data")
    check_episode(got, column["obs_"].astype(np.float32), column["act_"][:-1].astype(np.float32),
                  np.array([float(row[header.index("r")]) for row in data])[:-1], terminated=False)
    assert "e1 above is 2 steps" in " ".join(readme.split()) and len(got.rewards) == 2  # as the README says
