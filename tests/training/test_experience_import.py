"""`batchrl data import`: experience rows written as real Parquet shards (protos/experience.py's schema) or a
user's CSV, reassembled into Minari datasets that load with Minari and train with `batchrl train`."""
from __future__ import annotations

import json
from datetime import datetime, timezone

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
