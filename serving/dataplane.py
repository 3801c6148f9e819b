"""The dataplane: what the server does, numpy in and numpy out, under every protocol it speaks.

batchrl's gRPC API (serving/server.py) and the Open Inference Protocol (serving/kserve.py) are
thin translators over it: they decode their messages into arrays, call it, and encode the answer.
It checks what a caller sent, runs the models through their batchers, keeps the sessions and the
repository, and raises the typed errors of serving/errors.py for whatever a caller got wrong.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchrl.protos.contract import MAX_VERSION
from batchrl.protos.experience import ENDINGS
from batchrl.protos.sequence import check_reward
from batchrl.serving.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from batchrl.serving.repository import Registry
from batchrl.serving.runtime import LoadedModel
from batchrl.serving.sessions import Closed, Session, Sessions, StepResult

MAX_BATCH = 65_536  # observations in one Act
MAX_NAME = 128      # characters of a model name or session id in a request


def quoted(text: str, limit: int = 64) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: a client's 16 KB name must not
    come back in full (nor push the answer past the metadata limit)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class EpisodeEnd:
    """How a closed session's episode ended: the observation its last action led to, the reward that
    action earned (None for an episode of no steps) and ``ending`` ("terminated" or "truncated")."""
    observation: np.ndarray
    reward: float | None
    ending: str


class DataPlane:
    def __init__(self, registry: Registry, sessions: Sessions, metrics=None, experience=None):
        """``experience``: where answered steps and episode ends are recorded (serving/experience.py's
        ExperienceLog, whose ``step`` and ``end`` never block), or None."""
        self.registry = registry
        self.sessions = sessions
        self.metrics = metrics
        self.experience = experience
        self.draining = False  # set when the server drains: readiness turns false

    # -- models -----------------------------------------------------------------
    def model(self, name: str, version: int | None = None) -> LoadedModel:
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"model name {quoted(name)} is longer than {MAX_NAME} characters")
        return self.registry.get(name, check_version(version))

    def load(self, name: str, version: int | None = None) -> list[LoadedModel]:
        """Load (all or nothing); an explicit load also promotes a version of another interface."""
        return self.registry.load_model(name, check_version(version))

    def unload(self, name: str) -> list[LoadedModel]:
        return self.registry.unload_model(name)

    # -- feed-forward policies ------------------------------------------------------
    def act(self, model: LoadedModel, observations: np.ndarray, deadline: float | None = None,
            noise_std: float = 0.0, seed: int | None = None, what: str = "observations") -> np.ndarray:
        """Actions [batch, *action_shape] for observations [batch, *observation_shape]."""
        if model.is_sequence:
            raise FailedPrecondition(
                f"model {model.name!r} version {model.version} is a sequence policy ({model.manifest.algorithm}): "
                "it keeps per-episode context, so open a session (OpenSession, then Step) or an Episode stream "
                "instead of calling Act")
        check_noise(noise_std)
        obs = check_observations(model, observations, what, batched=True)
        return explore(model, self._finite(model, model.infer({"observations": obs}, deadline)), noise_std, seed)

    # -- sessions: one per episode, for every policy ------------------------------------
    def open(self, model: LoadedModel, target_return: float | None = None, key=None, owner: str | None = None) \
            -> Session:
        """A session on ``model`` (under the caller's ``key`` and its ``owner``, if given: see SessionStore.open)."""
        if not model.is_sequence:
            if target_return is not None:
                raise InvalidArgument(f"model {model.name!r} is a feed-forward policy ({model.manifest.algorithm}): "
                                      "target_return applies only to sequence policies; leave it unset")
        elif target_return is None:
            if not model.manifest.HasField("default_target_return"):
                raise InvalidArgument(f"model {model.name!r} has no default target return: set target_return")
            target_return = model.manifest.default_target_return
        return self.sessions.open(model, target_return, key, owner)

    def session(self, session_id: str) -> Session:
        if len(session_id) > MAX_NAME:
            raise InvalidArgument(f"session id {quoted(session_id)} is longer than {MAX_NAME} characters")
        return self.sessions.get(session_id)

    def step(self, session: Session, observation: np.ndarray, reward: float | None,
             deadline: float | None = None, what: str = "observation", index: int | None = None,
             noise_std: float = 0.0, seed: int | None = None) -> StepResult:
        """One step: the action for ``observation`` (with Gaussian noise of ``noise_std``, as in ``act``);
        ``reward`` is what the previous action earned. ``index`` (0 for the first step) makes a retried
        step answer once (see sessions.py). A refused or failed step leaves the session as it was. The
        answer goes to the experience log, if one is kept."""
        model = session.model
        obs = check_observations(model, observation, what, batched=False)
        if index is not None and index < 0:
            raise InvalidArgument(f"step index must be >= 0, got {index}")
        check_noise(noise_std)

        def run(context) -> StepResult:
            action = explore(model, self._action(model, context, obs, reward, deadline), noise_std, seed)
            context.advance(obs, reward, action)  # the action taken, noise included
            return StepResult(action.reshape(model.action_shape), context.t - 1, context.return_to_go, model.version)

        result = self.sessions.step(session, index, run)
        if self.experience is not None:
            self.experience.step(session.id, model.name, model.version, result.timestep, obs, result.action, reward)
        return result

    def peek(self, session: Session, observation: np.ndarray, reward: float | None, deadline: float | None = None,
             what: str = "observation", index: int | None = None) -> np.ndarray:
        """The action the session's policy gives at ``observation`` after ``reward``, without stepping the
        session (nothing stored or recorded): the answer to a request that carries an episode's end.
        ``index``, if given, must be the session's next step index."""
        model = session.model
        obs = check_observations(model, observation, what, batched=False)
        if index is not None and index != session.context.t:
            raise FailedPrecondition(f"session {session.id}: the request has index {index}, but the next step's "
                                     f"index is {session.context.t}")
        return self._action(model, session.context, obs, reward, deadline).reshape(model.action_shape)

    def _action(self, model: LoadedModel, context, obs: np.ndarray, reward: float | None,
                deadline: float | None) -> np.ndarray:
        """The policy's action [1, *action_shape] for the step ``obs`` starts in ``context`` (unchanged)."""
        try:
            feeds = context.inputs(obs, reward)
        except ValueError as exc:  # the shared context's contract; here it is the caller's value
            raise InvalidArgument(str(exc)) from None
        return self._finite(model, model.infer(feeds, deadline))

    def close(self, session_id: str, end: EpisodeEnd | None = None) -> Closed:
        """Close an open session, with its episode's ``end`` if given (checked first: a refused end leaves
        the session open); NotFound (saying whether it expired) otherwise."""
        if end is not None:
            session = self.session(session_id)
            check_observations(session.model, end.observation, "final_observation", batched=False)
            if end.ending not in ENDINGS:
                raise InvalidArgument(f"ending must be one of {list(ENDINGS)} with a final observation, "
                                      f"got {end.ending!r}")
            try:
                check_reward(session.context.t, end.reward)
            except ValueError as exc:
                raise InvalidArgument(f"closing session {session_id} after {session.context.t} steps: {exc}") \
                    from None
        closed = self.sessions.close(session_id)
        if closed is None:
            self.session(session_id)  # raises NotFound, saying whether it expired
            raise NotFound(f"session {quoted(session_id)} is closed")
        if end is not None and self.experience is not None:
            self.experience.end(closed.id, closed.model_name, closed.version, closed.steps, end.observation,
                                end.reward, end.ending)
        return closed

    # -- checks -------------------------------------------------------------------------
    def _finite(self, model: LoadedModel, out: np.ndarray) -> np.ndarray:
        """``out`` (this request's rows of a model run) if every value is finite; a NaN or infinite
        action is never answered. Only the request owning such a row fails."""
        finite = np.isfinite(out)
        if finite.all():
            return out
        if self.metrics is not None:
            self.metrics.nonfinite_outputs.labels(model.name).inc()
        rows = np.flatnonzero(~finite.reshape(len(out), -1).all(axis=1))
        raise OutOfRange(f"model {model.name!r} version {model.version} gave a non-finite action (NaN or "
                         f"infinite) for row(s) {rows[:8].tolist()} of this request: the input is likely far "
                         "outside what the policy was trained on")


def check_version(version: int | None) -> int | None:
    """``version`` if it is None (the default version) or a model version, 1 to MAX_VERSION; every
    protocol's requested version passes here (the OIP's text ones parsed first by kserve.parse_version)."""
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {version} is not a model version: expected a positive integer from 1 to "
                              f"{MAX_VERSION}")
    return version


def check_noise(noise_std: float) -> None:
    if not np.isfinite(noise_std) or noise_std < 0:
        raise InvalidArgument(f"sampling.noise_std must be finite and >= 0, got {noise_std}")


def explore(model: LoadedModel, actions: np.ndarray, noise_std: float, seed: int | None) -> np.ndarray:
    """``actions`` with Gaussian noise of standard deviation ``noise_std`` drawn from ``seed``, clipped
    to the model's action bounds (``actions`` unchanged when ``noise_std`` is 0)."""
    if noise_std == 0:
        return actions
    noisy = actions + np.random.default_rng(seed).normal(0.0, noise_std, size=actions.shape).astype(np.float32)
    return np.clip(noisy, *model.action_bounds)


def check_observations(model: LoadedModel, obs: np.ndarray, what: str, batched: bool) -> np.ndarray:
    """``obs`` if it is [batch, *obs_shape] (``batched``) or one [*obs_shape], non-empty, within the
    batch cap and finite; InvalidArgument naming what is wrong otherwise."""
    check_rank(model, obs.shape, what, batched)
    if obs.shape[int(batched):] != model.observation_shape:
        raise InvalidArgument(f"{what} have shape {list(obs.shape)}; model {model.name!r} expects "
                              f"{expected_shape(model, batched)}")
    if batched and obs.shape[0] == 0:
        raise InvalidArgument(f"{what} hold an empty batch (batch size 0)")
    if batched and obs.shape[0] > MAX_BATCH:
        raise InvalidArgument(f"batch size {obs.shape[0]} exceeds the maximum of {MAX_BATCH}")
    finite = np.isfinite(obs)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        element = where[int(batched):]
        element = element[0] if len(element) == 1 else list(element)
        label = f"row {where[0]}, element {element}" if batched else f"element {element}"
        raise InvalidArgument(f"{what} must be finite: {label} is {obs[where]}")
    return obs


def check_rank(model: LoadedModel, shape: Sequence[int], what: str, batched: bool) -> None:
    """InvalidArgument naming the rank ``model`` takes when ``shape`` (of [batch, *observation_shape] if
    ``batched``, else of one observation) has another. It needs only the shape: the translators call it
    on the wire's shape before decoding, so a shape of any depth gets this answer."""
    rank = len(model.observation_shape) + int(batched)
    if len(shape) != rank:
        shown = f" (shape {list(shape)})" if len(shape) <= 8 else ""  # a deep shape is not repeated back
        raise InvalidArgument(f"{what} must have rank {rank}, got rank {len(shape)}{shown}: model {model.name!r} "
                              f"expects {expected_shape(model, batched)}")


def expected_shape(model: LoadedModel, batched: bool) -> str:
    dims = ", ".join(map(str, model.observation_shape))
    return f"[batch, {dims}]" if batched else f"[{dims}]"
