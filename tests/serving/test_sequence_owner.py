"""Open Inference Protocol sequence ids belong to the client that started them, and 42 is not "42";
a damaged session record in Redis answers DATA_LOSS naming its session and can still be closed.

Black-box: tritonclient and raw gRPC against a spawned `batchrl serve`, once with the in-process
store and once on a real Redis. The second client has another address through a relay whose
connections to the server come from 127.0.0.2 (grpcio cannot choose a channel's source address).
"""
from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.serving.blackbox import Server, policy_pb2, serving

SESSION_ID = re.compile(r"[0-9a-f]{32}")


class Relay:
    """Forwards connections made to ``address`` (127.0.0.1) to ``port`` on 127.0.0.1, from ``source``:
    the server sees those clients at another address. One thread; ``close`` ends every connection."""

    def __init__(self, port: int, source: str = "127.0.0.2"):
        self._target, self._source = ("127.0.0.1", port), source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                sock = key.fileobj
                if sock is self._listener:
                    client, _ = sock.accept()
                    upstream = socket.create_connection(self._target, source_address=(self._source, 0))
                    peers[client], peers[upstream] = upstream, client
                    for end in (client, upstream):
                        self._selector.register(end, selectors.EVENT_READ)
                    continue
                if sock not in peers:  # its pair closed earlier in this round
                    continue
                try:
                    data = sock.recv(1 << 16)
                    if data:
                        peers[sock].sendall(data)
                        continue
                except OSError:
                    pass
                other = peers.pop(sock)
                del peers[other]
                for end in (sock, other):
                    self._selector.unregister(end)
                    end.close()
        for end in (*peers, self._listener):
            end.close()
        self._selector.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Served:
    server: Server
    relay: Relay            # the second client's way in
    prefix: str | None      # the Redis store's key prefix; None with the in-process store
    redis_url: str | None

    def clients(self) -> tuple[triton.InferenceServerClient, triton.InferenceServerClient]:
        """(client A at 127.0.0.1, client B at 127.0.0.2)"""
        return triton.InferenceServerClient(self.server.address), triton.InferenceServerClient(self.relay.address)

    def conflicts(self, request: str) -> float:
        return self.server.metric("batchrl_sequence_conflicts_total", request=request)


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(request, dt_repository):
    """One server per store kind for the whole module, with its relay."""
    args, prefix, url = [], None, None
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), f"batchrl-test:{uuid.uuid4().hex[:12]}:"
        args = ["--session-store", url, "--session-key-prefix", prefix]
    with serving(dt_repository, *args, metrics=True) as server:
        relay = Relay(server.port)
        try:
            yield Served(server, relay, prefix, url)
        finally:
            relay.close()
    if url is not None:
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def step(client, sequence, index, start=False, end=False, **parameters):
    """The action for one step of ``sequence`` (the start carries no reward, the others -1)."""
    obs = triton.InferInput("observation", [1, 3], "FP32")
    obs.set_data_from_numpy(np.full((1, 3), 0.1 * index, np.float32))
    inputs = [obs]
    if not start:
        reward = triton.InferInput("reward", [1, 1], "FP32")
        reward.set_data_from_numpy(np.array([[-1.0]], np.float32))
        inputs.append(reward)
    result = client.infer("dt-a", inputs, sequence_id=sequence, sequence_start=start, sequence_end=end,
                          parameters={"step_index": index, **parameters})
    return result.as_numpy("action")


def refused(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_integer_and_string_sequence_ids_are_two_sequences(served):
    a, _ = served.clients()
    for index in range(3):
        step(a, 4201, index, start=index == 0)
    step(a, "4201", 0, start=True)  # the string id starts its own sequence: the integer one is not replaced
    step(a, 4201, 3)
    step(a, "4201", 1)
    step(a, 4201, 4, end=True)
    step(a, "4201", 2, end=True)
    assert refused(lambda: step(a, 4201, 5))[0] == "StatusCode.INVALID_ARGUMENT"  # both ended
    assert "Traceback" not in served.server.log


def test_another_clients_sequence_is_neither_taken_over_nor_stepped(served):
    a, b = served.clients()
    before = served.conflicts("start"), served.conflicts("step")
    step(a, "shared-7", 0, start=True)
    step(a, "shared-7", 1)
    for call in (lambda: step(b, "shared-7", 0, start=True),                        # a start would replace it
                 lambda: step(b, "shared-7", 2),                                     # a step would take A's turn
                 lambda: step(b, "shared-7", 2, end=True, ending="terminated")):    # an end would close it
        code, message = refused(call)
        assert code == "StatusCode.FAILED_PRECONDITION" and "another client" in message, message
        assert "127.0.0" not in message and not SESSION_ID.search(message), message  # nothing of client A
    assert (served.conflicts("start"), served.conflicts("step")) == (before[0] + 1, before[1] + 2)
    step(a, "shared-7", 2)  # A's sequence went on where it was
    step(a, "shared-7", 0, start=True)  # its owner may restart it: a new sequence from step 0
    step(a, "shared-7", 1, end=True)
    step(b, "shared-7", 0, start=True)  # ended, the id is free for anyone
    assert refused(lambda: step(a, "shared-7", 0, start=True))[0] == "StatusCode.FAILED_PRECONDITION"
    step(b, "shared-7", 1, end=True)
    assert "Traceback" not in served.server.log


# Ways a session's hash in Redis can be damaged: each takes (redis client, hash key, prefix, fields).
DAMAGE = {
    "no model": lambda r, key, prefix, fields: r.hdel(key, "model"),
    "no version": lambda r, key, prefix, fields: r.hdel(key, "version"),
    "no context": lambda r, key, prefix, fields: r.hdel(key, "ctx"),
    "no step count": lambda r, key, prefix, fields: r.hdel(key, "t"),
    "model not text": lambda r, key, prefix, fields: r.hset(key, "model", b"\xff\xfe"),
    "version not a number": lambda r, key, prefix, fields: r.hset(key, "version", "one"),
    "version past int64": lambda r, key, prefix, fields: r.hset(key, "version", "9" * 30),
    "negative step": lambda r, key, prefix, fields: r.hset(key, "t", -5),
    "step not a number": lambda r, key, prefix, fields: r.hset(key, "t", "two"),
    "step not the context's": lambda r, key, prefix, fields: r.hset(key, "t", 7),
    "garbage context": lambda r, key, prefix, fields: r.hset(key, "ctx", os.urandom(37)),
    "context of the right size": lambda r, key, prefix, fields: r.hset(key, "ctx", b"\xff" * len(fields[b"ctx"])),
    "truncated last answer": lambda r, key, prefix, fields: r.hset(key, "last", fields[b"last"][:10]),
    "key name elsewhere": lambda r, key, prefix, fields: r.hset(key, "keyname", prefix + "open"),
    "a string instead": lambda r, key, prefix, fields: (r.delete(key), r.set(key, "hello")),
    "a list instead": lambda r, key, prefix, fields: (r.delete(key), r.rpush(key, "a", "b")),
}


def observation() -> policy_pb2.Tensor:
    return policy_pb2.Tensor(shape=[3], data=np.zeros(3, "<f4").tobytes())


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("served", ["redis"], indirect=True)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_session_record_is_data_loss_and_can_be_closed(served, damage):
    import redis

    policy, store = served.server.policy(), redis.Redis.from_url(served.redis_url)
    session = policy.OpenSession(policy_pb2.OpenSessionRequest(model="dt-a"), timeout=10).session_id
    policy.Step(policy_pb2.StepRequest(session_id=session, observation=observation(), index=0), timeout=10)
    policy.Step(policy_pb2.StepRequest(session_id=session, observation=observation(), reward=-1.0, index=1),
                timeout=10)
    key = f"{served.prefix}s:{session}"
    DAMAGE[damage](store, key, served.prefix, store.hgetall(key))
    code, details = code_of(lambda: policy.Step(policy_pb2.StepRequest(
        session_id=session, observation=observation(), reward=-1.0, index=2), timeout=10))
    assert code == grpc.StatusCode.DATA_LOSS and session in details, (code, details)
    code, details = code_of(lambda: policy.CloseSession(policy_pb2.CloseSessionRequest(session_id=session),
                                                        timeout=10))
    assert code == grpc.StatusCode.OK, (code, details)
    assert not store.exists(key) and store.zscore(f"{served.prefix}open", session) is None
    assert store.ttl(served.prefix + "open") < 0  # no expiry: a damaged key name did not reach the open set
    code, _ = code_of(lambda: policy.Step(policy_pb2.StepRequest(session_id=session, observation=observation(),
                                                                 reward=-1.0, index=2), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    store.close()
    assert "Traceback" not in served.server.log, served.server.log[-3000:]


@pytest.mark.parametrize("served", ["redis"], indirect=True)
def test_a_damaged_sequence_is_data_loss_and_its_owner_starts_it_again(served):
    import redis

    a, _ = served.clients()
    store = redis.Redis.from_url(served.redis_url)
    step(a, 977, 0, start=True)
    step(a, 977, 1)
    [key] = [k for k in store.scan_iter(match=served.prefix + "s:*") if store.hget(k, "keyname") and
             store.hget(k, "keyname").decode().endswith("977)")]
    store.hset(key, "t", -5)  # read back before as "now at step -5"
    code, message = refused(lambda: step(a, 977, 2))
    assert code == "StatusCode.DATA_LOSS" and key.decode().rsplit(":", 1)[1] in message, message
    step(a, 977, 0, start=True)  # the start replaces the damaged record
    step(a, 977, 1, end=True)
    assert not store.exists(key)
    store.close()
    # Damaged records are the store's problem, not a client's: a few rate-limited lines, no traceback.
    log = served.server.log
    assert "Traceback" not in log and 1 <= log.count("does not parse") <= 3, log[-3000:]
