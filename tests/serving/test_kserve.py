"""tritonclient.grpc against the real server: the Open Inference Protocol beside batchrl's own API."""
import shutil

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc
from tritonclient.utils import InferenceServerException

from batchrl.protos.batchrl.v1 import policy_pb2  # noqa: F401 - both sets of generated modules in one process
from batchrl.serving.server import ServerOptions
from tests.serving.running import running

TOKEN = "kserve-admin"


@pytest.fixture
def repo(dt_repository, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(dt_repository, root)
    return root


@pytest.fixture(scope="module")
def kserve_stub(dt_repository):
    with running(dt_repository) as srv:
        yield kv_grpc.GRPCInferenceServiceStub(srv.client.channel)


def infer_observations(client, model, obs, **kwargs):
    tensor = triton.InferInput("observations", list(obs.shape), "FP32")
    tensor.set_data_from_numpy(obs)
    return client.infer(model, [tensor], **kwargs)


def test_metadata_config_and_readiness(repo):
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client = triton.InferenceServerClient(srv.address)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("pendulum") and client.is_model_ready("pendulum", "1")
        assert not client.is_model_ready("pendulum", "9") and not client.is_model_ready("nope")
        meta = client.get_server_metadata()
        assert meta.name == "batchrl" and {"model_repository", "sequence"} <= set(meta.extensions)
        model = client.get_model_metadata("pendulum")
        assert model.platform == "onnxruntime_onnx" and list(model.versions) == ["1", "2"]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("observations", "FP32", [-1, 3])]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("actions", "FP32", [-1, 1])]
        config = client.get_model_config("pendulum").config
        assert config.max_batch_size == 1024 and list(config.input[0].dims) == [3]
        assert not config.HasField("sequence_batching")
        dt = client.get_model_config("dt-a").config
        assert dt.HasField("sequence_batching") and dt.sequence_batching.max_sequence_idle_microseconds == 300_000_000
        assert [i.name for i in dt.input] == ["observation", "reward"] and dt.output[0].name == "action"


def test_model_infer_equals_act(repo):
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with running(repo) as srv:
        client = triton.InferenceServerClient(srv.address)
        served = infer_observations(client, "pendulum", obs)
        np.testing.assert_array_equal(served.as_numpy("actions"), srv.client.act("pendulum", obs))
        assert served.get_response().model_version == "2"
        older = infer_observations(client, "pendulum", obs, model_version="1")
        np.testing.assert_array_equal(older.as_numpy("actions"), srv.client.act("pendulum", obs, version=1))
        # typed contents instead of raw bytes give the same answer, and the answer is always raw
        stub = kv_grpc.GRPCInferenceServiceStub(srv.client.channel)
        typed = kv.ModelInferRequest(model_name="pendulum", inputs=[kv.ModelInferRequest.InferInputTensor(
            name="observations", datatype="FP32", shape=[5, 3],
            contents=kv.InferTensorContents(fp32_contents=obs.reshape(-1).tolist()))])
        answer = stub.ModelInfer(typed)
        assert len(answer.raw_output_contents) == 1 and answer.outputs[0].shape == [5, 1]
        np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(5, 1),
                                      served.as_numpy("actions"))


def step_inputs(obs, reward):
    o = triton.InferInput("observation", [1, 3], "FP32")
    o.set_data_from_numpy(obs.reshape(1, 3).astype(np.float32))
    inputs = [o]
    if reward is not None:
        r = triton.InferInput("reward", [1, 1], "FP32")
        r.set_data_from_numpy(np.array([[reward]], np.float32))
        inputs.append(r)
    return inputs


def test_a_decision_transformer_episode_over_sequence_id_equals_batchrl_sessions(repo, session_store):
    rng = np.random.default_rng(3)
    observations = rng.normal(size=(12, 3)).astype(np.float32)
    # float32-exact rewards: the Triton reward input is FP32, batchrl's is a double
    rewards = rng.normal(size=12).astype(np.float32).astype(np.float64)
    with running(repo, sessions=session_store) as srv:
        session = srv.client.open_session("dt-a", target_return=-250.0).session_id
        native = [srv.client.step(session, observations[0], index=0)]
        native += [srv.client.step(session, observations[t], float(rewards[t - 1]), index=t) for t in range(1, 12)]
        srv.client.close_session(session)
        client = triton.InferenceServerClient(srv.address)
        served = []
        for t in range(12):
            inputs = step_inputs(observations[t], None if t == 0 else rewards[t - 1])
            result = client.infer("dt-a", inputs, sequence_id="episode-7", sequence_start=t == 0,
                                  sequence_end=t == 11, parameters={"target_return": -250.0, "step_index": t})
            served.append(result.as_numpy("action")[0])
            if t == 5:  # a retried step (same step_index) is answered again, not appended twice
                again = client.infer("dt-a", inputs, sequence_id="episode-7", parameters={"step_index": t})
                np.testing.assert_array_equal(again.as_numpy("action")[0], served[-1])
        assert len(srv.sessions) == 0  # sequence_end closed the session
        np.testing.assert_array_equal(np.stack(served), np.stack(native))
        with pytest.raises(InferenceServerException) as info:  # unknown sequence without the start flag
            client.infer("dt-a", step_inputs(observations[0], 0.0), sequence_id=99)
        assert "StatusCode.INVALID_ARGUMENT" in info.value.status() and "sequence_start" in info.value.message()


def test_repository_extension_load_and_unload_need_the_token(repo):
    with running(repo, ServerOptions(admin_token=TOKEN)) as srv:
        client = triton.InferenceServerClient(srv.address)
        index = {(m.name, m.state) for m in client.get_model_repository_index().models}
        assert ("pendulum", "READY") in index and ("dt-a", "READY") in index
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("pendulum")
        assert "UNAUTHENTICATED" in info.value.status()
        assert client.is_model_ready("pendulum")
        auth = {"authorization": f"Bearer {TOKEN}"}
        client.unload_model("pendulum", headers=auth)
        assert not client.is_model_ready("pendulum")
        # the unloaded folder is shown to the admin token only (item 11 of the security issue)
        assert "pendulum" not in {m.name for m in client.get_model_repository_index().models}
        assert ("pendulum", "UNAVAILABLE") in {(m.name, m.state)
                                               for m in client.get_model_repository_index(headers=auth).models}
        with pytest.raises(InferenceServerException) as info:
            client.load_model("pendulum", headers={"authorization": "Bearer wrong"})
        assert "UNAUTHENTICATED" in info.value.status()
        client.load_model("pendulum", headers=auth)
        assert client.is_model_ready("pendulum")


@pytest.mark.parametrize("label, mutate, code, message", [
    ("wrong datatype", lambda r: setattr(r.inputs[0], "datatype", "INT32"), grpc.StatusCode.INVALID_ARGUMENT,
     "datatype 'INT32'"),
    ("wrong shape", lambda r: r.inputs[0].shape.__setitem__(1, 4), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("byte count", lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), grpc.StatusCode.INVALID_ARGUMENT,
     "7 bytes"),
    ("unknown model", lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "not loaded"),
    ("unknown version", lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no version 7"),
    ("bad version", lambda r: setattr(r, "model_version", "latest"), grpc.StatusCode.INVALID_ARGUMENT,
     "positive integer"),
    ("wrong input name", lambda r: setattr(r.inputs[0], "name", "obs"), grpc.StatusCode.INVALID_ARGUMENT,
     "'observations'"),
    ("NaN", lambda r: r.raw_input_contents.__setitem__(0, np.full(6, np.nan, np.float32).tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ("no data", lambda r: r.ClearField("raw_input_contents"), grpc.StatusCode.INVALID_ARGUMENT, "no data"),
])
def test_malformed_model_infer_is_refused_clearly(kserve_stub, label, mutate, code, message):
    obs = np.ones((2, 3), np.float32)
    request = kv.ModelInferRequest(model_name="pendulum", inputs=[kv.ModelInferRequest.InferInputTensor(
        name="observations", datatype="FP32", shape=[2, 3])], raw_input_contents=[obs.tobytes()])
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelInfer(request)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details(), info.value.details()
