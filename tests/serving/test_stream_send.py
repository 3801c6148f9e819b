"""Black-box regression test: a client that sends on a stream but never reads its answers cannot hold
a stream slot (and its gRPC thread) past the stream idle timeout.

Such a client fills the HTTP/2 flow-control window of its stream, and the server thread sending to it
blocks there, not where it waits for the client's next message, which is all the idle timeout used to
cover: the slots stayed taken, well-behaved streams were refused RESOURCE_EXHAUSTED, and a drain had to
cut them off at the end of its grace period.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from tests.serving.blackbox import policy_pb2, serving

STREAMS = 4          # --max-streams: every slot taken by a client that does not read
IDLE = 2.0           # --stream-idle-timeout, seconds
ROWS = 16384         # observations per request: a 64 KiB answer, so a few fill the stream's window


def tensor(array) -> policy_pb2.Tensor:
    array = np.asarray(array, np.float32)
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


class Unread:
    """An ActStream whose client sends large requests until stopped and never reads an answer."""

    def __init__(self, server, stop: threading.Event):
        request = policy_pb2.ActRequest(model="pendulum", observations=tensor(np.ones((ROWS, 3))))
        self.channel = server.channel()
        self.sent = 0

        def requests():
            while not stop.is_set():
                self.sent += 1
                yield request

        self.call = server.policy(self.channel).ActStream(requests(), timeout=60)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_streams_whose_client_takes_no_answer_are_closed_after_the_idle_timeout(dt_repository):
    stop = threading.Event()
    with serving(dt_repository, "--max-streams", str(STREAMS), "--grpc-threads", str(STREAMS + 8),
                 "--stream-idle-timeout", str(IDLE), metrics=True) as server:
        unread = [Unread(server, stop) for _ in range(STREAMS)]
        try:
            wait_for(lambda: all(u.sent > 8 for u in unread), 10, "the clients could not start sending")
            opened = time.monotonic()
            # every slot is taken meanwhile; the server closes them once their answers wait IDLE seconds
            wait_for(lambda: server.metric("batchrl_open_streams") == 0, 3 * IDLE + 4,
                     f"streams whose client reads nothing still hold their slots "
                     f"({server.metric('batchrl_open_streams'):g} of {STREAMS} open)")
            assert time.monotonic() - opened > IDLE - 0.5  # not at once: a slow reader has the idle timeout
            assert server.metric("batchrl_stream_send_timeouts_total") == STREAMS
            assert server.metric("batchrl_streams_closed_idle_total") == 0  # they kept sending: not idle
            assert "stream send timeout" in server.log

            # a well-behaved Episode stream gets a slot and completes
            obs = tensor([0.5, -0.2, 0.1])
            episode = server.policy().Episode(iter([
                policy_pb2.EpisodeRequest(open=policy_pb2.OpenSessionRequest(model="dt-a")),
                policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=obs)),
                policy_pb2.EpisodeRequest(step=policy_pb2.StepRequest(observation=obs, reward=-1.0)),
                policy_pb2.EpisodeRequest(close=policy_pb2.CloseSessionRequest())]), timeout=10)
            answers = list(episode)
            assert [a.WhichOneof("kind") for a in answers] == ["opened", "step", "step", "closed"]
            assert answers[-1].closed.steps == 2

            # a client that reads at last finds the answers queued for it, then the reason
            got = 0
            try:
                for _ in unread[0].call:
                    got += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "took no answer" in exc.details() and "stream send timeout" in exc.details()
            else:
                raise AssertionError(f"the stream ended OK after {got} answers")

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
