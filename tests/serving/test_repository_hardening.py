"""Regression tests: one bad version folder must not stop the model repository, and a new version that
changes a model's observation or action shape must not silently become the default.

Black-box: `batchrl serve` runs as a process (tests/serving/blackbox.py) and is spoken to with raw gRPC
calls, its log and its metrics endpoint. The bad folders are built from copies of the session's trained
'pendulum' model (observations [N, 3] -> actions [N, 1]) and a tiny hand-built ONNX graph.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from batchrl.protos.contract import version_dirs
from tests.serving.blackbox import admin_pb2, admin_pb2_grpc, policy_pb2, serving
from batchrl.training.export import list_versions, publish

TOKEN = "hardening-admin-token"
ADMIN = [("authorization", f"Bearer {TOKEN}")]
MANIFEST_KEY = "batchrl.manifest"  # the ONNX metadata key of the manifest (protos/manifest.proto)
HUGE = "99999999999999999999"      # > 2**63 - 1: not an int64 on the wire
INT64_MAX = 2**63 - 1


# -- building model folders --------------------------------------------------------------------
def install(repo: Path, name: str, folder: str, source: Path) -> Path:
    """Put ``source`` in place as repo/name/folder/model.onnx, appearing whole (staged, renamed in)."""
    staging = repo / name / f".staging-{folder}"
    staging.mkdir(parents=True)
    shutil.copyfile(source, staging / "model.onnx")
    os.rename(staging, repo / name / folder)
    return repo / name / folder / "model.onnx"


def rewrite_manifest(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose manifest (ONNX metadata) is ``edit``ed (a function of the JSON dict)."""
    import onnx

    model = onnx.load(source)
    (prop,) = [p for p in model.metadata_props if p.key == MANIFEST_KEY]
    manifest = json.loads(prop.value)
    edit(manifest)
    prop.value = json.dumps(manifest)
    onnx.save(model, target)
    return target


def observation_shape(shape):
    def edit(manifest):
        manifest["observationSpace"]["shape"] = shape
    return edit


def tiny_policy(target: Path, obs_dim: int = 4) -> Path:
    """A valid feed-forward policy: observations [N, obs_dim] -> MatMul, Tanh -> actions [N, 1] in [-1, 1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.full((obs_dim, 1), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["observations", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["actions"])],
        "tiny", [helper.make_tensor_value_info("observations", TensorProto.FLOAT, ["batch", obs_dim])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", 1])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    manifest = {"algorithm": "bc", "observationSpace": {"shape": [obs_dim]},
                "actionSpace": {"shape": [1], "low": [-1.0], "high": [1.0]}}
    helper.set_model_props(model, {MANIFEST_KEY: json.dumps(manifest)})
    onnx.save(model, target)
    return target


# -- talking to the server ---------------------------------------------------------------------
def tensor(array) -> policy_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


def act(server, model: str, obs, version: int | None = None) -> policy_pb2.ActResponse:
    request = policy_pb2.ActRequest(model=model, observations=tensor(obs))
    if version is not None:
        request.version = version
    with server.channel() as channel:
        return server.policy(channel).Act(request, timeout=10)


def models(server) -> dict[str, tuple[int, list[int]]]:
    """{name: (default version, loaded versions)} from ListModels."""
    with server.channel() as channel:
        answer = server.policy(channel).ListModels(policy_pb2.ListModelsRequest(), timeout=10)
    return {m.name: (m.default_version, [v.version for v in m.versions]) for m in answer.models}


def load(server, name: str, version: int) -> admin_pb2.LoadModelResponse:
    with server.channel() as channel:
        return admin_pb2_grpc.ModelServiceStub(channel).LoadModel(
            admin_pb2.LoadModelRequest(name=name, version=version), metadata=ADMIN, timeout=30)


def lines_with(server, text: str) -> list[str]:
    return [line for line in server.lines if text in line]


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(0.05)
    return result


def rejected(server, model: str, reason: str) -> float:
    return server.metric("batchrl_repository_rejected", model=model, reason=reason)


POLLS = 0.6  # three poll intervals of 0.2 s: long enough to see a refusal that is repeated every poll


# -- the listing function and export's numbering (in process) -----------------------------------
def test_version_folders_are_plain_ascii_int64_integers(tmp_path):
    model_dir = tmp_path / "models" / "m"
    for name in ("0", "007", "²", HUGE, str(INT64_MAX), "3", ".staging-x"):
        (model_dir / name).mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")  # files are not folders: not looked at
    (tmp_path / "elsewhere").mkdir()
    (model_dir / "5").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (model_dir / "6").symlink_to(model_dir / "3", target_is_directory=True)  # inside the repository: fine
    assert version_dirs(model_dir) == {3: model_dir / "3", 6: model_dir / "6", INT64_MAX: model_dir / str(INT64_MAX)}

    from batchrl.protos.contract import scan_versions

    scan = scan_versions(model_dir)
    assert {name: reason for name, (reason, _) in scan.rejected.items()} == {
        "0": "name", "007": "name", "²": "name", HUGE: "name", "5": "outside"}
    for name, (_, why) in scan.rejected.items():
        assert repr(name) in why  # each refusal names its folder
    assert "from 1 to 9223372036854775807" in scan.rejected["007"][1]
    assert scan_versions(model_dir, root=tmp_path).versions == version_dirs(model_dir) | {5: model_dir / "5"}


def test_export_numbers_the_next_version_past_valid_versions_only(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"x")
    repo = tmp_path / "repo"
    for name in ("3", "007", "²", HUGE):
        (repo / "m" / name).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (repo / "m" / "4").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # refused, but holds "4"
    assert list_versions(repo / "m") == [3]
    assert publish(repo, "m", source)[0] == 5
    assert list_versions(repo / "m") == [3, 5]
    (repo / "full" / str(INT64_MAX)).mkdir(parents=True)
    with pytest.raises(ValueError, match=str(INT64_MAX)):
        publish(repo, "full", source)
    assert [p.name for p in (repo / "full").iterdir()] == [str(INT64_MAX)]  # nothing left behind


# -- start-up ----------------------------------------------------------------------------------
def test_bad_version_folders_at_start_up_are_skipped_logged_once_and_counted(repository, tmp_path):
    good = repository / "pendulum" / "1" / "model.onnx"
    repo = tmp_path / "models"
    install(repo, "pendulum", "1", good)
    install(repo, "pendulum", "2", rewrite_manifest(good, tmp_path / "mismatch.onnx", observation_shape([4])))
    for name in ("²", HUGE, "007"):
        install(repo, "pendulum", name, good)
    outside = install(tmp_path / "elsewhere", "pendulum", "7", good).parent
    (repo / "pendulum" / "7").symlink_to(outside, target_is_directory=True)
    shutil.copytree(repo / "pendulum" / "1", repo / "pendulum" / ".staging-9")  # export's staging: ignored
    # Start-up loads every valid version of a model that is not serving yet; the highest serves.
    install(repo, "mixed", "1", good)
    install(repo, "mixed", "2", tiny_policy(tmp_path / "tiny.onnx"))

    with serving(repo, "--poll", "0.2", metrics=True) as server:
        assert models(server) == {"mixed": (2, [1, 2]), "pendulum": (1, [1])}
        assert act(server, "pendulum", np.ones((2, 3))).version == 1
        assert act(server, "mixed", np.ones((2, 4))).version == 2
        time.sleep(POLLS)
        for name, reason in ((HUGE, "name"), ("²", "name"), ("007", "name"), ("7", "outside")):
            (line,) = lines_with(server, repr(name))  # logged once, not on every poll
            assert "pendulum" in line
            assert reason != "outside" or str(outside.resolve()) in line
        (line,) = lines_with(server, "pendulum/2/model.onnx")
        assert "warm-up" in line and "observation shape [4]" in line
        after = server.lines[server.lines.index(line) + 1]
        assert re.match(r"\d{4}-\d\d-\d\d ", after), after  # one line: onnxruntime's multi-line message is joined
        assert ".staging-9" not in server.log
        assert rejected(server, "pendulum", "name") == 3
        assert rejected(server, "pendulum", "outside") == 1
        assert rejected(server, "pendulum", "load") == 1
        assert server.metric("batchrl_model_load_failures_total", model="pendulum") == 1
        assert models(server)["pendulum"] == (1, [1])  # ListModels still answers after the polls
    assert server.proc.returncode == 0


# -- while serving (one server shared by the tests below, each on its own model names) -------------
@pytest.fixture(scope="module")
def live(repository, tmp_path_factory):
    """A polling server over pendulum copies: acrobot/1, cheetah/1, shaped/1, and future/1 whose
    manifest carries a field this server does not know."""
    root = tmp_path_factory.mktemp("live")
    repo = root / "models"
    good = repository / "pendulum" / "1" / "model.onnx"
    for name in ("acrobot", "cheetah", "shaped"):
        install(repo, name, "1", good)

    def newer(manifest):
        manifest["fieldFromANewerExport"] = {"nested": [1, 2]}

    install(repo, "future", "1", rewrite_manifest(good, root / "future.onnx", newer))
    with serving(repo, "--poll", "0.2", metrics=True, env={"BATCHRL_ADMIN_TOKEN": TOKEN}) as server:
        yield server, repo, root


def test_a_manifest_with_unknown_fields_loads(live):
    server, _, _ = live
    assert models(server)["future"] == (1, [1])
    assert act(server, "future", np.ones((2, 3))).actions.shape == [2, 1]


def test_a_bad_version_appearing_while_polling_is_skipped_and_the_poll_carries_on(live, repository):
    server, repo, root = live
    good = repository / "pendulum" / "2" / "model.onnx"
    # "acrobot" sorts before "cheetah": the bad folder is met first in the same poll.
    install(repo, "acrobot", "2", rewrite_manifest(good, root / "acrobot-bad.onnx", observation_shape([4])))
    install(repo, "cheetah", "2", good)
    eventually(lambda: models(server)["cheetah"] == (2, [1, 2]))
    assert models(server)["acrobot"] == (1, [1])
    assert act(server, "acrobot", np.ones((2, 3))).version == 1
    assert act(server, "cheetah", np.ones((2, 3))).version == 2
    eventually(lambda: rejected(server, "acrobot", "load") == 1)

    with pytest.raises(grpc.RpcError) as info:  # the explicit load of the same file: refused, not INTERNAL
        load(server, "acrobot", 2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "acrobot/2/model.onnx" in info.value.details() and "warm-up" in info.value.details()
    assert models(server)["acrobot"] == (1, [1])
    time.sleep(POLLS)
    assert len(lines_with(server, "rejected acrobot version 2")) == 1  # not retried on every poll
    assert rejected(server, "acrobot", "load") == 1


def test_an_incompatible_new_version_waits_for_an_explicit_load(live, tmp_path):
    server, repo, _ = live
    install(repo, "shaped", "2", tiny_policy(tmp_path / "tiny.onnx", obs_dim=4))
    eventually(lambda: rejected(server, "shaped", "incompatible") == 1 or models(server)["shaped"] != (1, [1]))
    assert models(server)["shaped"] == (1, [1])  # the default did not change under its clients
    assert rejected(server, "shaped", "incompatible") == 1
    assert act(server, "shaped", np.ones((2, 3))).version == 1
    time.sleep(POLLS)
    (line,) = lines_with(server, "shaped/2/model.onnx")  # logged once, not retried on every poll
    assert "[4]" in line and "[3]" in line and "LoadModel" in line and "batchrl models load shaped" in line

    answer = load(server, "shaped", 2)  # the operator says the change is meant
    assert list(answer.loaded_versions) == [2] and answer.default_version == 2
    assert act(server, "shaped", np.ones((2, 4))).version == 2
    assert act(server, "shaped", np.ones((2, 3)), version=1).version == 1  # clients pinned to 1 keep working
    assert rejected(server, "shaped", "incompatible") == 0
    time.sleep(POLLS)
    assert models(server)["shaped"] == (2, [1, 2])
