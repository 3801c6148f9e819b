"""Sequence-policy sessions: one rolling context per client, pinned to a model version.

A session holds a reference to the LoadedModel it opened on, so that version
stays loaded (and answers its Steps) for as long as the session lives, whatever
becomes the default meanwhile. Idle sessions are evicted after a timeout; the
number of open sessions is bounded. A session may also be found by a key of the
caller's (the Open Inference Protocol's sequence id): the key lives exactly as
long as its session, so the keys are bounded by the same rules.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from batchrl.protos.sequence import RollingContext
from batchrl.serving.errors import InvalidArgument, NotFound, ResourceExhausted
from batchrl.serving.runtime import LoadedModel


class SessionNotFound(NotFound):
    """Unknown, closed or expired session id."""


class TooManySessions(ResourceExhausted):
    """The session limit is reached."""


@dataclass
class Session:
    id: str
    model: LoadedModel
    context: RollingContext
    last_used: float
    key: Hashable | None = None  # the caller's name for it, if any
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one Step at a time


class Sessions(Protocol):
    """What the dataplane, the OIP translator, the sweeper and the metrics ask of a session store.
    ``SessionStore`` (in this process) is the first implementation; a shared store (e.g. on Redis,
    for several server processes) is another, with no change to the callers."""

    idle_timeout: float
    max_sessions: int

    def __len__(self) -> int: ...

    def open(self, model: LoadedModel, target_return: float, key: Hashable | None = None) -> Session: ...

    def get(self, session_id: str) -> Session: ...

    def find(self, key: Hashable) -> str | None: ...

    def close(self, session_id: str) -> Session | None: ...

    def evict_idle(self) -> int: ...


class SessionStore:
    """Sessions in this process's memory (the default store)."""

    def __init__(self, max_sessions: int = 1024, idle_timeout: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, remember_expired: int = 65_536):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
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

    def open(self, model: LoadedModel, target_return: float, key: Hashable | None = None) -> Session:
        """A new session; one opened under ``key`` replaces the session that key named."""
        try:
            context = RollingContext(model.context_spec, target_return)
        except ValueError as exc:  # the shared contract says ValueError; here it is the caller's value
            raise InvalidArgument(f"target_return: {exc}") from None
        if key is not None:
            self.close(self._keys.get(key, ""))
        with self._lock:
            now = self._clock()
            if len(self._sessions) >= self.max_sessions:
                self._evict_idle(now)
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(f"{len(self._sessions)} sessions are open, the maximum is "
                                      f"{self.max_sessions}: close finished sessions (CloseSession) and retry")
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

    def find(self, key: Hashable) -> str | None:
        """The id of the open session opened under ``key``, if any."""
        return self._keys.get(key)

    def close(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._drop(session_id)
        return session

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
