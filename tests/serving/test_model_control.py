"""Model control on a live server: hot swap under load, poll, corrupt files, version pinning,
the admin token, and names that try to leave the repository."""
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from batchrl.cli import main as cli
from batchrl.protos.batchrl.v1 import policy_pb2, policy_pb2_grpc
from batchrl.serving.repository import Registry
from batchrl.serving.errors import InvalidArgument
from batchrl.serving.server import ServerOptions
from tests.serving.running import running
from batchrl.serving.tensors import encode

TOKEN = "s3cret-admin-token"


def install(repo, name, version, source):
    """Put a model file in place as a whole version folder (written beside, renamed in)."""
    staging = repo / name / f".staging-{version}"
    staging.mkdir(parents=True)
    shutil.copyfile(source, staging / "model.onnx")
    os.rename(staging, repo / name / str(version))


@pytest.fixture
def repo(repository, tmp_path):
    """A repository holding only version 1 of 'pendulum'."""
    root = tmp_path / "models"
    install(root, "pendulum", 1, repository / "pendulum" / "1" / "model.onnx")
    return root


def test_hot_swap_under_load_fails_no_request(repo, repository):
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client, registry = srv.client, srv.registry
        swapped = []
        notify = registry.on_change
        registry.on_change = lambda name, up: (swapped.append(time.perf_counter()), notify(name, up))
        stub = policy_pb2_grpc.PolicyServiceStub(client.channel)
        request = policy_pb2.ActRequest(model="pendulum", observations=encode(np.ones((4, 3), np.float32)))
        answers, errors, stop = [], [], threading.Event()

        def load():
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    version = stub.Act(request, timeout=10).version
                except grpc.RpcError as exc:
                    errors.append(exc)
                    continue
                answers.append((start, time.perf_counter(), version))

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        while len(answers) < 1200:
            time.sleep(0.01)
        install(repo, "pendulum", 2, repository / "pendulum" / "2" / "model.onnx")
        out = client.load_model("pendulum", token=TOKEN)
        assert list(out.loaded_versions) == [2] and out.default_version == 2
        after = len(answers)
        while len(answers) < after + 1200:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len(answers) >= 2400
    (t_swap,) = swapped
    versions = {v for _, _, v in answers}
    assert versions == {1, 2}
    assert any(start < t_swap < end for start, end, _ in answers)  # requests were in flight at the swap
    assert all(v == 2 for start, _, v in answers if start > t_swap)  # new requests go to the new version
    assert all(v == 1 for _, end, v in answers if end < t_swap)


def test_poll_picks_up_complete_versions_and_drops_removed_ones(repo, repository):
    registry = Registry.open(repo, ["CPUExecutionProvider"])
    (repo / "pendulum" / "3").mkdir()  # a folder without its model file is not a version yet
    assert registry.poll() == []
    install(repo, "pendulum", 2, repository / "pendulum" / "2" / "model.onnx")
    assert registry.poll() == ["loaded pendulum/2"] and registry.get("pendulum").version == 2
    shutil.rmtree(repo / "pendulum" / "2")
    assert registry.poll() == ["removed pendulum/2"] and registry.get("pendulum").version == 1


def test_a_corrupt_or_incompatible_model_is_rejected_while_the_old_one_serves(repo, tmp_path):
    (repo / "pendulum" / "5").mkdir()
    (repo / "pendulum" / "5" / "model.onnx").write_bytes(b"not an onnx file")
    import onnx
    from onnx import helper

    bare = helper.make_model(helper.make_graph([helper.make_node("Identity", ["observations"], ["actions"])], "g",
                                              [helper.make_tensor_value_info("observations", 1, [None, 3])],
                                              [helper.make_tensor_value_info("actions", 1, [None, 3])]),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(bare, tmp_path / "bare.onnx")
    install(repo, "pendulum", 6, tmp_path / "bare.onnx")
    obs = np.ones((2, 3), np.float32)
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:  # at start both are rejected, version 1 serves
        client, registry = srv.client, srv.registry
        assert sorted(registry.models["pendulum"]) == [1]
        for version, message in ((5, "onnxruntime cannot load it"), (6, "no 'batchrl.manifest' metadata")):
            with pytest.raises(grpc.RpcError) as info:
                client.load_model("pendulum", version, token=TOKEN)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details() and f"pendulum/{version}/model.onnx" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.load_model("pendulum", token=TOKEN)  # all or nothing
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.act("pendulum", obs).shape == (2, 1)
        assert client.stub.Act(policy_pb2.ActRequest(model="pendulum", observations=encode(obs))).version == 1
        assert registry.poll() == []  # a rejected file is not retried until it changes


def test_a_session_keeps_its_version_across_a_swap_and_unload(dt_repository, tmp_path):
    repo = tmp_path / "models"
    install(repo, "dt", 1, dt_repository / "dt-a" / "1" / "model.onnx")
    obs = np.zeros(3, np.float32)
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client, registry = srv.client, srv.registry
        old = client.open_session("dt", target_return=-300.0).session_id
        first = client.stub.Step(policy_pb2.StepRequest(session_id=old, observation=encode(obs)))
        install(repo, "dt", 2, dt_repository / "dt-b" / "1" / "model.onnx")
        client.load_model("dt", token=TOKEN)
        fresh = client.open_session("dt", target_return=-300.0)
        assert fresh.version == 2
        step = client.stub.Step(policy_pb2.StepRequest(session_id=old, observation=encode(obs), reward=-1.0))
        assert first.version == step.version == 1
        v1 = registry.get("dt", 1)
        out = client.unload_model("dt", token=TOKEN)
        assert sorted(out.unloaded_versions) == [1, 2] and sorted(out.pinned_versions) == [1, 2]
        with pytest.raises(grpc.RpcError) as info:
            client.open_session("dt")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # the unloaded version still answers its open session, the same as before
        again = client.stub.Step(policy_pb2.StepRequest(session_id=old, observation=encode(obs), reward=-1.0))
        assert again.version == 1 and v1.retired and v1.pins == 1
        client.close_session(old)
        assert v1.pins == 0


def test_model_control_needs_the_admin_token(repo):
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client = srv.client
        for token, message in ((None, "authorization: Bearer"), ("wrong", "not the server's admin token")):
            for call in (lambda: client.load_model("pendulum", token=token),
                         lambda: client.unload_model("pendulum", token=token)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in info.value.details()
        assert client.act("pendulum", np.ones((1, 3), np.float32)).shape == (1, 1)  # nothing was unloaded
    with running(repo, ServerOptions(admin_token=None)) as srv:
        client = srv.client
        with pytest.raises(grpc.RpcError) as info:
            client.unload_model("pendulum", token=TOKEN)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "disabled" in info.value.details()


def test_names_and_versions_cannot_leave_the_repository(repo, tmp_path):
    outside = tmp_path / "outside"
    install(outside, "evil", 1, repo / "pendulum" / "1" / "model.onnx")
    (repo / "link").symlink_to(outside / "evil")
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client, registry = srv.client, srv.registry
        assert "link" not in registry.models  # the symlinked folder was refused at start
        for name in ("../outside/evil", "..", "a/b", "/etc", ".hidden", "", "link"):
            with pytest.raises(grpc.RpcError) as info:
                client.load_model(name, token=TOKEN)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "invalid" in info.value.details() or "outside the repository" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.load_model("pendulum", -1, token=TOKEN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "positive" in info.value.details()


def test_per_model_config_sets_batching_and_bad_config_is_rejected(repo):
    (repo / "pendulum" / "config.json").write_text('{"max_batch_size": 8, "threads": 2}')
    registry = Registry.open(repo, ["CPUExecutionProvider"])
    assert registry.get("pendulum").batcher.max_rows == 8
    (repo / "pendulum" / "config.json").write_text('{"max_batch": 8}')
    with pytest.raises(InvalidArgument, match="unknown settings \\['max_batch'\\]"):
        Registry(repo, registry.defaults).load_model("pendulum")


def test_models_command_lists_loads_and_unloads(repo, repository, capsys, monkeypatch):
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client = srv.client
        assert cli(["models", "list", "--server", srv.address]) == 0
        assert "* pendulum version 1: iql" in capsys.readouterr().out
        install(repo, "pendulum", 2, repository / "pendulum" / "2" / "model.onnx")
        assert cli(["models", "load", "pendulum", "--server", srv.address]) == 1  # no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("BATCHRL_ADMIN_TOKEN", TOKEN)
        assert cli(["models", "load", "pendulum", "--server", srv.address]) == 0
        assert "loaded [2]; serving versions [1, 2] (default 2)" in capsys.readouterr().out
        assert cli(["models", "unload", "pendulum", "--server", srv.address]) == 0
        assert "unloaded versions [1, 2]" in capsys.readouterr().out
        assert client.list_models() == []


def test_a_full_queue_answers_resource_exhausted(repo):
    from batchrl.serving.batcher import BatchLimits

    codes = []
    big = np.random.default_rng(0).normal(size=(65_536, 3)).astype(np.float32)
    with running(repo, limits=BatchLimits(max_rows=65_536, max_queue=1)) as srv:
        def call():
            try:
                srv.client.act("pendulum", big)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "queued" in exc.details()

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
