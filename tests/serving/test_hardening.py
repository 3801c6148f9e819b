"""Black-box regression tests of the server's reliability and security limits: a spawned
`batchrl serve`, raw gRPC calls. Each test here failed on the server before these limits existed."""
from __future__ import annotations

import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc

from tests.serving import blackbox
from tests.serving.blackbox import admin_pb2, admin_pb2_grpc, policy_pb2, serving

MODELS = Path(__file__).resolve().parents[2] / "models"
OBS = np.array([0.5, -0.2, 0.1], np.float32)  # pendulum: 3-dim observations, 1-dim actions


def tensor(array) -> policy_pb2.Tensor:
    array = np.asarray(array, np.float32)
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


def act_request(obs, model="pendulum") -> policy_pb2.ActRequest:
    return policy_pb2.ActRequest(model=model, observations=tensor(obs))


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


class HeldStream:
    """An Episode stream whose client sends ``first`` messages, then nothing until released."""

    def __init__(self, stub, first=(), metadata=()):
        self.release = threading.Event()
        self.call = stub.Episode(self._requests(list(first)), metadata=metadata, timeout=60)

    def _requests(self, first):
        yield from first
        self.release.wait()

    def close(self):
        self.release.set()
        self.call.cancel()


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


# -- 1. idle streams cannot starve the server ----------------------------------------------------
def test_idle_streams_cannot_starve_unary_calls_or_health_and_idle_streams_close(dt_repository):
    threads, cap = 16, 8  # the default cap: grpc threads - 8
    with serving(dt_repository, "--grpc-threads", str(threads), "--stream-idle-timeout", "2", metrics=True) as srv:
        flood = srv.channel()
        stub = srv.policy(flood)
        # one episode opens its session, then its client goes quiet
        quiet = HeldStream(stub, [policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a"))])
        session_id = next(quiet.call).opened.session_id
        streams = [quiet] + [HeldStream(stub) for _ in range(2 * threads - 1)]  # 2 x threads, no credentials
        try:
            deadline = time.monotonic() + 10
            while sum(s.call.done() for s in streams) < 2 * threads - cap and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [s for s in streams if s.call.done()]
            assert len(refused) == 2 * threads - cap
            assert {s.call.code() for s in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "--max-streams" in refused[0].call.details()
            # a second client is answered at once, health included
            with srv.channel() as other:
                started = time.monotonic()
                assert srv.policy(other).Act(act_request([OBS]), timeout=1).actions.shape == [1, 1]
                health = srv.health(other).Check(health_pb2.HealthCheckRequest(), timeout=1)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1.0
            # the held streams are closed once idle for 2 s; the quiet episode's session stays open
            held = [s for s in streams if s not in refused]
            deadline = time.monotonic() + 8
            while not all(s.call.done() for s in held) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert {s.call.code() for s in held} == {grpc.StatusCode.UNAVAILABLE}
            assert "stream idle timeout" in quiet.call.details()
            assert srv.metric("batchrl_streams_closed_idle_total") == cap
            step = srv.policy(flood).Step(policy_pb2.StepRequest(session_id=session_id, observation=tensor(OBS)),
                                          timeout=5)
            assert step.timestep == 0
            # ... and a new stream attaches to it with a step carrying its id
            again = srv.policy(flood).Episode(iter([policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(
                session_id=session_id, observation=tensor(OBS), reward=-1.0))]), timeout=10)
            assert [r.step.timestep for r in again] == [1]
        finally:
            for s in streams:
                s.close()


def test_per_client_identity_is_not_minted_by_tokens_and_health_is_exempt(dt_repository, tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    server_cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    def credentials(name):
        cert = ca.issue_cert(name)
        return grpc.ssl_channel_credentials(ca.cert_pem.bytes(), cert.private_key_pem.bytes(),
                                            cert.cert_chain_pems[0].bytes())

    with serving(dt_repository, "--per-client-limit", "2", "--tls-cert", str(tmp_path / "cert.pem"),
                 "--tls-key", str(tmp_path / "key.pem"), "--client-ca", str(tmp_path / "ca.pem"),
                 credentials=credentials("controller-probe")) as srv:
        a = srv.channel(credentials=credentials("controller-a"))
        streams = []
        try:
            for _ in range(3):  # a new random token per stream must not buy a new quota
                token = (("authorization", f"Bearer {uuid.uuid4().hex}"),)
                streams.append(HeldStream(srv.policy(a), metadata=token))
                time.sleep(0.3)
            assert [s.call.done() for s in streams] == [False, False, True]
            assert streams[2].call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "mtls:controller-a" in streams[2].call.details()
            code, details = code_of(srv.policy(a).Act, act_request([OBS]), timeout=5)  # unary calls count too
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-client limit" in details
            # health is exempt; another client has its own quota
            assert srv.health(a).Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING
            with srv.channel(credentials=credentials("controller-b")) as b:
                assert srv.policy(b).Act(act_request([OBS]), timeout=5).actions.shape == [1, 1]
        finally:
            for s in streams:
                s.close()


# -- 2. sequence ids live and die with their sessions ----------------------------------------------
def infer(model, obs, sequence_id, start=False, end=False, reward=None, **params) -> kv.ModelInferRequest:
    request = kv.ModelInferRequest(model_name=model)
    request.parameters["sequence_id"].string_param = sequence_id
    if start:
        request.parameters["sequence_start"].bool_param = True
    if end:
        request.parameters["sequence_end"].bool_param = True
    for name, value in params.items():
        setattr(request.parameters[name], "double_param" if isinstance(value, float) else "string_param", value)
    request.inputs.add(name="observation", datatype="FP32", shape=[1, len(obs)])
    request.raw_input_contents.append(np.asarray(obs, np.float32).tobytes())
    if reward is not None:
        request.inputs.add(name="reward", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.float32(reward).tobytes())
    return request


def test_sequence_ids_are_length_limited_and_forgotten_with_their_sessions(dt_repository):
    with serving(dt_repository, "--session-timeout", "1", metrics=True) as srv:
        stub = kv_grpc.GRPCInferenceServiceStub(srv.channel(("grpc.max_send_message_length", 1 << 22)))
        code, details = code_of(stub.ModelInfer, infer("dt-a", OBS, "x" * 100_000, start=True), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than 128" in details and len(details) < 300
        before = rss_kib(srv.proc.pid)
        for i in range(300):  # 100 KB ids, never ended: must not pile up in the server
            code_of(stub.ModelInfer, infer("dt-a", OBS, f"{i:06d}" + "x" * 100_000, start=True), timeout=10)
        assert rss_kib(srv.proc.pid) - before < 10_000  # KiB; each id kept would cost 100 KB (30 MB in all)
        for i in range(200):  # short ids, never ended: forgotten when their sessions expire
            stub.ModelInfer(infer("dt-a", OBS, f"episode-{i}", start=True), timeout=10)
        deadline = time.monotonic() + 10
        while srv.metric("batchrl_open_sessions") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.metric("batchrl_open_sessions") == 0
        code, details = code_of(stub.ModelInfer, infer("dt-a", OBS, "episode-7", reward=0.5), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not open" in details


# -- 3. the drain ends, whatever clients do -------------------------------------------------------
def test_drain_ends_after_undecodable_stream_frames_and_idle_streams(dt_repository):
    srv = blackbox.start(dt_repository, "--grace", "1")
    raw = srv.channel().stream_stream("/batchrl.v1.PolicyService/Episode")
    release = threading.Event()

    def garbage():
        for _ in range(5):
            yield b"\xff" * 17
        release.wait()

    def quiet():
        yield policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a")).SerializeToString()
        release.wait()

    bad, held = raw(garbage(), timeout=60), raw(quiet(), timeout=60)
    try:
        next(held)  # the quiet stream's session is open
        with pytest.raises(grpc.RpcError):
            next(bad)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=15) == 0, srv.log
        assert time.monotonic() - started < 1 + 2 + 1  # grace + the drain's bound + process exit
        srv.wait_log(r"closed 1 open stream\(s\) at the end of the grace period")
    finally:
        release.set()
        srv.stop()


def test_drain_exit_status_says_unary_calls_were_cut_off(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "hopper-iql", repo / "hopper-iql")  # 256-256: 65,536 rows take a while
    srv = blackbox.start(repo, "--grace", "0.1", "--max-batch", "65536", metrics=True)
    big = tensor(np.random.default_rng(0).normal(size=(65_536, 11)))
    stub = srv.policy(srv.channel(("grpc.max_send_message_length", 1 << 24),
                                  ("grpc.max_receive_message_length", 1 << 24)))
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(code_of(
        stub.Act, policy_pb2.ActRequest(model="hopper-iql", observations=big), timeout=60)[0])) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while srv.metric("batchrl_requests_in_flight", rpc="Act") < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=15) == 1, srv.log
        for t in threads:
            t.join(timeout=30)
        srv.wait_log(r"unary call\(s\) were still running at the end of the 0\.1 s grace period")
        assert grpc.StatusCode.OK not in codes[-4:]
    finally:
        srv.stop()


# -- 6. a port in use is an error unless sharing is asked for ----------------------------------
def test_second_server_on_a_busy_port_fails_unless_reuse_port(repository):
    with serving(repository) as first:
        second = blackbox.start(repository, "--address", first.address, ready=False)
        try:
            assert second.proc.wait(timeout=30) == 1
        finally:
            second.stop()  # a server that did start (the old behaviour) must not outlive the test
        time.sleep(0.1)
        assert f"cannot listen on {first.address}" in second.log and "Traceback" not in second.log
    with serving(repository, "--reuse-port") as first, \
            serving(repository, "--reuse-port", "--address", first.address) as second:
        assert second.port == first.port


# -- 7-10. inputs that are not finite, overflowing shapes, long names, undecodable bytes -----------
@pytest.fixture(scope="module")
def shared(dt_repository):
    with serving(dt_repository, metrics=True) as srv:
        yield srv


def test_nonfinite_inputs_are_refused_and_nonfinite_actions_never_answered_ok(shared):
    stub = shared.policy()
    huge = np.full((2, 3), 3.4e38, np.float32)
    huge[1] = OBS
    code, details = code_of(stub.Act, act_request(huge), timeout=10)
    assert code == grpc.StatusCode.OUT_OF_RANGE and "'pendulum'" in details and "[0]" in details
    assert shared.metric("batchrl_nonfinite_outputs_total", model="pendulum") >= 1
    # valid requests alongside are answered, finite
    results = []
    threads = [threading.Thread(target=lambda: results.append(code_of(stub.Act, act_request(huge[:1]), timeout=10)[0]))
               for _ in range(8)]
    threads += [threading.Thread(target=lambda: results.append(
        np.isfinite(np.frombuffer(stub.Act(act_request([OBS] * 4), timeout=10).actions.data, "<f4")).all()))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 8 and results.count(grpc.StatusCode.OUT_OF_RANGE) == 8
    # sessions: target returns and rewards past float32's range, named
    code, details = code_of(stub.OpenSession, policy_pb2.OpenSessionRequest(model="dt-a", target_return=1e300),
                            timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "target_return" in details
    session = stub.OpenSession(policy_pb2.OpenSessionRequest(model="dt-a", target_return=-100.0), timeout=10)
    stub.Step(policy_pb2.StepRequest(session_id=session.session_id, observation=tensor(OBS)), timeout=10)
    code, details = code_of(stub.Step, policy_pb2.StepRequest(session_id=session.session_id, observation=tensor(OBS),
                                                              reward=1e39), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reward" in details
    kserve = kv_grpc.GRPCInferenceServiceStub(shared.channel())
    code, details = code_of(kserve.ModelInfer, infer("dt-a", OBS, "s1", start=True, target_return=1e300), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "target return" in details


def test_user_errors_are_invalid_argument_with_short_messages(shared):
    stub, kserve = shared.policy(), kv_grpc.GRPCInferenceServiceStub(shared.channel())
    overflowing = policy_pb2.ActRequest(model="pendulum", observations=policy_pb2.Tensor(shape=[2**62, 4]))
    code, details = code_of(stub.Act, overflowing, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "-" not in details.split("expected", 1)[-1]
    request = kv.ModelInferRequest(model_name="pendulum")
    request.inputs.add(name="observations", datatype="FP32", shape=[2**62, 4])
    request.raw_input_contents.append(b"")
    code, details = code_of(kserve.ModelInfer, request, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(4 * 2**64) in details, details
    code, details = code_of(kserve.ModelInfer, infer("dt-a", OBS, "s2", start=True, target_return="high"), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "target_return" in details
    long = "p" * 16_384
    for call, request in ((stub.Act, act_request([OBS], model=long)),
                          (stub.OpenSession, policy_pb2.OpenSessionRequest(model=long)),
                          (stub.Step, policy_pb2.StepRequest(session_id=long, observation=tensor(OBS))),
                          (stub.CloseSession, policy_pb2.CloseSessionRequest(session_id=long)),
                          (kserve.ModelInfer, kv.ModelInferRequest(model_name=long))):
        code, details = code_of(call, request, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than 128" in details and len(details) < 300


def test_undecodable_requests_are_invalid_argument_logged_in_one_line(shared):
    channel = shared.channel()
    before = shared.metric("batchrl_refused_requests_total", method="/batchrl.v1.PolicyService/Act",
                           reason="undecodable")
    lines_before = len(shared.lines)
    for method in ("/batchrl.v1.PolicyService/Act", "/grpc.health.v1.Health/Check"):
        raw = channel.unary_unary(method)
        for _ in range(100):
            code, details = code_of(raw, b"\xff" * 17, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details
    stream = channel.stream_stream("/batchrl.v1.PolicyService/Episode")(iter([b"\x0a\xff\xff\xff\xff\x0f"]),
                                                                         timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.2)
    new = "".join(shared.lines[lines_before:])
    assert "Traceback" not in new and len(re.findall("undecodable", new)) == 3, new
    assert shared.metric("batchrl_refused_requests_total", method="/batchrl.v1.PolicyService/Act",
                         reason="undecodable") - before == 100
    assert srv_alive(shared)


def srv_alive(srv) -> bool:
    return srv.policy().Act(act_request([OBS]), timeout=5).actions.shape == [1, 1]


# -- 11. optional data-plane token; what an anonymous caller may list -----------------------------
def test_data_plane_token_and_repository_index(dt_repository, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(dt_repository, repo)
    data, admin = "data-t0ken", "admin-t0ken"
    with serving(repo, env={"BATCHRL_DATA_TOKEN": data, "BATCHRL_ADMIN_TOKEN": admin}) as srv:
        stub, kserve = srv.policy(), kv_grpc.GRPCInferenceServiceStub(srv.channel())
        bearer = lambda token: (("authorization", f"Bearer {token}"),)  # noqa: E731
        for metadata in ((), bearer("wrong")):
            assert code_of(stub.Act, act_request([OBS]), metadata=metadata, timeout=5)[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            assert code_of(stub.ListModels, policy_pb2.ListModelsRequest(), metadata=metadata, timeout=5)[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            assert code_of(kserve.ModelInfer, kv.ModelInferRequest(model_name="pendulum"), metadata=metadata,
                           timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED
        for token in (data, admin):
            assert code_of(stub.Act, act_request([OBS]), metadata=bearer(token), timeout=5)[0] == grpc.StatusCode.OK
        assert srv.health().Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert kserve.ServerReady(kv.ServerReadyRequest(), timeout=5).ready
        assert code_of(admin_pb2_grpc.ModelServiceStub(srv.channel()).UnloadModel,
                       admin_pb2.UnloadModelRequest(name="dt-b"), metadata=bearer(data), timeout=5)[0] == \
            grpc.StatusCode.UNAUTHENTICATED  # the data token is not an admin token
        admin_pb2_grpc.ModelServiceStub(srv.channel()).UnloadModel(admin_pb2.UnloadModelRequest(name="dt-b"),
                                                                  metadata=bearer(admin), timeout=5)
        anonymous = {m.name for m in kserve.RepositoryIndex(kv.RepositoryIndexRequest(), timeout=5).models}
        assert anonymous == {"pendulum", "dt-a"}
        full = {(m.name, m.state) for m in kserve.RepositoryIndex(kv.RepositoryIndexRequest(), metadata=bearer(admin),
                                                                   timeout=5).models}
        assert ("dt-b", "UNAVAILABLE") in full
