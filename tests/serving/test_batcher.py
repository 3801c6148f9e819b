"""The per-model batcher gathers concurrent requests into one run and gives each its own rows."""
import threading
import time

import numpy as np
import pytest

from batchrl.serving.batcher import Batcher, BatchLimits, DeadlineExceeded, QueueFull


class SlowDouble:
    """A model run that doubles its input, takes a little while, and records its batch sizes."""

    def __init__(self, delay=0.01, fail_on=None):
        self.delay, self.fail_on, self.sizes = delay, fail_on, []

    def __call__(self, feeds):
        x = feeds["x"]
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("bad row")
        self.sizes.append(len(x))
        time.sleep(self.delay)
        return x * 2.0


def submit_concurrently(batcher, payloads):
    results = [None] * len(payloads)
    errors = [None] * len(payloads)
    start = threading.Barrier(len(payloads))

    def worker(i):
        start.wait()
        try:
            results[i] = batcher.submit({"x": payloads[i]})
        except Exception as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results, errors


def test_lone_request_runs_at_once_as_its_own_batch():
    run = SlowDouble(delay=0.0)
    batcher = Batcher(run)
    np.testing.assert_array_equal(batcher.submit({"x": np.ones((3, 2))}), 2 * np.ones((3, 2)))
    assert run.sizes == [3] and batcher.runs == 1


def test_concurrent_requests_share_runs_and_get_their_own_rows():
    run = SlowDouble()
    batcher = Batcher(run)
    payloads = [np.full((1 + i % 3, 2), float(i)) for i in range(32)]
    results, errors = submit_concurrently(batcher, payloads)
    assert errors == [None] * 32
    for payload, result in zip(payloads, results):
        np.testing.assert_array_equal(result, payload * 2)
    assert batcher.requests == 32 and batcher.runs < 32  # gathered
    assert sum(run.sizes) == sum(len(p) for p in payloads) and max(run.sizes) > 3


def test_max_rows_bounds_a_run():
    run = SlowDouble()
    batcher = Batcher(run, BatchLimits(max_rows=4))
    results, errors = submit_concurrently(batcher, [np.full((2, 1), float(i)) for i in range(16)])
    assert errors == [None] * 16 and max(run.sizes) <= 4
    assert [r[0, 0] for r in results] == [2.0 * i for i in range(16)]


def test_a_failing_request_fails_alone():
    run = SlowDouble(fail_on=7.0)
    batcher = Batcher(run)
    results, errors = submit_concurrently(batcher, [np.full((1, 1), float(i)) for i in range(16)])
    assert isinstance(errors[7], RuntimeError)
    assert all(e is None for i, e in enumerate(errors) if i != 7)
    assert all(r[0, 0] == 2.0 * i for i, r in enumerate(results) if i != 7)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_rows"):
        Batcher(SlowDouble(), BatchLimits(max_rows=0))
    with pytest.raises(ValueError, match="max_delay"):
        Batcher(SlowDouble(), BatchLimits(max_delay=-1.0))


class GatedDouble:
    """A model run that doubles its input but does not return until the gate is opened; it records
    its batch sizes. The tests hold the model busy with it instead of guessing how long to sleep."""

    def __init__(self):
        self.gate, self.entered, self.sizes = threading.Event(), threading.Event(), []

    def __call__(self, feeds):
        self.sizes.append(len(feeds["x"]))
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return feeds["x"] * 2.0


def wait_until(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in 30 s"
        time.sleep(0.001)


def started(target, *args):
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def test_a_full_queue_refuses_and_an_expired_request_is_not_run():
    run = GatedDouble()
    batcher = Batcher(run, BatchLimits(max_queue=2, max_delay=0.0))
    first = started(batcher.submit, {"x": np.zeros((1, 1))})
    wait_until(run.entered.is_set)  # the first request holds the model
    late = [None]
    deadline = time.monotonic() + 0.05

    def expiring():
        try:
            batcher.submit({"x": np.ones((1, 1))}, deadline=deadline)
        except DeadlineExceeded as exc:
            late[0] = exc

    waiting = [started(expiring), started(batcher.submit, {"x": np.full((1, 1), 2.0)})]
    wait_until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull, match="2 requests queued"):
        batcher.submit({"x": np.zeros((1, 1))})
    wait_until(lambda: time.monotonic() > deadline)
    run.gate.set()
    for t in [first, *waiting]:
        t.join(timeout=30)
    assert isinstance(late[0], DeadlineExceeded)
    assert run.sizes == [1, 1]  # the expired request never reached the model


def test_a_filling_batch_waits_for_more_but_a_lone_request_does_not():
    run = SlowDouble(delay=0.0)
    batcher = Batcher(run, BatchLimits(max_delay=60.0))
    lone = started(batcher.submit, {"x": np.ones((1, 1))})
    lone.join(timeout=30)  # a batch filling for more would wait the whole minute
    assert not lone.is_alive() and run.sizes == [1]  # nothing else queued: ran at once, alone
    # One request holds the model while two queue behind it. When it is done the two form a
    # filling batch, which waits (up to a minute) for a third to fill it to max_rows rather than
    # running the two at once; the third completes it and it runs at once.
    gated = GatedDouble()
    batcher = Batcher(gated, BatchLimits(max_delay=60.0, max_rows=3))
    threads = [started(batcher.submit, {"x": np.ones((1, 1))})]
    wait_until(gated.entered.is_set)
    threads += [started(batcher.submit, {"x": np.ones((1, 1))}) for _ in range(2)]
    wait_until(lambda: batcher.queue_depth == 2)
    gated.gate.set()
    time.sleep(0.2)  # a batcher that did not wait would run the two now (the sleep only sharpens the test)
    threads.append(started(batcher.submit, {"x": np.ones((1, 1))}))
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and gated.sizes == [1, 3]


def test_sustained_load_hands_the_runner_role_on_without_losing_or_mixing_requests():
    """64 threads each submitting 40 requests back to back, batches capped at 5 rows: every
    request gets exactly its own rows back, the queue drains (the runner role is always handed
    on) and the batcher ends idle."""
    run = SlowDouble(delay=0.0)
    batcher = Batcher(run, BatchLimits(max_rows=5, max_delay=0.0002))
    wrong, failures = [], []

    def client(i):
        for j in range(40):
            x = np.full((1 + (i + j) % 2, 3), float(1000 * i + j))
            try:
                out = batcher.submit({"x": x})
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)
                continue
            if out.shape != x.shape or not (out == 2 * x).all():
                wrong.append((i, j))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request was never woken"
    assert failures == [] and wrong == []
    assert batcher.requests == 64 * 40 and batcher.runs < batcher.requests and max(run.sizes) <= 5
    assert batcher.queue_depth == 0 and not batcher._busy
