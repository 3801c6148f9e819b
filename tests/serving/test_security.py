"""TLS and mutual TLS, the per-client request limit, the message size limit, and a fuzz run of
malformed requests during which valid traffic keeps succeeding."""
import threading

import grpc
import numpy as np
import pytest
import trustme

from protos.batchrl.v1 import policy_pb2, policy_pb2_grpc
from serving.client import PolicyClient
from serving.server import ServerOptions
from tests.serving.running import running


def works(client):
    try:
        client.wait_ready(timeout=3)
        return client.act("pendulum", np.ones((1, 3), np.float32)).shape == (1, 1)
    except (grpc.RpcError, grpc.FutureTimeoutError):
        return False


def write(tmp_path, name, blob):
    path = tmp_path / name
    blob.write_to_path(str(path))
    return str(path)


def test_tls_and_mutual_tls(repository, tmp_path):
    ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = write(tmp_path, "cert.pem", server_cert.cert_chain_pems[0]), write(tmp_path, "key.pem",
                                                                                   server_cert.private_key_pem)
    trusted = ca.cert_pem.bytes()
    with running(repository, ServerOptions(tls_cert=cert, tls_key=key), connect=False) as srv:
        with PolicyClient(srv.address) as plain:
            assert not works(plain)  # plaintext is refused
        with PolicyClient(srv.address, tls_ca=trusted) as secure:
            assert works(secure)
    with running(repository, ServerOptions(tls_cert=cert, tls_key=key,
                                           client_ca=write(tmp_path, "client-ca.pem", client_ca.cert_pem)),
                 connect=False) as srv:
        with PolicyClient(srv.address, tls_ca=trusted) as anonymous:
            assert not works(anonymous)  # no client certificate
        for issuer, accepted in ((client_ca, True), (stranger, False)):
            mine = issuer.issue_cert("controller-7")
            with PolicyClient(srv.address, tls_ca=trusted, client_cert=mine.cert_chain_pems[0].bytes(),
                              client_key=mine.private_key_pem.bytes()) as client:
                assert works(client) is accepted
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerOptions(tls_cert=cert).credentials()


def test_per_client_limit_bounds_one_client_not_the_others(repository):
    big = np.random.default_rng(0).normal(size=(65_536, 3)).astype(np.float32)
    with running(repository, ServerOptions(per_client_limit=2), connect=False) as srv:
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(srv.address))
        request = policy_pb2.ActRequest(model="pendulum", observations=policy_pb2.Tensor(shape=big.shape,
                                                                                          data=big.tobytes()))
        codes, other = [], []
        start = threading.Barrier(9)

        def greedy():
            start.wait()
            try:
                stub.Act(request, metadata=(("authorization", "Bearer client-a"),), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "per-client limit" in exc.details()

        threads = [threading.Thread(target=greedy) for _ in range(8)]
        for t in threads:
            t.start()
        start.wait()
        other.append(stub.Act(request, metadata=(("authorization", "Bearer client-b"),), timeout=30).version)
        for t in threads:
            t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert other == [2]


def malformed_requests(rng, n):
    """ActRequests, StepRequests and OpenSessionRequests that must all be refused cleanly."""
    def tensor(shape, values=None, extra_bytes=0):
        size = int(np.prod(shape)) if len(shape) else 1
        data = (values if values is not None else rng.normal(size=size)).astype("<f4").tobytes()
        return policy_pb2.Tensor(shape=shape, data=data + b"\0" * extra_bytes)

    kinds = []
    for i in range(n):
        kind = i % 12
        if kind == 0:    # wrong shape
            dims = list(rng.integers(0, 5, size=rng.integers(0, 4)))
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor(dims)))
            if len(dims) == 2 and dims[0] > 0 and dims[1] == 3:
                continue  # happens to be valid
        elif kind == 1:  # NaN / Inf
            values = rng.normal(size=6)
            values[rng.integers(6)] = rng.choice([np.nan, np.inf, -np.inf])
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([2, 3], values)))
        elif kind == 2:  # empty batch
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([0, 3], np.zeros(0))))
        elif kind == 3:  # byte count does not match the shape
            req = ("Act", policy_pb2.ActRequest(model="pendulum",
                                                observations=tensor([2, 3], extra_bytes=int(rng.integers(1, 9)))))
        elif kind == 4:  # no observations at all
            req = ("Act", policy_pb2.ActRequest(model="pendulum"))
        elif kind == 5:  # unknown model names, including ones that try to escape
            name = rng.choice(["", "nope", "../pendulum", "pendulum/1", "\x00", "p" * 300])
            req = ("Act", policy_pb2.ActRequest(model=str(name), observations=tensor([1, 3])))
        elif kind == 6:  # unknown or negative versions
            req = ("Act", policy_pb2.ActRequest(model="pendulum", version=int(rng.choice([-5, 0, 3, 2**40])),
                                                observations=tensor([1, 3])))
        elif kind == 7:  # oversized batch
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([65_537, 3])))
        elif kind == 8:  # negative dimensions
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=policy_pb2.Tensor(shape=[-1, 3])))
        elif kind == 9:  # unknown sessions
            req = ("Step", policy_pb2.StepRequest(session_id=str(rng.integers(1e9)), observation=tensor([3])))
        elif kind == 10:  # sessions on a feed-forward model, bad targets
            req = ("OpenSession", policy_pb2.OpenSessionRequest(model="pendulum"))
        else:  # noisy sampling settings
            req = ("Act", policy_pb2.ActRequest(model="pendulum", observations=tensor([1, 3]),
                                                sampling=policy_pb2.Sampling(noise_std=float(rng.choice(
                                                    [-1.0, np.nan, np.inf])))))
        kinds.append(req)
    return kinds


def test_fuzz_never_crashes_the_server_and_valid_traffic_keeps_working(repository):
    refused = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
    rng = np.random.default_rng(0)
    requests = malformed_requests(rng, 1300)
    assert len(requests) >= 1000
    with running(repository, ServerOptions(max_message_bytes=1 << 20), connect=False) as srv:
        channel = grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 8 << 20)])
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        valid, stop = [], threading.Event()

        def steady():
            obs = np.ones((2, 3), np.float32)
            with PolicyClient(srv.address) as client:
                while not stop.is_set():
                    valid.append(client.act("pendulum", obs).shape)

        steady_thread = threading.Thread(target=steady)
        steady_thread.start()
        got = []
        try:
            for rpc, request in requests:
                try:
                    getattr(stub, rpc)(request, timeout=10)
                    got.append((rpc, "OK", request))
                except grpc.RpcError as exc:
                    got.append((rpc, exc.code(), exc.details()))
            raw = channel.unary_unary("/batchrl.v1.PolicyService/Act")  # bytes that are not a message
            for blob in (b"\xff" * 17, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
                with pytest.raises(grpc.RpcError):
                    raw(blob, timeout=10)
            with pytest.raises(grpc.RpcError) as info:  # over the server's message size limit
                stub.Act(policy_pb2.ActRequest(model="pendulum", observations=policy_pb2.Tensor(
                    shape=[200_000, 3], data=bytes(2_400_000))), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            stop.set()
            steady_thread.join()
        with PolicyClient(srv.address) as client:
            assert works(client)  # still up
    unexpected = [g for g in got if g[1] not in refused]
    assert not unexpected, unexpected[:5]
    assert len(valid) > 50 and set(valid) == {(2, 1)}
