"""Black-box regression test: a client that sends on a stream but never reads its answers cannot hold
a stream slot (and its gRPC thread) past the stream idle timeout.

Such a client fills the HTTP/2 flow-control window of its stream, and the server thread sending to it
blocks there, not where it waits for the client's next message, which is all the idle timeout used to
cover: the slots stayed taken, well-behaved streams were refused RESOURCE_EXHAUSTED, and a drain had to
cut them off at the end of its grace period.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from tests.serving.blackbox import policy_pb2, serving
from tests.serving.test_repository_hardening import MANIFEST_KEY, install, tiny_policy

STREAMS = 4          # --max-streams: every slot taken by a client that does not read
IDLE = 2.0           # --stream-idle-timeout, seconds
ROWS = 16384         # observations per Act request: a 64 KiB answer, so a few fill the stream's window
# An Episode's answers are small: its client keeps the window it grants small, as a client short of
# memory would (grpc otherwise buffers megabytes of unread answers before the window fills).
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))
OBS = np.array([0.5, -0.2, 0.1], np.float32)


def tiny_sequence_policy(target: Path, obs_dim: int = 3, context_length: int = 4) -> Path:
    """A valid sequence policy (the Decision Transformer's inputs): the mean of the context's states
    -> MatMul, Tanh -> action [N, 1] in [-1, 1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def given(name, kind, *shape):
        return helper.make_tensor_value_info(name, kind, ["batch", context_length, *shape])

    weights = numpy_helper.from_array(np.full((obs_dim, 1), 0.1, np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["states", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["action"])],
        "tiny-sequence",
        [given("states", TensorProto.FLOAT, obs_dim), given("actions", TensorProto.FLOAT, 1),
         given("returns_to_go", TensorProto.FLOAT, 1), given("timesteps", TensorProto.INT64),
         given("attention_mask", TensorProto.INT64)],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", 1])], initializer=[weights, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    manifest = {"algorithm": "dt", "observationSpace": {"shape": [obs_dim]},
                "actionSpace": {"shape": [1], "low": [-1.0], "high": [1.0]}, "contextLength": context_length,
                "maxTimestep": 100, "returnScale": 1.0, "defaultTargetReturn": 10.0}
    helper.set_model_props(model, {MANIFEST_KEY: json.dumps(manifest)})
    onnx.save(model, target)
    return target


def tensor(array) -> policy_pb2.Tensor:
    array = np.asarray(array, np.float32)
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


class Unread:
    """A stream whose client sends until stopped and never reads an answer: an ActStream of large
    requests, or an Episode that opens a session and steps it."""

    def __init__(self, server, stop: threading.Event, episode: bool = False):
        self.channel = server.channel(*SMALL_WINDOW) if episode else server.channel()
        self.sent = 0

        def requests():
            if episode:
                yield policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="sequence"))
                yield policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=tensor(OBS)))
            step = policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=tensor(OBS), reward=1.0))
            act = policy_pb2.ActRequest(model="policy", observations=tensor(np.ones((ROWS, 3))))
            while not stop.is_set():
                self.sent += 1
                yield step if episode else act

        stub = server.policy(self.channel)
        self.call = (stub.Episode if episode else stub.ActStream)(requests(), timeout=60)

    def read(self) -> list:
        """The answers queued for the client, then the status the stream ended with (an RpcError)."""
        answers = []
        try:
            for answer in self.call:
                answers.append(answer)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "took no answer" in exc.details() and "stream send timeout" in exc.details(), exc
            return answers
        raise AssertionError(f"the stream ended OK after {len(answers)} answers")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_streams_whose_client_takes_no_answer_are_closed_after_the_idle_timeout(tmp_path):
    repo = tmp_path / "models"
    install(repo, "policy", "1", tiny_policy(tmp_path / "policy.onnx", obs_dim=3))
    install(repo, "sequence", "1", tiny_sequence_policy(tmp_path / "sequence.onnx"))
    stop = threading.Event()
    with serving(repo, "--max-streams", str(STREAMS), "--grpc-threads", str(STREAMS + 8),
                 "--stream-idle-timeout", str(IDLE), metrics=True) as server:
        opened = time.monotonic()
        unread = [Unread(server, stop, episode=i == 0) for i in range(STREAMS)]
        try:
            wait_for(lambda: server.metric("batchrl_open_streams") == STREAMS, IDLE, "the streams did not open")
            # every slot is taken; the server closes the streams once an answer waited IDLE seconds
            wait_for(lambda: server.metric("batchrl_open_streams") == 0, 3 * IDLE + 4,
                     f"streams whose client reads nothing still hold their slots "
                     f"({server.metric('batchrl_open_streams'):g} of {STREAMS} open)")
            assert time.monotonic() - opened > IDLE  # not at once: a slow reader has the idle timeout
            assert all(u.sent > 8 for u in unread)
            assert server.metric("batchrl_stream_send_timeouts_total") == STREAMS
            assert server.metric("batchrl_streams_closed_idle_total") == 0  # they kept sending: not idle
            assert "stream send timeout" in server.log

            # a well-behaved Episode stream gets a slot and completes
            obs = tensor(OBS)
            episode = server.policy().Episode(iter([
                policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="sequence")),
                policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=obs)),
                policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=obs, reward=-1.0)),
                policy_pb2.EpisodeRequest(close=policy_pb2.CloseSessionRequest())]), timeout=10)
            answers = list(episode)
            assert [a.WhichOneof("kind") for a in answers] == ["opened", "step", "step", "closed"]
            assert answers[-1].closed.steps == 2

            # a client that reads at last finds the answers queued for it, then the reason; the closed
            # Episode's session stays open (as after idleness), to continue with Step
            assert len(unread[1].read()) > 0
            opened_answer, *steps = unread[0].read()
            session_id = opened_answer.opened.session_id
            assert session_id and steps
            step = server.policy().Step(policy_pb2.StepRequest(session_id=session_id, observation=obs, reward=1.0),
                                        timeout=5)
            assert step.timestep > steps[-1].step.timestep

            # nothing is left for a drain to wait for or cut off
            stop.set()
            started = time.monotonic()
            assert server.stop() == 0
            assert time.monotonic() - started < 4  # the default grace is 5 s: nothing waited for it
            assert "open stream(s) at the end of the grace period" not in server.log
        finally:
            stop.set()
            for u in unread:
                u.call.cancel()
                u.channel.close()
