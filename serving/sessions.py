"""Sessions: one per episode, pinned to a model version. A sequence policy's session holds the rolling
context of its last K steps; a feed-forward policy's holds only its step count (``EpisodeSteps``): it
gives the episode an identity and step indices, and the same exactly-once steps.

Two stores implement the one interface the callers use (``Sessions``):
- ``SessionStore`` keeps sessions in this process's memory (the default). A session holds a
  reference to the LoadedModel it opened on, so that version stays loaded (and answers its
  Steps) for as long as the session lives, whatever becomes the default meanwhile.
- ``RedisSessionStore`` keeps them in Redis, so that every server process attached to the same
  Redis can answer any session's next Step. A session records its model name and version; a
  Step that lands where that version is not loaded is refused (FAILED_PRECONDITION).

Idle sessions expire after a timeout; the number of open sessions is bounded. A session may also
be found by a key of the caller's (the Open Inference Protocol's sequence id): the key lives
exactly as long as its session, so the keys are bounded by the same rules. Keys are shared by every
caller, so a session opened under a key records its owner (the caller's identity), in Redis too: an
open that would replace a live session of another owner, and a find by another owner, are refused
(``KeyInUse``); the owner may replace its own session.

A Redis record that does not parse (a damaged or hand-edited hash, a key of another type) answers
DATA_LOSS naming its session, and can still be closed: closing needs none of its fields.

Steps are exactly-once when the caller sends each step's index (0 for the first): the expected
index runs; a retry of the step just answered gets the stored answer back without appending to
the context twice (in Redis, whichever process the retry lands on, and also while the original
is still running: the writer that loses the conditional write returns the winner's answer); any
other index is refused naming both.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from batchrl.errors import UserError
from batchrl.protos.sequence import RollingContext, check_reward
from batchrl.serving.errors import (DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                    Unavailable)
from batchrl.serving.logs import RateLimitedLog
from batchrl.serving.runtime import LoadedModel
from batchrl.serving.store_guard import BREAKER_OPEN, GuardLimits, Refused, StoreGuard

if TYPE_CHECKING:
    from batchrl.serving.metrics import Metrics

log = logging.getLogger("batchrl.serve")


class SessionNotFound(NotFound):
    """Unknown, closed or expired session id."""


class TooManySessions(ResourceExhausted):
    """The session limit is reached."""


class KeyInUse(FailedPrecondition):
    """The key names a live session of another owner: it is neither replaced nor found for this caller.
    The message names no owner; the protocol that chose the key says what it means to its client."""

    def __init__(self):
        super().__init__("the key names another client's open session")


@dataclass(frozen=True)
class StepResult:
    action: np.ndarray   # [*action_shape]
    timestep: int        # this step's index in the episode
    return_to_go: float  # what the action was conditioned on
    version: int         # the session's model version

    def pack(self) -> bytes:
        return struct.pack("<qdq", self.timestep, self.return_to_go, self.version) + \
            np.ascontiguousarray(self.action, np.float32).tobytes()

    @classmethod
    def unpack(cls, data: bytes, action_shape: tuple[int, ...]) -> "StepResult":
        timestep, return_to_go, version = struct.unpack("<qdq", data[:24])
        return cls(np.frombuffer(data[24:], np.float32).reshape(action_shape).copy(), timestep, return_to_go, version)


class EpisodeSteps:
    """A feed-forward policy's session context: no history, only the steps taken. It keeps the reward
    rule of every episode (none on the first step, one on every later step) and RollingContext's
    interface, so stores and dataplane treat both kinds alike."""

    return_to_go = 0.0  # feed-forward policies condition on no return

    def __init__(self, t: int = 0):
        self.t = t

    def inputs(self, observation: np.ndarray, reward: float | None) -> dict[str, np.ndarray]:
        check_reward(self.t, reward)
        return {"observations": np.asarray(observation, np.float32)[None]}

    def advance(self, observation: np.ndarray, reward: float | None, action: np.ndarray) -> None:
        self.t += 1

    def pack(self) -> bytes:
        return struct.pack("<q", self.t)

    @classmethod
    def unpack(cls, data: bytes) -> "EpisodeSteps":
        if len(data) != 8:
            raise ValueError(f"a packed feed-forward session context has 8 bytes, got {len(data)}")
        return cls(struct.unpack("<q", data)[0])


Context = RollingContext | EpisodeSteps


@dataclass
class Session:
    id: str
    model: LoadedModel
    context: Context
    last_used: float
    key: Hashable | None = None  # the caller's name for it, if any
    last: StepResult | None = None  # the answer to the step before context.t: a retry of it gets this back
    owner: str | None = None  # who opened it under ``key``; None: anyone may replace it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one Step at a time


@dataclass(frozen=True)
class Closed:
    """What is left of a closed session."""
    id: str
    model_name: str
    version: int
    steps: int


def replayed(session_id: str, t: int, index: int | None, last: StepResult | None) -> StepResult | None:
    """None when the step sent as ``index`` is the next one (``t``) and should run; the stored answer
    when it retries the step just answered; FailedPrecondition naming both indices otherwise."""
    if index is None or index == t:
        return None
    if index == t - 1 and last is not None:
        return last
    raise FailedPrecondition(f"session {session_id}: the step sent has index {index}, but the next step's index "
                             f"is {t}" + (f" (step {t - 1} was the last one answered)" if t else ""))


# run(context) -> StepResult: infer the step's action and advance ``context``; raises (leaving the
# context as it was) when the step is refused or fails.
StepRun = Callable[[Context], StepResult]


class Sessions(Protocol):
    """What the dataplane, the OIP translator, the sweeper and the metrics ask of a session store."""

    idle_timeout: float
    max_sessions: int
    shared: bool  # other server processes answer its sessions too: a broken stream leaves its session open

    def __len__(self) -> int: ...

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None,
             owner: str | None = None) -> Session: ...

    def get(self, session_id: str) -> Session: ...

    def step(self, session: Session, index: int | None, run: StepRun) -> StepResult: ...

    def find(self, key: Hashable, owner: str | None = None) -> str | None: ...

    def close(self, session_id: str) -> Closed | None: ...

    def evict_idle(self) -> int: ...


def new_context(model: LoadedModel, target_return: float | None) -> Context:
    if not model.is_sequence:
        return EpisodeSteps()
    try:
        return RollingContext(model.context_spec, target_return)
    except ValueError as exc:  # the shared contract says ValueError; here it is the caller's value
        raise InvalidArgument(f"target_return: {exc}") from None


def unpack_context(model: LoadedModel, data: bytes) -> Context:
    """The context packed in ``data``; ValueError when the bytes are not one that steps could have made
    (unpacking alone takes any bytes of the right length)."""
    if not model.is_sequence:
        context = EpisodeSteps.unpack(data)
        if context.t < 0:
            raise ValueError(f"it is at step {context.t}")
        return context
    context, spec = RollingContext.unpack(model.context_spec, data), model.context_spec
    if context.t < 0 or context.length != min(context.t, spec.context_length):
        raise ValueError(f"it holds {context.length} steps of context at step {context.t}")
    if not (math.isfinite(context.return_to_go) and all(np.isfinite(a).all() for a in (
            context.states, context.actions, context.returns_to_go))):
        raise ValueError("it holds values that are not finite")
    if not ((context.timesteps >= 0) & (context.timesteps < spec.max_timestep)).all():
        raise ValueError(f"it holds timesteps outside 0 to {spec.max_timestep - 1}")
    return context


def too_many(open_now: int, limit: int) -> TooManySessions:
    return TooManySessions(f"{open_now} sessions are open, the maximum is {limit}: close finished sessions "
                           "(CloseSession) and retry")


class SessionStore:
    """Sessions in this process's memory (the default store)."""

    shared = False

    def __init__(self, max_sessions: int = 1024, idle_timeout: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, remember_expired: int = 65_536,
                 refuse: str | None = None):
        """``refuse``: why no session may open here (a process of several that share a port: a session
        opened in one's memory could not take its next Step in another)."""
        check_limits(max_sessions, idle_timeout)
        self.refuse = refuse
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._keys: dict[Hashable, str] = {}  # session key -> session id, for open sessions only
        self._expired: OrderedDict[str, None] = OrderedDict()  # recent evictions, to say "expired"
        self._remember = remember_expired

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None,
             owner: str | None = None) -> Session:
        """A new session (``target_return``: sequence policies only). One opened under ``key`` replaces the
        session that key named, unless that one is live and has another owner (KeyInUse)."""
        if self.refuse:
            raise FailedPrecondition(self.refuse)
        context = new_context(model, target_return)
        with self._lock:
            now = self._clock()
            if key is not None and (old := self._sessions.get(self._keys.get(key, ""))) is not None:
                if not self._idle(old, now) and old.owner not in (None, owner):
                    raise KeyInUse()
                self._drop(old.id)
            if len(self._sessions) >= self.max_sessions:
                self._evict_idle(now)
            if len(self._sessions) >= self.max_sessions:
                raise too_many(len(self._sessions), self.max_sessions)
            session = Session(uuid.uuid4().hex, model, context, now, key, owner=owner)
            self._sessions[session.id] = session
            if key is not None:
                self._keys[key] = session.id
            model.pin()  # the version stays alive for this session, whatever the registry does
        return session

    def get(self, session_id: str) -> Session:
        """The open session ``session_id``, marked as used now."""
        with self._lock:
            now = self._clock()
            session = self._sessions.get(session_id)
            if session is not None and self._idle(session, now):
                self._expire(session_id)
                session = None
            if session is None:
                if session_id in self._expired:
                    raise SessionNotFound(f"session {session_id!r} expired after {self.idle_timeout:g} s "
                                          "without a Step; open a new session")
                raise SessionNotFound(f"session {session_id!r} does not exist (never opened, or closed)")
            session.last_used = now
            return session

    def step(self, session: Session, index: int | None, run: StepRun) -> StepResult:
        with session.lock:
            stored = replayed(session.id, session.context.t, index, session.last)
            if stored is not None:
                return stored
            session.last = run(session.context)
            return session.last

    def find(self, key: Hashable, owner: str | None = None) -> str | None:
        """The id of the open session opened under ``key``, if any; KeyInUse if it is live and another
        ``owner``'s (another owner's idle one is not named: it is as good as gone)."""
        with self._lock:
            session = self._sessions.get(self._keys.get(key, ""))
            if session is None or session.owner in (None, owner):
                return None if session is None else session.id
            if self._idle(session, self._clock()):
                return None
            raise KeyInUse()

    def _idle(self, session: Session, now: float) -> bool:
        return now - session.last_used > self.idle_timeout

    def close(self, session_id: str) -> Closed | None:
        with self._lock:
            session = self._drop(session_id)
        return None if session is None else Closed(session.id, session.model.name, session.model.version,
                                                   session.context.t)

    def evict_idle(self) -> int:
        """Drop every session idle longer than the timeout; returns how many."""
        with self._lock:
            return self._evict_idle(self._clock())

    def _evict_idle(self, now: float) -> int:
        stale = [sid for sid, s in self._sessions.items() if self._idle(s, now)]
        for sid in stale:
            self._expire(sid)
        return len(stale)

    def _expire(self, session_id: str) -> None:
        self._drop(session_id)
        self._expired[session_id] = None
        while len(self._expired) > self._remember:
            self._expired.popitem(last=False)

    def _drop(self, session_id: str) -> Session | None:
        """Remove a session and its key (under the lock) and let go of its model version."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            if session.key is not None and self._keys.get(session.key) == session_id:
                del self._keys[session.key]
            session.model.unpin()
        return session


def check_limits(max_sessions: int, idle_timeout: float) -> None:
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")


# Redis keeps, per session, a hash {prefix}s:<id> (model, version, ctx, t, last, keyname, owner) that
# expires after the idle timeout, and one sorted set {prefix}open of session ids scored by last
# use (milliseconds of Redis's own clock), which bounds the open sessions across every process.
# A session opened under a key also has {prefix}k:<key> -> its id, expiring with it.
# Each script runs atomically in Redis. Keys a damaged record may have turned into another type are
# read with redis.pcall, so that a script still answers (and CLOSE still closes).
_NOW = "local now = redis.call('TIME'); local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)\n"

_OPEN = _NOW + """
-- KEYS: open set, session hash. ARGV: idle ms, max, id, model, version, ctx, key name ('' for none), prefix,
-- owner ('' for none). Returns -1 (opened), -2 (the key names a live session of another owner) or the
-- number of open sessions (the maximum is reached).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[1]))
local old = ARGV[7] ~= '' and redis.pcall('GET', ARGV[7])
if type(old) ~= 'string' then old = false end
if old then  -- the key's earlier session is replaced, unless it is another owner's (a live hash)
  local owner = redis.pcall('HGET', ARGV[8] .. 's:' .. old, 'owner')
  if type(owner) == 'string' and owner ~= '' and owner ~= ARGV[9] then return -2 end
end
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then return open end
if old then
  redis.call('DEL', ARGV[8] .. 's:' .. old)
  redis.call('ZREM', KEYS[1], old)
end
if ARGV[7] ~= '' then redis.call('SET', ARGV[7], ARGV[3], 'PX', ARGV[1]) end
redis.call('ZADD', KEYS[1], ms, ARGV[3])
redis.call('HSET', KEYS[2], 'model', ARGV[4], 'version', ARGV[5], 'ctx', ARGV[6], 't', 0, 'keyname', ARGV[7],
           'owner', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return -1
"""

_FIND = """
-- KEYS: key name. ARGV: prefix, owner. The id of the key's open session; -2 if it is another owner's.
local id = redis.pcall('GET', KEYS[1])
if type(id) ~= 'string' then return false end
local session = ARGV[1] .. 's:' .. id
local owner = redis.pcall('HGET', session, 'owner')
if type(owner) == 'string' and owner ~= '' and owner ~= ARGV[2] then return -2 end
if not owner and redis.call('EXISTS', session) == 0 then return false end  -- expired just now
return id
"""

_STEP = _NOW + """
-- KEYS: session hash, open set. ARGV: the step's index t, new ctx, its answer, idle ms, id.
-- Appends only if the session is still at step t; else returns where it is and its last answer:
-- {-1, nil} when it is gone, {-2, nil} when its record holds no step count (damaged).
local t = redis.pcall('HGET', KEYS[1], 't')
if not t then return {redis.call('EXISTS', KEYS[1]) == 1 and -2 or -1, false} end
t = type(t) == 'string' and tonumber(t)
if not t or t < 0 or t ~= math.floor(t) then return {-2, false} end
if t ~= tonumber(ARGV[1]) then return {t, redis.call('HGET', KEYS[1], 'last')} end
redis.call('HSET', KEYS[1], 'ctx', ARGV[2], 'last', ARGV[3], 't', tonumber(ARGV[1]) + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local keyname = redis.call('HGET', KEYS[1], 'keyname')
if keyname and keyname ~= '' then redis.call('PEXPIRE', keyname, ARGV[4]) end
redis.call('ZADD', KEYS[2], ms, ARGV[5])
return {tonumber(ARGV[1]) + 1, false}
"""

_CLOSE = """
-- KEYS: session hash, open set. ARGV: id. Returns {model, t, version} as stored ('' where absent), or
-- nil if there was no session. A damaged record (missing fields, another type of key) is closed too.
redis.call('ZREM', KEYS[2], ARGV[1])
local h = redis.pcall('HMGET', KEYS[1], 'model', 't', 'keyname', 'version')
if redis.call('DEL', KEYS[1]) == 0 then return false end
if h.err then h = {} end
if h[3] and h[3] ~= '' and redis.pcall('GET', h[3]) == ARGV[1] then redis.call('DEL', h[3]) end
return {h[1] or '', h[2] or '', h[4] or ''}
"""
OPEN_KEY_IN_USE = STEP_DAMAGED = -2  # what the scripts above answer for those cases


STORE_SCHEMES = ("redis", "rediss", "unix")  # the URL forms redis-py connects to


def redacted(url: str) -> str:
    """What messages and logs call the store at ``url``: where it is (host and port, or socket path) and its
    db, built from the connection settings redis-py parses out of the URL, so no user name, password (in
    the userinfo or the query) or other option of any URL form ever appears. Not a store URL: its scheme,
    host and path only."""
    parts = urlsplit(url)
    try:
        if parts.scheme not in STORE_SCHEMES:
            raise ValueError(parts.scheme)
        from redis.connection import parse_url  # the redis extra: imported only for a Redis store

        kwargs = parse_url(url)
    except ValueError:  # an unknown scheme, or a URL that redis-py cannot parse (a bad port, db or option)
        try:
            host = (parts.hostname or "") + (f":{parts.port}" if parts.port is not None else "")
        except ValueError:  # a port that is not a number
            host = parts.hostname or ""
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"{parts.scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def store_failure(exc: Exception, timeout: float) -> tuple[str, str]:
    """(metric reason, words) for a failed store call. Never redis-py's own text, which may quote the URL."""
    import redis

    if isinstance(exc, redis.exceptions.TimeoutError):
        return "timeout", f"did not answer within {timeout:g} s (hung or overloaded?)"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "auth", "refused the credentials given in the --session-store URL"
    cause = exc.__cause__ or exc.__context__
    reason = f" ({os.strerror(cause.errno)})" if isinstance(cause, OSError) and cause.errno else ""
    return "connection", f"is unreachable{reason}"


class RedisSessionStore:
    """Sessions in Redis (``redis://HOST:PORT/DB``, ``rediss://`` for TLS, a password in the URL),
    shared by every server process attached to it. ``resolve(name, version)`` is the LoadedModel
    of a session's version in this process (the registry's ``get``)."""

    shared = True

    def __init__(self, url: str, resolve: Callable[[str, int], LoadedModel], max_sessions: int = 1024,
                 idle_timeout: float = 300.0, prefix: str = "batchrl:", timeout: float = 0.5,
                 guard: GuardLimits = GuardLimits(), metrics: Metrics | None = None):
        """``timeout``: seconds one call may take; ``guard``: the calls in flight and the breaker (store_guard.py);
        ``metrics``: where refused and failed calls are counted."""
        import redis  # the redis extra: imported only when a Redis store is asked for
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        check_limits(max_sessions, idle_timeout)
        if not timeout > 0:
            raise ValueError(f"--store-timeout must be > 0 seconds, got {timeout}")
        self.url, self.prefix = redacted(url), prefix  # url: the store's name, never its password
        self.max_sessions, self.idle_timeout = max_sessions, idle_timeout
        self._resolve = resolve
        self._timeout, self._metrics = timeout, metrics
        # One immediate retry on a connection error replaces a pooled connection that a restarted Redis
        # dropped; a timeout is never retried (a hung store would hold the thread twice as long). The
        # guard keeps the connections in use to its cap, so the pool needs no more.
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
                                           max_connections=guard.max_in_flight)
        self._down = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._guard = StoreGuard(guard, self._down, on_change=self._breaker_changed)
        self._open_script = self._redis.register_script(_OPEN)
        self._step_script = self._redis.register_script(_STEP)
        self._close_script = self._redis.register_script(_CLOSE)
        self._find_script = self._redis.register_script(_FIND)
        self._damaged_log = RateLimitedLog(log)  # damaged records: a line once in a while, not one per call
        self._open_set = prefix + "open"
        self._idle_ms = max(1, round(idle_timeout * 1000))

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _keyname(self, key: Hashable) -> str:
        return f"{self.prefix}k:{key!r}"

    def _call(self, fn, *args, **kwargs):
        """Every Redis call of the store goes through here: the guard (in-flight cap, breaker), and
        UNAVAILABLE naming the store by host, port and db when it is down, hung or refused."""
        later = "; stateless Act still works, sessions do not until it is back"
        try:
            return self._guard.call(fn, *args, **kwargs)
        except Refused as refused:
            if self._metrics is not None:
                self._metrics.store_refused.labels(refused.reason).inc()
            limits = self._guard.limits
            if refused.reason == BREAKER_OPEN:
                raise Unavailable(f"the session store at {self.url} is failing ({limits.failures} calls in a row "
                                  f"failed): session calls are refused at once, and one call tries it every "
                                  f"{limits.cooldown:g} s{later}") from None
            raise Unavailable(f"the session store at {self.url} already has {limits.max_in_flight} calls waiting "
                              f"on it (the most allowed: --store-max-in-flight): retry shortly{later}") from None
        except self._down as exc:
            reason, words = store_failure(exc, self._timeout)
            if self._metrics is not None:
                self._metrics.store_failures.labels(reason).inc()
            raise Unavailable(f"the session store at {self.url} {words}{later}") from None

    def _breaker_changed(self, opened: bool) -> None:
        if opened:
            limits = self._guard.limits
            log.warning("the session store at %s is failing (%d calls in a row failed): session calls are refused "
                        "at once, and one call tries it every %g s", self.url, limits.failures, limits.cooldown)
        else:
            log.info("the session store at %s answers again: session calls reach it again", self.url)

    def __len__(self) -> int:
        cutoff = time.time() * 1000 - self._idle_ms
        return int(self._call(self._redis.zcount, self._open_set, cutoff, "+inf"))

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None,
             owner: str | None = None) -> Session:
        context = new_context(model, target_return)
        session_id = uuid.uuid4().hex
        keyname = "" if key is None else self._keyname(key)
        refused = int(self._call(self._open_script, keys=[self._open_set, self._key(session_id)],
                                 args=[self._idle_ms, self.max_sessions, session_id, model.name, model.version,
                                       context.pack(), keyname, self.prefix, owner or ""]))
        if refused == OPEN_KEY_IN_USE:
            raise KeyInUse()
        if refused >= 0:
            raise too_many(refused, self.max_sessions)
        return Session(session_id, model, context, time.monotonic(), key, owner=owner)

    def get(self, session_id: str) -> Session:
        from redis.exceptions import ResponseError  # the redis extra, imported with the store

        try:
            fields = self._call(self._redis.hgetall, self._key(session_id))
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            raise self._damaged(session_id, "it is not a hash") from None
        if not fields:
            raise SessionNotFound(f"session {session_id!r} does not exist (never opened, closed, or expired after "
                                  f"{self.idle_timeout:g} s without a Step)")
        try:
            return self._parse(session_id, fields)
        except ValueError as exc:
            raise self._damaged(session_id, str(exc)) from None

    def _parse(self, session_id: str, fields: dict[bytes, bytes]) -> Session:
        """The session a record holds; ValueError saying what in it does not parse."""
        name, version = record_field(fields, "model", bytes.decode), record_field(fields, "version", model_version)
        try:
            model = self._resolve(name, version)
        except NotFound:
            raise FailedPrecondition(f"session {session_id} is pinned to model {name!r} version {version}, which is "
                                     "not loaded in this server process: load it here, or step where it is "
                                     "loaded") from None
        context = record_field(fields, "ctx", lambda raw: unpack_context(model, raw))
        if (t := record_field(fields, "t", int)) != context.t:
            raise ValueError(f"its step count {t} is not its context's ({context.t})")
        last = record_field(fields, "last", lambda raw: StepResult.unpack(raw, model.action_shape), optional=True)
        if last is not None and last.timestep != t - 1:
            raise ValueError(f"its last answer is of step {last.timestep}, not of step {t - 1}")
        keyname = record_field(fields, "keyname", bytes.decode, optional=True)
        if keyname and not keyname.startswith(self.prefix + "k:"):  # the step script refreshes that key's expiry
            raise ValueError(f"its key name {quoted_text(keyname)} is not one of this store's keys")
        owner = record_field(fields, "owner", bytes.decode, optional=True)
        return Session(session_id, model, context, time.monotonic(), keyname or None, last, owner=owner or None)

    def _damaged(self, session_id: str, why: str) -> DataLoss:
        """DATA_LOSS for a session whose record does not parse (said once in a while in the log: the store
        was written by something else than this server, or damaged)."""
        self._damaged_log.warning("damaged", "session %s: its record in the session store does not parse (%s); "
                                  "it answers DATA_LOSS until it is closed or expires", session_id, why)
        return DataLoss(f"session {session_id}: its record in the session store is damaged ({why}), so its episode "
                        "cannot go on: close it (CloseSession) and open a new session")

    def step(self, session: Session, index: int | None, run: StepRun) -> StepResult:
        if index is None:
            raise FailedPrecondition(f"session {session.id} lives in a shared session store: send each step's index "
                                     "(0 for the first step) so that a retried step is answered once")
        t = session.context.t
        stored = replayed(session.id, t, index, session.last)
        if stored is not None:
            return stored
        result = run(session.context)
        now_at, last = self._call(self._step_script, keys=[self._key(session.id), self._open_set],
                                  args=[t, session.context.pack(), result.pack(), self._idle_ms, session.id])
        if now_at == t + 1 and last is None:
            session.last = result  # a retry on this same session object gets it back
            return result  # this write appended the step
        if now_at == -1:
            raise SessionNotFound(f"session {session.id!r} was closed or expired while its step ran")
        if now_at == STEP_DAMAGED:
            raise self._damaged(session.id, "its step count is missing or not a step")
        if now_at == t + 1:  # the same step was appended by a concurrent retry: its answer stands
            try:
                return StepResult.unpack(last, session.model.action_shape)
            except (ValueError, struct.error):
                raise self._damaged(session.id, "its last answer does not parse") from None
        raise FailedPrecondition(f"session {session.id}: step {index} was overtaken while it ran (the session is now "
                                 f"at step {now_at})")

    def find(self, key: Hashable, owner: str | None = None) -> str | None:
        """The id of the open session opened under ``key``, if any; KeyInUse if another ``owner``'s."""
        found = self._call(self._find_script, keys=[self._keyname(key)], args=[self.prefix, owner or ""])
        if found == OPEN_KEY_IN_USE:
            raise KeyInUse()
        return None if found is None else found.decode()

    def close(self, session_id: str) -> Closed | None:
        """Closes whatever the session's record holds, a damaged one too (its figures then read 0)."""
        closed = self._call(self._close_script, keys=[self._key(session_id), self._open_set], args=[session_id])
        if not closed:
            return None
        model, steps, version = closed
        return Closed(session_id, model.decode(errors="replace"), count(version), count(steps))

    def evict_idle(self) -> int:
        """Forget the ids of sessions idle past the timeout (their hashes expire by themselves)."""
        cutoff = time.time() * 1000 - self._idle_ms
        return int(self._call(self._redis.zremrangebyscore, self._open_set, "-inf", cutoff))


def record_field(fields: dict[bytes, bytes], name: str, parse: Callable[[bytes], object], optional: bool = False):
    """``parse`` of a Redis session record's field ``name`` (None when ``optional`` and absent); ValueError
    saying which field is missing or does not parse."""
    raw = fields.get(name.encode())
    if raw is None:
        if optional:
            return None
        raise ValueError(f"it has no {name!r} field")
    try:
        return parse(raw)
    except (ValueError, IndexError, struct.error) as exc:  # what bytes that are no such value raise
        raise ValueError(f"its {name!r} field does not parse: {quoted_text(str(exc))}") from None


def model_version(raw: bytes) -> int:
    version = int(raw)
    if not 1 <= version < 2**63:
        raise ValueError(f"{version} is not a model version")
    return version


def count(raw: bytes) -> int:
    """A stored count, or 0 where a damaged record holds none."""
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def quoted_text(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters for a message (what a damaged field holds may be long)."""
    return text if len(text) <= limit else text[:limit] + "..."


def open_session_store(spec: str, resolve: Callable[[str, int], LoadedModel], max_sessions: int = 1024,
                       idle_timeout: float = 300.0, prefix: str = "batchrl:", processes: int = 1,
                       timeout: float = 0.5, guard: GuardLimits = GuardLimits(),
                       metrics: Metrics | None = None) -> Sessions:
    """The store ``spec`` names: "memory" (this process) or a redis://, rediss:// or unix:// URL, which must
    answer. ``resolve(name, version)``: a loaded model version (the registry's ``get``); ``processes``: how
    many server processes share the port (more than one: the in-process store opens no session);
    ``timeout``, ``guard``, ``metrics``: the Redis store's (RedisSessionStore)."""
    if spec == "memory":
        return SessionStore(max_sessions, idle_timeout, refuse=None if processes == 1 else memory_refusal(processes))
    name = redacted(spec)
    if urlsplit(spec).scheme not in STORE_SCHEMES:
        raise UserError(f"--session-store {name!r}: expected memory, redis://HOST:PORT/DB, rediss://HOST:PORT/DB "
                        "or unix://PATH?db=DB")
    import redis
    from redis.connection import parse_url

    try:
        db = parse_url(spec).get("db", 0)
    except ValueError:  # redis-py's words may quote the URL, password and all
        raise UserError(f"--session-store {name}: not a valid Redis URL (a bad port, db or option?): expected "
                        "redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix://PATH?db=DB") from None
    store = RedisSessionStore(spec, resolve, max_sessions, idle_timeout, prefix, timeout, guard, metrics)
    try:
        len(store)
    except Unavailable as exc:
        raise UserError(str(exc)) from None
    except redis.exceptions.ResponseError as exc:  # the Redis server's own reply: it quotes no URL
        if "DB index is out of range" in str(exc):
            raise UserError(f"--session-store {name}: the Redis server has no db {db} (it has as many as its "
                            "`databases` setting, 16 by default, numbered from 0)") from None
        raise UserError(f"--session-store {name}: the Redis server refused the store: {exc}") from None
    return store


def memory_refusal(processes: int) -> str:
    return (f"sessions need a shared store with --workers {processes}: a session in one process's memory could not "
            f"take its next Step in another; start the server with --session-store redis://HOST:PORT/DB")
