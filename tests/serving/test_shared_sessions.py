"""Exactly-once steps, and sessions shared through a real Redis by several servers."""
import shutil
import threading

import grpc
import numpy as np
import pytest
import redis

from batchrl.serving.sessions import RedisSessionStore
from tests import redis_server
from tests.serving.running import running
from tests.serving.test_sessions import client_script, play


def status_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_a_retried_step_is_answered_once_and_a_wrong_index_is_refused(dt_repository, session_store):
    model, observations, rewards, target = script = client_script(3, steps=6)
    with running(dt_repository, sessions=session_store) as srv:
        client = srv.client
        reference = play(client, script)
        sid = client.open_session(model, target_return=target).session_id
        first = client.step(sid, observations[0], index=0)
        np.testing.assert_array_equal(client.step(sid, observations[0], index=0), first)  # a retry: same answer
        second = client.step(sid, observations[1], float(rewards[0]), index=1)
        np.testing.assert_array_equal(client.step(sid, observations[1], float(rewards[0]), index=1), second)
        code, details = status_of(lambda: client.step(sid, observations[3], float(rewards[2]), index=3))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "index 3" in details and "is 2" in details, details
        code, details = status_of(lambda: client.step(sid, observations[0], index=0))  # no longer the last one
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "index 0" in details, details
        rest = [client.step(sid, observations[t], float(rewards[t - 1]), index=t) for t in range(2, 6)]
        assert client.close_session(sid) == 6  # the retries appended nothing
    np.testing.assert_array_equal(np.stack([first, second, *rest]), reference)


def redis_store(url, prefix, **limits):
    return lambda registry: RedisSessionStore(url, registry.get, prefix=prefix, **limits)


def test_a_shared_store_needs_the_step_index(dt_repository, redis_url, redis_prefix):
    with running(dt_repository, sessions=redis_store(redis_url, redis_prefix)) as srv:
        sid = srv.client.open_session("dt-a").session_id
        code, details = status_of(lambda: srv.client.step(sid, np.zeros(3, np.float32)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "send each step's index" in details


def test_any_server_on_the_store_answers_any_session_and_a_duplicate_lands_once(dt_repository, redis_url,
                                                                                redis_prefix):
    model, observations, rewards, target = script = client_script(4, steps=12)
    store = redis_store(redis_url, redis_prefix)
    with running(dt_repository, sessions=store) as a, running(dt_repository, sessions=store) as b:
        reference = play(a.client, script)
        sid = a.client.open_session(model, target_return=target).session_id
        actions = []
        for t in range(6):  # alternate servers step by step
            client = (a.client, b.client)[t % 2]
            actions.append(client.step(sid, observations[t], None if t == 0 else float(rewards[t - 1]), index=t))
        # the same step sent to both servers at once: one appends, both answer the same action
        answers, start = [None, None], threading.Barrier(2)

        def send(i, client):
            start.wait()
            answers[i] = client.step(sid, observations[6], float(rewards[5]), index=6)

        threads = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate((a.client, b.client))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        np.testing.assert_array_equal(answers[0], answers[1])
        actions.append(answers[0])
        actions += [b.client.step(sid, observations[t], float(rewards[t - 1]), index=t) for t in range(7, 12)]
        assert a.client.close_session(sid) == 12  # nothing appended twice
        assert len(a.sessions) == len(b.sessions) == 0
    np.testing.assert_array_equal(np.stack(actions), reference)


def test_a_step_where_its_version_is_not_loaded_names_the_version(dt_repository, redis_url, redis_prefix, tmp_path):
    partial = tmp_path / "models"
    shutil.copytree(dt_repository, partial)
    shutil.rmtree(partial / "dt-a")
    store = redis_store(redis_url, redis_prefix)
    with running(dt_repository, sessions=store) as a, running(partial, sessions=store) as b:
        sid = a.client.open_session("dt-a").session_id
        a.client.step(sid, np.zeros(3, np.float32), index=0)
        code, details = status_of(lambda: b.client.step(sid, np.zeros(3, np.float32), 0.0, index=1))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'dt-a' version 1" in details, details
        a.client.step(sid, np.zeros(3, np.float32), 0.0, index=1)  # where it is loaded, the session goes on


def test_a_step_reaches_redis_at_most_twice(dt_repository, redis_url, redis_prefix):
    stats = redis.Redis.from_url(redis_url)

    def calls():
        return {k: v["calls"] for k, v in stats.info("commandstats").items() if k != "cmdstat_info"}

    def used_by(step):
        before = calls()
        step()
        after = calls()
        return {k.removeprefix("cmdstat_"): after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}

    with running(dt_repository, sessions=redis_store(redis_url, redis_prefix)) as srv:
        sid = srv.client.open_session("dt-a").session_id
        srv.client.step(sid, np.zeros(3, np.float32), index=0)  # the scripts are loaded by now
        unary = used_by(lambda: srv.client.step(sid, np.ones(3, np.float32), 0.5, index=1))
        episode = srv.client.episode("dt-a")
        episode.step(np.zeros(3, np.float32))
        streamed = used_by(lambda: episode.step(np.ones(3, np.float32), 0.5))
        # Another caller steps the stream's session: the stream's copy is stale, and its write says so.
        srv.client.step(episode.opened.session_id, np.ones(3, np.float32), 0.5, index=2)
        srv.client.step(episode.opened.session_id, np.ones(3, np.float32), 0.5, index=3)
        code, details = status_of(lambda: episode.step(np.ones(3, np.float32), 0.5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "step 2" in details and "step 4" in details
    stats.close()
    # A unary Step: two round trips, one read of the session (HGETALL) and one conditional write (EVALSHA
    # of the step script). A stream's step: the write only (the stream keeps the session it stepped last).
    # Redis also counts the commands that the script runs inside Redis, which cost no trip.
    inside_the_script = {"time", "hget", "hset", "pexpire", "zadd"}
    assert unary.get("hgetall") == 1 and unary.get("evalsha") == 1, unary
    assert set(unary) - {"hgetall", "evalsha"} <= inside_the_script, unary
    assert streamed.get("evalsha") == 1 and set(streamed) - {"evalsha"} <= inside_the_script, streamed


def test_redis_stopped_gives_unavailable_and_act_keeps_working(dt_repository):
    proc, url = redis_server.start()  # this test stops Redis: only a private one of its own
    try:
        store = redis_store(url, "batchrl-test:", timeout=0.5)
        with running(dt_repository, sessions=store) as srv:
            sid = srv.client.open_session("dt-a").session_id
            srv.client.step(sid, np.zeros(3, np.float32), index=0)
            proc.terminate()
            proc.wait(timeout=10)
            code, details = status_of(lambda: srv.client.step(sid, np.zeros(3, np.float32), 0.0, index=1))
            assert code == grpc.StatusCode.UNAVAILABLE and "session store at" in details and "unreachable" in details
            code, details = status_of(lambda: srv.client.open_session("dt-a"))
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert srv.client.act("pendulum", np.ones((2, 3), np.float32)).shape == (2, 1)  # stateless Act works
    finally:
        redis_server.stop(proc)


def test_serve_takes_the_redis_store_from_its_command_line(dt_repository, redis_url, redis_prefix):
    from batchrl.serving.client import PolicyClient
    from tests.serving import blackbox

    with blackbox.serving(dt_repository, "--session-store", redis_url, "--session-key-prefix", redis_prefix) as server:
        with PolicyClient(server.address) as client:
            sid = client.open_session("dt-a").session_id
            client.step(sid, np.zeros(3, np.float32), index=0)
            store = redis.Redis.from_url(redis_url)
            assert int(store.hget(f"{redis_prefix}s:{sid}", "t")) == 1  # the session lives in Redis
            store.close()
            assert client.close_session(sid) == 1


def test_a_bad_or_unreachable_store_is_one_line_at_start(dt_repository):
    from tests.test_cli import batchrl, free_port, one_line

    one_line(batchrl("serve", "-r", dt_repository, "--session-store", "mysql://x"), 1,
             "--session-store 'mysql://x'", "redis://HOST:PORT/DB")
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    line = one_line(batchrl("serve", "-r", dt_repository, "--session-store", url), 1, "unreachable")
    assert "secret" not in line  # the password is never printed
