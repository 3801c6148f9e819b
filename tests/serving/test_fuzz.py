"""A fuzz run against a spawned `batchrl serve`: malformed requests of every protocol on the port
(batchrl's unary calls, Episode streams, the Open Inference Protocol, bytes that are no message),
each refused with a client-error status, while valid feed-forward and Decision Transformer traffic
runs alongside without one failure."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc

from tests.serving.blackbox import policy_pb2, serving

REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.OUT_OF_RANGE}
OBS_DIM = 3  # pendulum and the dt-* models


def tensor(shape, rng=None, values=None, extra_bytes=0) -> policy_pb2.Tensor:
    size = int(np.prod(shape)) if len(shape) else 1
    data = (values if values is not None else rng.normal(size=size)).astype("<f4").tobytes()
    return policy_pb2.Tensor(shape=shape, data=data + b"\0" * extra_bytes)


def unary_cases(rng, n):
    """(rpc, request) pairs of batchrl's unary calls that must all be refused."""
    cases = []
    for i in range(n):
        kind = i % 16
        if kind == 0:    # wrong shape
            dims = [int(d) for d in rng.integers(0, 5, size=rng.integers(0, 4))]
            if len(dims) == 2 and dims[0] > 0 and dims[1] == OBS_DIM:
                continue  # happens to be valid
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor(dims, rng)))
        elif kind == 1:  # NaN / Inf
            values = rng.normal(size=6)
            values[rng.integers(6)] = rng.choice([np.nan, np.inf, -np.inf])
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([2, 3], values=values)))
        elif kind == 2:  # finite, but so large that the policy's action is not
            values = rng.choice([3.4e38, -3.4e38], size=6)
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([2, 3], values=values)))
        elif kind == 3:  # byte count does not match the shape
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor(
                [2, 3], rng, extra_bytes=int(rng.integers(1, 9)))))
        elif kind == 4:  # no observations at all, or an empty batch
            case = ("Act", policy_pb2.ActRequest(model="pendulum") if i % 32 < 16 else
                    policy_pb2.ActRequest(model="pendulum", observations=tensor([0, 3], values=np.zeros(0))))
        elif kind == 5:  # unknown, escaping and very long model names
            name = str(rng.choice(["", "nope", "../pendulum", "pendulum/1", "\x00", "p" * 300, "q" * 16_384]))
            case = ("Act", policy_pb2.ActRequest(model=name, observations=tensor([1, 3], rng)))
        elif kind == 6:  # unknown or negative versions
            case = ("Act", policy_pb2.ActRequest(model="pendulum", version=int(rng.choice([-5, 0, 3, 2**40])),
                                                 observations=tensor([1, 3], rng)))
        elif kind == 7:  # oversized batch, shapes whose product overflows int64
            shape = [[65_537, 3], [2**62, 4], [2**40, 2**40, 2**40], [-1, 3]][int(rng.integers(4))]
            observations = (tensor(shape, rng) if shape[0] == 65_537 else policy_pb2.Tensor(shape=shape))
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=observations))
        elif kind == 8:  # unknown and very long session ids
            session = str(rng.choice([str(rng.integers(1e9)), "", "s" * 16_384]))
            case = ("Step", policy_pb2.StepRequest(session_id=session, observation=tensor([3], rng)))
        elif kind == 9:  # a target return for a feed-forward model's session; Act on a sequence model
            case = (("OpenSession", policy_pb2.OpenSessionRequest(model="pendulum", target_return=1.0)) if i % 32 < 16 else
                    ("Act", policy_pb2.ActRequest(model="dt-a", observations=tensor([1, 3], rng))))
        elif kind == 10:  # target returns that are not finite in float32
            target = float(rng.choice([np.nan, np.inf, 1e300, -1e39]))
            case = ("OpenSession", policy_pb2.OpenSessionRequest(model="dt-a", target_return=target))
        elif kind == 11:  # closing what is not open; an episode's end that is not one
            case = ("CloseSession", policy_pb2.CloseSessionRequest(session_id=str(rng.choice(["", "x" * 9000])))
                    if i % 32 < 16 else policy_pb2.CloseSessionRequest(
                        session_id="x", final_observation=tensor([3], rng), ending=int(rng.choice([0, 7, -1]))))
        else:            # noisy sampling settings
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([1, 3], rng),
                                                 sampling=policy_pb2.Sampling(noise_std=float(rng.choice(
                                                     [-1.0, np.nan, np.inf])))))
        cases.append(case)
    return cases


def episode_cases(rng, n):
    """Episode streams (lists of messages or raw bytes) that must end with a refusal."""
    open_dt = policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a"))

    def step(values=None, reward=None, session_id="", shape=(3,)):
        request = policy_pb2.StepRequest(session_id=session_id, observation=tensor(list(shape), rng, values))
        if reward is not None:
            request.reward = reward
        return policy_pb2.EpisodeRequest(step=request)

    cases = []
    for i in range(n):
        kind = i % 9
        if kind == 0:
            cases.append([b"\xff" * int(rng.integers(1, 40))] * int(rng.integers(1, 6)))  # no messages at all
        elif kind == 1:
            cases.append([open_dt.SerializeToString(), step().SerializeToString(), bytes(range(256))])
        elif kind == 2:
            cases.append([policy_pb2.EpisodeRequest()])                     # neither open nor step
        elif kind == 3:
            cases.append([step()])                                          # step before open, no session id
        elif kind == 4:
            cases.append([step(session_id=str(rng.choice(["nope", "z" * 16_384])))])  # attach to nothing
        elif kind == 5:
            cases.append([policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="pendulum",
                                                                                       target_return=5.0))])
        elif kind == 6:
            cases.append([open_dt, open_dt])                                # two episodes on one stream
        elif kind == 7:
            cases.append([open_dt, step(shape=(4,))])                       # wrong observation shape
        else:
            reward = float(rng.choice([np.nan, 1e39, -np.inf]))
            cases.append([open_dt, step(), step(reward=reward)])            # rewards past float32
    return cases


def kserve_cases(rng, n):
    """ModelInfer requests that must be refused."""
    cases = []
    for i in range(n):
        kind = i % 8
        request = kv.ModelInferRequest(model_name="pendulum")
        if kind == 0:
            request.inputs.add(name="observations", datatype="FP64", shape=[1, 3])
            request.raw_input_contents.append(bytes(24))
        elif kind == 1:
            request.inputs.add(name="observations", datatype="FP32", shape=[2**62, 4])
            request.raw_input_contents.append(b"")
        elif kind == 2:
            request.inputs.add(name="observations", datatype="FP32", shape=[1, 3])
            request.raw_input_contents.extend([bytes(12), bytes(12)])
        elif kind == 3:
            request.model_name = str(rng.choice(["nope", "m" * 16_384]))
        elif kind == 4:
            request.model_version = str(rng.choice(["-1", "abc", "²", "99999999999999999999"]))
        else:  # the sequence extension
            request.model_name = "dt-a"
            request.inputs.add(name="observation", datatype="FP32", shape=[1, 3])
            request.raw_input_contents.append(np.zeros(3, "<f4").tobytes())
            params = request.parameters
            if kind == 5:
                params["sequence_id"].string_param = "i" * int(rng.choice([129, 100_000]))
                params["sequence_start"].bool_param = True
            elif kind == 6:
                params["sequence_id"].string_param = "fuzz"
                params["sequence_start"].bool_param = True
                if i % 16 < 8:
                    params["target_return"].string_param = "high"
                else:
                    params["target_return"].double_param = float(rng.choice([1e300, np.nan]))
            else:
                params["sequence_id"].bool_param = True
        cases.append(request)
    return cases


def test_fuzz_never_crashes_the_server_and_valid_traffic_keeps_working(dt_repository):
    rng = np.random.default_rng(0)
    unary, streams, oip = unary_cases(rng, 1300), episode_cases(rng, 180), kserve_cases(rng, 240)
    assert len(unary) >= 1000
    with serving(dt_repository, "--max-message-mb", "1") as srv:
        channel = srv.channel(("grpc.max_send_message_length", 8 << 20))
        stub, kserve = srv.policy(channel), kv_grpc.GRPCInferenceServiceStub(channel)
        raw_episode = channel.stream_stream("/batchrl.v1.PolicyService/Episode")
        valid, failures, stop = [], [], threading.Event()

        def steady_act():
            request = policy_pb2.ActRequest(model="pendulum", observations=tensor([2, 3], rng))
            own = srv.policy()
            while not stop.is_set():
                try:
                    valid.append(tuple(own.Act(request, timeout=10).actions.shape))
                except grpc.RpcError as exc:
                    failures.append(("Act", exc.code(), exc.details()))

        def steady_episodes():
            own = srv.policy()
            obs = policy_pb2.Tensor(shape=[3], data=np.zeros(3, "<f4").tobytes())
            while not stop.is_set():
                messages = [policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a"))]
                messages += [policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(
                    observation=obs, **({"reward": -1.0} if t else {}))) for t in range(20)]
                try:
                    answers = list(own.Episode(iter(messages), timeout=30))
                    valid.append(("episode", [a.step.timestep for a in answers[1:]] == list(range(20))))
                except grpc.RpcError as exc:
                    failures.append(("Episode", exc.code(), exc.details()))

        threads = [threading.Thread(target=steady_act), threading.Thread(target=steady_episodes)]
        for t in threads:
            t.start()
        got = []
        try:
            for rpc, request in unary:
                try:
                    getattr(stub, rpc)(request, timeout=10)
                    got.append((rpc, "OK", request))
                except grpc.RpcError as exc:
                    got.append((rpc, exc.code(), exc.details()))
            for messages in streams:
                serialized = [m if isinstance(m, bytes) else m.SerializeToString() for m in messages]
                try:
                    list(raw_episode(iter(serialized), timeout=10))
                    got.append(("Episode", "OK", messages))
                except grpc.RpcError as exc:
                    got.append(("Episode", exc.code(), exc.details()))
            for request in oip:
                try:
                    kserve.ModelInfer(request, timeout=10)
                    got.append(("ModelInfer", "OK", request))
                except grpc.RpcError as exc:
                    got.append(("ModelInfer", exc.code(), exc.details()))
            for method in ("/batchrl.v1.PolicyService/Act", "/inference.GRPCInferenceService/ModelInfer",
                           "/batchrl.v1.PolicyService/OpenSession"):  # bytes that are not a message
                raw = channel.unary_unary(method)
                for blob in (b"\xff" * 17, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
                    try:
                        raw(blob, timeout=10)
                        got.append((method, "OK", blob))
                    except grpc.RpcError as exc:
                        got.append((method, exc.code(), exc.details()))
            with pytest.raises(grpc.RpcError) as info:  # over the server's message size limit
                stub.Act(policy_pb2.ActRequest(model="pendulum", observations=policy_pb2.Tensor(
                    shape=[200_000, 3], data=bytes(2_400_000))), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert srv.policy().Act(policy_pb2.ActRequest(model="pendulum", observations=tensor([1, 3], rng)),
                                timeout=5).actions.shape == [1, 1]  # still up
        assert srv.proc.poll() is None and "Traceback" not in srv.log, srv.log[-3000:]
    unexpected = [g for g in got if g[1] not in REFUSED]
    assert not unexpected, unexpected[:5]
    assert not failures, failures[:5]
    assert valid.count((2, 1)) > 50 and valid.count(("episode", True)) > 5
    assert set(valid) == {(2, 1), ("episode", True)}


def wire_limit_cases(rng, n, session_id: str):
    """(rpc, request) pairs past what the wire's values can be read as (issue 31): shapes deeper than
    numpy's 64 dimensions on every call that takes a tensor (Step on ``session_id``, an open session),
    and versions of thousands of digits, or past int64, on every call that names one."""
    huge = lambda: str(rng.choice(["9" * 5_000, "1" * 100_000, "9223372036854775808"]))  # noqa: E731
    cases = []
    for i in range(n):
        kind, deep = i % 7, [1] * int(rng.integers(33, 200))
        if kind == 0:
            case = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor(deep, rng)))
        elif kind == 1:
            case = ("Step", policy_pb2.StepRequest(session_id=session_id, observation=tensor(deep, rng)))
        elif kind in (2, 3):  # a feed-forward model's input, a sequence's start
            request = kv.ModelInferRequest(model_name="pendulum" if kind == 2 else "dt-a")
            request.inputs.add(name="observations" if kind == 2 else "observation", datatype="FP32", shape=deep)
            request.raw_input_contents.append(bytes(4))
            if kind == 3:
                request.parameters["sequence_id"].string_param = f"deep-{i}"
                request.parameters["sequence_start"].bool_param = True
            case = ("ModelInfer", request)
        elif kind == 4:
            request = kv.ModelInferRequest(model_name="pendulum", model_version=huge())
            request.inputs.add(name="observations", datatype="FP32", shape=[1, 3])
            request.raw_input_contents.append(bytes(12))
            case = ("ModelInfer", request)
        elif kind == 5:
            case = (("ModelMetadata", kv.ModelMetadataRequest(name="pendulum", version=huge())) if i % 14 < 7 else
                    ("ModelConfig", kv.ModelConfigRequest(name="dt-a", version=huge())))
        else:
            case = ("ModelReady", kv.ModelReadyRequest(name="pendulum", version=huge()))
        cases.append(case)
    return cases


def test_fuzz_deep_tensors_and_huge_versions_beside_valid_traffic(dt_repository):
    rng = np.random.default_rng(1)
    with serving(dt_repository) as srv:
        channel = srv.channel()
        stub, kserve = srv.policy(channel), kv_grpc.GRPCInferenceServiceStub(channel)
        session = stub.OpenSession(policy_pb2.OpenSessionRequest(model="dt-a"), timeout=10).session_id
        cases = wire_limit_cases(rng, 420, session)
        valid, failures, stop = [], [], threading.Event()

        def steady():  # feed-forward and sequence traffic, alternating, on a channel of its own
            own = srv.policy()
            act = policy_pb2.ActRequest(model="pendulum", observations=tensor([2, 3], rng))
            obs = policy_pb2.Tensor(shape=[3], data=np.zeros(3, "<f4").tobytes())
            while not stop.is_set():
                try:
                    valid.append(tuple(own.Act(act, timeout=10).actions.shape))
                    messages = [policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a"))]
                    messages += [policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(
                        observation=obs, **({"reward": -1.0} if t else {}))) for t in range(5)]
                    answers = list(own.Episode(iter(messages), timeout=30))
                    valid.append(("episode", [a.step.timestep for a in answers[1:]] == list(range(5))))
                except grpc.RpcError as exc:
                    failures.append((exc.code(), exc.details()))

        thread = threading.Thread(target=steady)
        thread.start()
        got = []
        try:
            wait_until(lambda: valid or failures)  # the valid traffic runs before the first bad case
            for rpc, request in cases:
                service = kserve if request.DESCRIPTOR.file.package == "inference" else stub
                try:
                    answer = getattr(service, rpc)(request, timeout=10)
                    got.append((rpc, "ready" if getattr(answer, "ready", False) else "OK", request))
                except grpc.RpcError as exc:
                    got.append((rpc, exc.code(), exc.details()))
            wait_until(lambda: len(valid) >= 20 or failures)  # however fast the bad cases went by
        finally:
            stop.set()
            thread.join()
        step = stub.Step(policy_pb2.StepRequest(session_id=session, observation=tensor([3], rng)), timeout=10)
        assert step.timestep == 0  # the refused deep steps left the session as it was
        assert srv.proc.poll() is None and "Traceback" not in srv.log, srv.log[-3000:]
    unexpected = [g for g in got if g[1] not in REFUSED]
    assert not unexpected, [(rpc, code, str(detail)[:200]) for rpc, code, detail in unexpected[:5]]
    assert {rpc for rpc, _, _ in got} == {"Act", "Step", "ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady"}
    assert not failures, failures[:5]
    assert valid.count((2, 1)) >= 10 and valid.count(("episode", True)) >= 10
    assert set(valid) == {(2, 1), ("episode", True)}


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def sequence_request(sequence: int | str, index: int, start: bool = False, end: bool = False,
                     ending: str | None = None) -> kv.ModelInferRequest:
    """One ModelInfer step of the sequence ``sequence`` of dt-a (a reward of -1 after the start)."""
    request = kv.ModelInferRequest(model_name="dt-a")
    request.inputs.add(name="observation", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.zeros(3, "<f4").tobytes())
    if not start:
        request.inputs.add(name="reward", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.float32(-1.0).tobytes())
    params = request.parameters
    if isinstance(sequence, str):
        params["sequence_id"].string_param = sequence
    else:
        params["sequence_id"].int64_param = sequence
    params["step_index"].int64_param = index
    params["sequence_start"].bool_param, params["sequence_end"].bool_param = start, end
    if ending is not None:
        params["ending"].string_param = ending
    return request


def test_fuzz_sequence_id_collisions_and_damaged_store_records_beside_valid_traffic(dt_repository, redis_url):
    """A second client (another address) starts, steps and ends the sequence ids a first client is using,
    and session records in Redis are damaged in every way of test_sequence_owner.py, while the first
    client's sequences (integer and string ids with the same digits, at once) and Episode streams run
    without one failure."""
    import uuid

    import redis

    from tests.serving.test_sequence_owner import DAMAGE, Relay

    rng, prefix = np.random.default_rng(2), f"batchrl-test:{uuid.uuid4().hex[:12]}:"
    store = redis.Redis.from_url(redis_url)
    with serving(dt_repository, "--session-store", redis_url, "--session-key-prefix", prefix) as srv:
        relay = Relay(srv.port)
        other = grpc.insecure_channel(relay.address)
        intruder = kv_grpc.GRPCInferenceServiceStub(other)
        stub = srv.policy()
        live: dict[type, int | str] = {}  # the id each of the first client's sequence threads is on
        valid, failures, stop = [], [], threading.Event()

        def sequences(kind: type):
            own = kv_grpc.GRPCInferenceServiceStub(srv.channel())
            k = 0
            while not stop.is_set():
                k += 1
                sequence = kind(7000 + k)  # 7001 and "7001" at once: two sequences
                try:
                    for index in range(8):
                        own.ModelInfer(sequence_request(sequence, index, start=index == 0, end=index == 7),
                                       timeout=10)
                        live[kind] = sequence  # started: the intruder may try it now
                    valid.append("sequence")
                except grpc.RpcError as exc:
                    failures.append((sequence, exc.code(), exc.details()))

        def episodes():
            own = srv.policy()
            obs = policy_pb2.Tensor(shape=[3], data=np.zeros(3, "<f4").tobytes())
            while not stop.is_set():
                messages = [policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a"))]
                messages += [policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(
                    observation=obs, **({"reward": -1.0} if t else {}))) for t in range(5)]
                try:
                    answers = list(own.Episode(iter(messages), timeout=30))
                    valid.append(("episode", [a.step.timestep for a in answers[1:]] == list(range(5))))
                except grpc.RpcError as exc:
                    failures.append(("Episode", exc.code(), exc.details()))

        threads = [threading.Thread(target=sequences, args=(int,)), threading.Thread(target=sequences, args=(str,)),
                   threading.Thread(target=episodes)]
        for t in threads:
            t.start()
        collisions, damaged = [], []
        try:
            while len(live) < 2:
                stop.wait(0.01)
            for i in range(240):
                sequence = live[int if i % 2 else str]
                kind = int(rng.integers(3))
                request = (sequence_request(sequence, 0, start=True) if kind == 0 else
                           sequence_request(sequence, int(rng.integers(1, 8))) if kind == 1 else
                           sequence_request(sequence, int(rng.integers(1, 8)), end=True, ending="truncated"))
                try:
                    intruder.ModelInfer(request, timeout=10)
                    collisions.append("OK")
                    if kind == 0:  # the first client's sequence had just ended: the free id is the intruder's
                        intruder.ModelInfer(sequence_request(sequence, 1, end=True), timeout=10)
                except grpc.RpcError as exc:
                    collisions.append(exc.code())
            for damage in [*DAMAGE, *DAMAGE]:
                session = stub.OpenSession(policy_pb2.OpenSessionRequest(model="dt-a"), timeout=10).session_id
                for index in range(int(rng.integers(1, 4))):
                    stub.Step(policy_pb2.StepRequest(session_id=session, observation=tensor([3], rng), index=index,
                                                     **({"reward": -1.0} if index else {})), timeout=10)
                key = f"{prefix}s:{session}"
                DAMAGE[damage](store, key, prefix, store.hgetall(key))
                outcome = []
                for call in (lambda: stub.Step(policy_pb2.StepRequest(session_id=session, observation=tensor(
                                 [3], rng), reward=-1.0, index=int(rng.integers(0, 5))), timeout=10),
                             lambda: stub.CloseSession(policy_pb2.CloseSessionRequest(session_id=session), timeout=10)):
                    try:
                        call()
                        outcome.append("OK")
                    except grpc.RpcError as exc:
                        outcome.append(exc.code() if session in exc.details() else ("unnamed", exc.code()))
                damaged.append((damage, tuple(outcome)))
        finally:
            stop.set()
            for t in threads:
                t.join()
            other.close()
            relay.close()
        assert srv.proc.poll() is None and "Traceback" not in srv.log, srv.log[-3000:]
    for key in store.scan_iter(match=prefix + "*"):
        store.delete(key)
    store.close()
    assert not failures, failures[:5]
    assert valid.count("sequence") > 10 and valid.count(("episode", True)) > 5
    assert set(valid) == {"sequence", ("episode", True)}
    assert set(collisions) <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, "OK"}
    assert collisions.count(grpc.StatusCode.FAILED_PRECONDITION) > 100, collisions
    unexpected = [d for d in damaged if d[1] != (grpc.StatusCode.DATA_LOSS, "OK")]
    assert len(damaged) > 25 and not unexpected, unexpected[:5]
