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
exactly as long as its session, so the keys are bounded by the same rules.

Steps are exactly-once when the caller sends each step's index (0 for the first): the expected
index runs; a retry of the step just answered gets the stored answer back without appending to
the context twice (in Redis, whichever process the retry lands on, and also while the original
is still running: the writer that loses the conditional write returns the winner's answer); any
other index is refused naming both.
"""
from __future__ import annotations

import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from batchrl.errors import UserError
from batchrl.protos.sequence import RollingContext, check_reward
from batchrl.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from batchrl.serving.runtime import LoadedModel


class SessionNotFound(NotFound):
    """Unknown, closed or expired session id."""


class TooManySessions(ResourceExhausted):
    """The session limit is reached."""


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

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None) -> Session: ...

    def get(self, session_id: str) -> Session: ...

    def step(self, session: Session, index: int | None, run: StepRun) -> StepResult: ...

    def find(self, key: Hashable) -> str | None: ...

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
    return RollingContext.unpack(model.context_spec, data) if model.is_sequence else EpisodeSteps.unpack(data)


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

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None) -> Session:
        """A new session (``target_return``: sequence policies only); one opened under ``key`` replaces the session that key named."""
        if self.refuse:
            raise FailedPrecondition(self.refuse)
        context = new_context(model, target_return)
        if key is not None:
            self.close(self._keys.get(key, ""))
        with self._lock:
            now = self._clock()
            if len(self._sessions) >= self.max_sessions:
                self._evict_idle(now)
            if len(self._sessions) >= self.max_sessions:
                raise too_many(len(self._sessions), self.max_sessions)
            session = Session(uuid.uuid4().hex, model, context, now, key)
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
            if session is not None and now - session.last_used > self.idle_timeout:
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

    def find(self, key: Hashable) -> str | None:
        """The id of the open session opened under ``key``, if any."""
        return self._keys.get(key)

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
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
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


# Redis keeps, per session, a hash {prefix}s:<id> (model, version, ctx, t, last, keyname) that
# expires after the idle timeout, and one sorted set {prefix}open of session ids scored by last
# use (milliseconds of Redis's own clock), which bounds the open sessions across every process.
# Each script runs atomically in Redis.
_NOW = "local now = redis.call('TIME'); local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)\n"

_OPEN = _NOW + """
-- KEYS: open set, session hash. ARGV: idle ms, max, id, model, version, ctx, key name ('' for none), prefix
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[1]))
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then return open end
if ARGV[7] ~= '' then  -- the key's earlier session is replaced
  local old = redis.call('GET', ARGV[7])
  if old then
    redis.call('DEL', ARGV[8] .. 's:' .. old)
    redis.call('ZREM', KEYS[1], old)
  end
  redis.call('SET', ARGV[7], ARGV[3], 'PX', ARGV[1])
end
redis.call('ZADD', KEYS[1], ms, ARGV[3])
redis.call('HSET', KEYS[2], 'model', ARGV[4], 'version', ARGV[5], 'ctx', ARGV[6], 't', 0, 'keyname', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return -1
"""

_STEP = _NOW + """
-- KEYS: session hash, open set. ARGV: the step's index t, new ctx, its answer, idle ms, id.
-- Appends only if the session is still at step t; else returns where it is and its last answer.
local t = redis.call('HGET', KEYS[1], 't')
if not t then return {-1, false} end
if tonumber(t) ~= tonumber(ARGV[1]) then return {tonumber(t), redis.call('HGET', KEYS[1], 'last')} end
redis.call('HSET', KEYS[1], 'ctx', ARGV[2], 'last', ARGV[3], 't', tonumber(ARGV[1]) + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local keyname = redis.call('HGET', KEYS[1], 'keyname')
if keyname and keyname ~= '' then redis.call('PEXPIRE', keyname, ARGV[4]) end
redis.call('ZADD', KEYS[2], ms, ARGV[5])
return {tonumber(ARGV[1]) + 1, false}
"""

_CLOSE = """
-- KEYS: session hash, open set. ARGV: id.
local h = redis.call('HMGET', KEYS[1], 'model', 't', 'keyname', 'version')
redis.call('ZREM', KEYS[2], ARGV[1])
if not h[1] then return false end
redis.call('DEL', KEYS[1])
if h[3] and h[3] ~= '' and redis.call('GET', h[3]) == ARGV[1] then redis.call('DEL', h[3]) end
return {h[1], h[2], h[4]}
"""


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisSessionStore:
    """Sessions in Redis (``redis://HOST:PORT/DB``, ``rediss://`` for TLS, a password in the URL),
    shared by every server process attached to it. ``resolve(name, version)`` is the LoadedModel
    of a session's version in this process (the registry's ``get``)."""

    shared = True

    def __init__(self, url: str, resolve: Callable[[str, int], LoadedModel], max_sessions: int = 1024,
                 idle_timeout: float = 300.0, prefix: str = "batchrl:", timeout: float = 2.0):
        import redis  # the redis extra: imported only when a Redis store is asked for

        check_limits(max_sessions, idle_timeout)
        self.url, self.prefix = redacted(url), prefix
        self.max_sessions, self.idle_timeout = max_sessions, idle_timeout
        self._resolve = resolve
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._down = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._open_script = self._redis.register_script(_OPEN)
        self._step_script = self._redis.register_script(_STEP)
        self._close_script = self._redis.register_script(_CLOSE)
        self._open_set = prefix + "open"
        self._idle_ms = max(1, round(idle_timeout * 1000))

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _keyname(self, key: Hashable) -> str:
        return f"{self.prefix}k:{key!r}"

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._down as exc:
            raise Unavailable(f"the session store at {self.url} is unreachable ({exc}); stateless Act still "
                              "works, sessions do not until it is back") from None

    def __len__(self) -> int:
        cutoff = time.time() * 1000 - self._idle_ms
        return int(self._call(self._redis.zcount, self._open_set, cutoff, "+inf"))

    def open(self, model: LoadedModel, target_return: float | None, key: Hashable | None = None) -> Session:
        context = new_context(model, target_return)
        session_id = uuid.uuid4().hex
        keyname = "" if key is None else self._keyname(key)
        refused = self._call(self._open_script, keys=[self._open_set, self._key(session_id)],
                             args=[self._idle_ms, self.max_sessions, session_id, model.name, model.version,
                                   context.pack(), keyname, self.prefix])
        if int(refused) >= 0:
            raise too_many(int(refused), self.max_sessions)
        return Session(session_id, model, context, time.monotonic(), key)

    def get(self, session_id: str) -> Session:
        fields = self._call(self._redis.hgetall, self._key(session_id))
        if not fields:
            raise SessionNotFound(f"session {session_id!r} does not exist (never opened, closed, or expired after "
                                  f"{self.idle_timeout:g} s without a Step)")
        name, version = fields[b"model"].decode(), int(fields[b"version"])
        try:
            model = self._resolve(name, version)
        except NotFound:
            raise FailedPrecondition(f"session {session_id} is pinned to model {name!r} version {version}, which is "
                                     "not loaded in this server process: load it here, or step where it is "
                                     "loaded") from None
        context = unpack_context(model, fields[b"ctx"])
        last = StepResult.unpack(fields[b"last"], model.action_shape) if b"last" in fields else None
        keyname = fields.get(b"keyname", b"").decode()
        return Session(session_id, model, context, time.monotonic(), keyname or None, last)

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
        if now_at == t + 1:  # the same step was appended by a concurrent retry: its answer stands
            return StepResult.unpack(last, session.model.action_shape)
        raise FailedPrecondition(f"session {session.id}: step {index} was overtaken while it ran (the session is now "
                                 f"at step {now_at})")

    def find(self, key: Hashable) -> str | None:
        found = self._call(self._redis.get, self._keyname(key))
        return None if found is None else found.decode()

    def close(self, session_id: str) -> Closed | None:
        closed = self._call(self._close_script, keys=[self._key(session_id), self._open_set], args=[session_id])
        if not closed:
            return None
        return Closed(session_id, closed[0].decode(), int(closed[2]), int(closed[1]))

    def evict_idle(self) -> int:
        """Forget the ids of sessions idle past the timeout (their hashes expire by themselves)."""
        cutoff = time.time() * 1000 - self._idle_ms
        return int(self._call(self._redis.zremrangebyscore, self._open_set, "-inf", cutoff))


def open_session_store(spec: str, resolve: Callable[[str, int], LoadedModel], max_sessions: int = 1024,
                       idle_timeout: float = 300.0, prefix: str = "batchrl:", processes: int = 1) -> Sessions:
    """The store ``spec`` names: "memory" (this process) or a redis:// or rediss:// URL, which must answer.
    ``resolve(name, version)``: a loaded model version (the registry's ``get``); ``processes``: how many
    server processes share the port (more than one: the in-process store opens no session)."""
    if spec == "memory":
        return SessionStore(max_sessions, idle_timeout, refuse=None if processes == 1 else memory_refusal(processes))
    if urlsplit(spec).scheme not in ("redis", "rediss"):
        raise UserError(f"--session-store {spec!r}: expected memory, redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    store = RedisSessionStore(spec, resolve, max_sessions, idle_timeout, prefix)
    try:
        len(store)
    except Unavailable as exc:
        raise UserError(str(exc)) from None
    return store


def memory_refusal(processes: int) -> str:
    return (f"sessions need a shared store with --workers {processes}: a session in one process's memory could not "
            f"take its next Step in another; start the server with --session-store redis://HOST:PORT/DB")
