"""The experience writer outlives what breaks it (issue 31, items 1 and 5): a folder and a link named like old
shards in the log folder, no file descriptor left. A spawned `batchrl serve --log-experience` keeps answering and
writing, retention deletes only regular shard files, the drain's bound (grace + 2 s) holds at SIGTERM, and every
acknowledged row is on disk or counted as dropped."""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from batchrl.serving.experience import ExperienceLog
from batchrl.serving.metrics import Metrics
from tests.serving.blackbox import Server, policy_pb2, start

GRACE = 1.0
DRAIN_BOUND = 2.0  # the server's promise past its grace period (serving/server.py)
MARGIN = 3.0  # interpreter exit on a busy 2-core machine
FLUSH = 0.2  # --log-flush-seconds
OLD = time.time() - 30 * 86_400  # past the one-hour retention


def old_shard(seq: int) -> str:
    """A name of another process's series, as retention matches them."""
    return f"experience-otherhost-7-20200101T000000Z-{seq:06d}.parquet"


def tensor(array: np.ndarray) -> policy_pb2.Tensor:
    array = np.ascontiguousarray(array, np.float32)
    return policy_pb2.Tensor(shape=array.shape, data=array.tobytes())


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@dataclass
class Logged:
    server: Server
    root: Path
    folder: Path
    channel: grpc.Channel
    acknowledged: set[tuple[str, int]] = field(default_factory=set)  # (session, step) rows the server answered

    def episode(self, steps: int) -> None:
        """Open a session, step it, close it with its end: steps + 1 acknowledged rows."""
        stub = self.server.policy(self.channel)
        sid = stub.OpenSession(policy_pb2.OpenSessionRequest(model="pendulum"), timeout=10).session_id
        for t in range(steps):
            request = policy_pb2.StepRequest(session_id=sid, observation=tensor(np.full(3, t)), index=t)
            if t:
                request.reward = 1.0
            stub.Step(request, timeout=10)
            self.acknowledged.add((sid, t))
        stub.CloseSession(policy_pb2.CloseSessionRequest(session_id=sid, final_observation=tensor(np.ones(3)),
                                                         reward=1.0, ending=policy_pb2.Ending.Value("TRUNCATED")),
                          timeout=10)
        self.acknowledged.add((sid, steps))


@pytest.fixture(scope="module")
def logged(repository, tmp_path_factory):
    """A server logging into a folder that holds, named like old shards: a folder, one of the issue's form, a link
    to a file outside, and one real (regular) shard, the oldest. The server's channel opens before any test."""
    root = tmp_path_factory.mktemp("experience-reliability")
    folder = root / "experience"
    folder.mkdir(mode=0o700)
    outside = root / "outside.parquet"
    outside.write_bytes(b"not the log's")
    (folder / old_shard(0)).write_bytes(b"an old shard")
    (folder / old_shard(1)).mkdir()
    (folder / old_shard(1) / "keep").write_text("a folder's content")
    (folder / "experience-20200101T000000Z.parquet").mkdir()
    (folder / old_shard(2)).symlink_to(outside)
    for age, path in enumerate([folder / old_shard(0), outside, folder / old_shard(1),
                                folder / "experience-20200101T000000Z.parquet", folder / old_shard(2)]):
        # the real shard oldest: retention meets the others after deleting it
        os.utime(path, (OLD + age,) * 2, follow_symlinks=False)
    server = start(repository, "--log-experience", str(folder), "--log-flush-seconds", str(FLUSH),
                   "--log-retention-hours", "1", "--log-buffer-rows", "64", "--grace", str(GRACE), metrics=True)
    logged = Logged(server, root, folder, server.channel())
    try:
        yield logged
    finally:
        logged.channel.close()
        server.stop(timeout=5)


def test_the_writer_outlives_emfile_and_writes_again(logged):
    """No file descriptor left in the server (its soft limit lowered under the fds it holds): steps are still
    answered, each failed shard is counted, the error is logged once without a traceback, and shards are written
    again once descriptors are back."""
    server = logged.server
    logged.episode(3)
    wait_for(lambda: server.metric("batchrl_experience_rows_written_total") >= 4)
    limit = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (3, limit[1]))  # every new fd: EMFILE
    try:
        for _ in range(4):  # one shard per pass, each failing
            logged.episode(3)
            time.sleep(2 * FLUSH)
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, limit)
    logged.episode(3)
    server.wait_log(r"experience log: writing again")
    wait_for(lambda: server.metric("batchrl_experience_rows_written_total") >= 8)
    assert server.metric("batchrl_experience_write_errors_total", reason="EMFILE") >= 2
    assert server.metric("batchrl_experience_rows_dropped_total", reason="write_error") >= 8
    emfile = [line for line in server.lines if "experience" in line and "Too many open files" in line]
    assert len(emfile) == 1, emfile  # logged once, not once per pass
    assert "Traceback" not in server.log


def test_retention_leaves_folders_and_links_and_sigterm_keeps_its_bound(logged):
    """Retention deleted the old regular shard and left the folders and the link (and the file it points to); the
    writer went on writing past them; SIGTERM ends the server within grace + 2 s, and every acknowledged row
    (of both tests) is in a shard or counted as dropped."""
    server, folder = logged.server, logged.folder
    before = set(logged.acknowledged)
    logged.episode(3)
    wait_for(lambda: server.metric("batchrl_experience_shards_deleted_total", reason="age") >= 1)
    time.sleep(2 * FLUSH)  # retention has run over the folder, link and the others
    for _ in range(10):  # more rows than the buffer holds, over several shards
        logged.episode(10)
    metrics = server.metrics()
    deleted = metrics.get(("batchrl_experience_shards_deleted_total", (("reason", "age"),)))
    retention_errors = [v for (name, _), v in metrics.items() if name == "batchrl_experience_retention_errors_total"]
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=GRACE + DRAIN_BOUND + MARGIN)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError(f"no exit {GRACE + DRAIN_BOUND + MARGIN} s after SIGTERM; log:\n{server.log}") from None
    elapsed = time.monotonic() - started
    assert code == 0, server.log
    time.sleep(0.2)  # the reader takes the last lines
    assert not (folder / old_shard(0)).exists() and deleted == 1  # the only regular shard past the retention
    assert sum(retention_errors) == 0  # nothing failed: the others are not candidates
    assert (folder / old_shard(1) / "keep").read_text() == "a folder's content"
    assert (folder / "experience-20200101T000000Z.parquet").is_dir()
    assert (folder / old_shard(2)).is_symlink() and (logged.root / "outside.parquet").read_bytes() == b"not the log's"
    shards = [p for p in folder.glob("experience-*.parquet") if p.is_file() and not p.is_symlink()]
    on_disk = [(r["session_id"], r["step"]) for p in shards for r in pq.read_table(p).to_pylist()]
    closed = re.search(r"experience log closed: (\d+) shard\(s\) written, (\d+) row\(s\) dropped", server.log)
    assert closed, server.log
    assert len(set(on_disk)) == len(on_disk) and set(on_disk) <= logged.acknowledged
    assert len(on_disk) + int(closed.group(2)) == len(logged.acknowledged), (len(on_disk), closed.group(0))
    assert len(set(on_disk) - before) >= 11  # written on after retention met the folders and the link
    assert elapsed < GRACE + DRAIN_BOUND + MARGIN


def test_close_returns_within_its_timeout_and_counts_what_a_hung_writer_holds(tmp_path):
    """The writer hangs opening its first shard (a FIFO nobody reads where it writes, as a hung disk would) and the
    buffer is full: close() returns within its timeout instead of waiting for room, and counts the rows the writer
    held and those in the buffer as dropped (close_timeout)."""
    metrics = Metrics()
    dropped = lambda reason: metrics.registry.get_sample_value("batchrl_experience_rows_dropped_total",  # noqa: E731
                                                               {"reason": reason})
    folder = tmp_path / "experience"
    experience = ExperienceLog(folder, flush_seconds=0.01, buffer_rows=4, metrics=metrics)
    staging = folder / f".{experience.series}-000000.parquet.tmp"
    os.mkfifo(staging)
    row = lambda t: experience.step("s", "m", 1, t, np.zeros(3, np.float32), np.zeros(1, np.float32), 1.0)  # noqa: E731
    row(0)
    wait_for(lambda: experience.buffer.qsize() == 0)  # the writer holds row 0 and hangs on the FIFO
    for t in range(1, 6):  # 4 wait in the buffer, 1 is dropped (buffer_full)
        row(t)
    closer = threading.Thread(target=experience.close, kwargs={"timeout": 0.5}, daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(timeout=10)
    try:
        assert not closer.is_alive(), "close() blocked"
        assert time.monotonic() - started < 5
        assert (dropped("buffer_full"), dropped("close_timeout")) == (1, 5)
        row(6)  # a row after close (a call the drain cut off) is counted too
        assert dropped("closed") == 1
    finally:
        reader = threading.Thread(target=lambda: open(staging, "rb").read(), daemon=True)  # unblock the writer
        reader.start()
        reader.join(timeout=10)
        wait_for(lambda: "batchrl-experience-writer" not in {t.name for t in threading.enumerate()})  # it ends too
