"""The gRPC server on 127.0.0.1 (ephemeral port): Act, ListModels, health, reflection, bad input."""
import re

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from batchrl.protos.batchrl.v1 import policy_pb2, policy_pb2_grpc
from batchrl.serving.client import PolicyClient
from batchrl.serving.repository import Registry
from batchrl.serving.server import SERVICE_NAME, build_server
from batchrl.serving.tensors import encode


@pytest.fixture(scope="module")
def server(repository):
    registry = Registry.open(repository, ["CPUExecutionProvider"])
    served = build_server(registry, "127.0.0.1:0")
    srv, port = served.server, served.port
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def client(server):
    with PolicyClient(server) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def in_process(repository, version, obs):
    session = ort.InferenceSession(str(repository / "pendulum" / str(version) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(["actions"], {"observations": obs})[0]


def test_act_returns_exactly_what_onnxruntime_returns(client, repository):
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    got = client.act("pendulum", obs)
    assert got.dtype == np.float32 and got.shape == (64, 1)
    np.testing.assert_array_equal(got, in_process(repository, 2, obs))
    np.testing.assert_array_equal(client.act("pendulum", obs, version=1), in_process(repository, 1, obs))


def test_act_reports_the_version_that_answered(stub):
    request = policy_pb2.ActRequest(model="pendulum", observations=encode(np.zeros((1, 3))))
    assert stub.Act(request).version == 2
    request.version = 1
    assert stub.Act(request).version == 1


def test_list_models(client):
    (info,) = client.list_models()
    assert info.name == "pendulum" and info.default_version == 2
    assert [v.version for v in info.versions] == [1, 2]
    manifest = info.versions[1].manifest
    assert manifest.algorithm == "iql" and list(manifest.observation_space.shape) == [3]
    assert list(manifest.action_space.low) == [-2.0] and list(manifest.action_space.high) == [2.0]
    assert list(info.versions[0].providers) == ["CPUExecutionProvider"]


def test_seeded_noise_is_reproducible_and_clipped(client):
    obs = np.zeros((256, 3), np.float32)
    a = client.act("pendulum", obs, noise_std=5.0, seed=7)
    b = client.act("pendulum", obs, noise_std=5.0, seed=7)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -2.0 and a.max() <= 2.0 and len(np.unique(a)) > 10
    assert not np.array_equal(a, client.act("pendulum", obs, noise_std=5.0, seed=8))


def test_health_and_reflection(server):
    with grpc.insecure_channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def raw_request(shape, data: bytes, model="pendulum", **kw):
    return policy_pb2.ActRequest(model=model, observations=policy_pb2.Tensor(shape=shape, data=data), **kw)


def f32(*values):
    return np.asarray(values, dtype="<f4").tobytes()


BAD = [
    ("wrong observation size", raw_request([1, 4], f32(0, 0, 0, 0)), grpc.StatusCode.INVALID_ARGUMENT,
     r"shape \[1, 4\].*expects \[batch, 3\]"),
    ("missing batch axis", raw_request([3], f32(0, 0, 0)), grpc.StatusCode.INVALID_ARGUMENT, r"shape \[3\]"),
    ("NaN", raw_request([2, 3], f32(0, 0, 0, 0, np.nan, 0)), grpc.StatusCode.INVALID_ARGUMENT,
     "finite: row 1, element 1 is nan"),
    ("Inf", raw_request([1, 3], f32(np.inf, 0, 0)), grpc.StatusCode.INVALID_ARGUMENT, "finite: row 0, element 0 is inf"),
    ("empty batch", raw_request([0, 3], b""), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    ("byte count", raw_request([2, 3], f32(0, 0, 0)), grpc.StatusCode.INVALID_ARGUMENT,
     "12 bytes of data for shape \\[2, 3\\] \\(expected 24"),
    ("no observations", policy_pb2.ActRequest(model="pendulum"), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
    ("unknown model", raw_request([1, 3], f32(0, 0, 0), model="nope"), grpc.StatusCode.NOT_FOUND,
     "model 'nope' is not loaded; loaded models: \\['pendulum'\\]"),
    ("unknown version", raw_request([1, 3], f32(0, 0, 0), version=7), grpc.StatusCode.NOT_FOUND,
     "no version 7; loaded versions: \\[1, 2\\]"),
    ("negative noise", raw_request([1, 3], f32(0, 0, 0), sampling=policy_pb2.Sampling(noise_std=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "noise_std must be finite and >= 0"),
]


@pytest.mark.parametrize("label,request_,code,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(stub, label, request_, code, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.Act(request_)
    assert info.value.code() == code
    assert re.search(message, info.value.details()), info.value.details()
    ok = stub.Act(raw_request([1, 3], f32(0.5, 0.5, 0.1)))
    assert ok.actions.shape == [1, 1]


def test_act_stream_answers_equal_act_and_an_error_ends_the_stream(client):
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(1 + i % 3, 3)).astype(np.float32) for i in range(20)]
    with client.act_stream("pendulum") as stream:
        streamed = [stream.act(b) for b in batches]
    for batch, answer in zip(batches, streamed):
        np.testing.assert_array_equal(answer, client.act("pendulum", batch))
    stream = client.act_stream("pendulum")
    stream.act(batches[0])
    with pytest.raises(grpc.RpcError) as info:
        stream.act(np.ones((1, 4), np.float32))  # the wrong observation size
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expects [batch, 3]" in info.value.details()
