"""The input contract of sequence policies (the Decision Transformer): a rolling context.

An exported sequence model takes the last K steps of an episode, left-padded,
and returns the action for the last step. The server's sessions and the
in-process evaluation both build those inputs with ``RollingContext``, so a
served episode and a local one feed the graph exactly the same arrays.
Numpy only: both sides import it.

Graph inputs (batch axis first, K = the manifest's context_length):
  states          float32 [B, K, obs_dim]   raw observations
  actions         float32 [B, K, act_dim]   raw actions taken (zeros for the current step)
  returns_to_go   float32 [B, K, 1]         raw (unscaled) return still to collect
  timesteps       int64   [B, K]            step index within the episode (clamped to max_timestep - 1)
  attention_mask  int64   [B, K]            1 for real steps, 0 for left padding
Output: ``action`` float32 [B, act_dim], the action for the last step (named apart from the
``actions`` input; feed-forward policies map ``observations`` to ``actions``).
Padding holds zeros in every input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the graph takes float32: a larger value becomes infinite


def check_float32(value: float, what: str) -> float:
    """``value`` if it stays finite as float32 (NaN fails too), else ValueError naming ``what``."""
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{what} must be finite in float32 (|value| <= {FLOAT32_MAX:.4g}), got {value}")
    return value


def check_reward(t: int, reward: float | None) -> None:
    """The reward rule of every episode step: step ``t`` carries what the previous action earned, so the
    first step (``t`` = 0) carries none and every later one a reward finite in float32; ValueError otherwise."""
    if t == 0:
        if reward is not None:
            raise ValueError("the first step of an episode has no previous action, so no reward: send none")
        return
    if reward is None:
        raise ValueError(f"step {t}: the reward earned by the previous action is required")
    check_float32(reward, "reward")


SEQUENCE_INPUTS = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")
OUTPUT = "action"


@dataclass(frozen=True)
class ContextSpec:
    obs_dim: int
    act_dim: int
    context_length: int
    max_timestep: int

    def __post_init__(self) -> None:
        if self.context_length < 1 or self.max_timestep < 1:
            raise ValueError(f"context_length and max_timestep must be >= 1, got {self.context_length}, "
                             f"{self.max_timestep}")


class RollingContext:
    """The last K steps of one episode.

    ``inputs(observation, reward)`` gives the graph inputs for the next step
    without changing the context; ``advance(observation, reward, action)``
    appends that step once its action is known. A failed model run therefore
    leaves the context as it was. ``reward`` is what the previous action
    earned: None on the first step, required on every later one.
    """

    def __init__(self, spec: ContextSpec, target_return: float):
        check_float32(target_return, "target return")
        k = spec.context_length
        self.spec = spec
        self.states = np.zeros((k, spec.obs_dim), np.float32)
        self.actions = np.zeros((k, spec.act_dim), np.float32)
        self.returns_to_go = np.zeros((k, 1), np.float32)
        self.timesteps = np.zeros(k, np.int64)
        self.length = 0             # real steps in the window (<= K)
        self.t = 0                  # steps taken in the episode
        self.return_to_go = float(target_return)  # kept in float64; the graph gets float32

    def _next_return(self, reward: float | None) -> float:
        check_reward(self.t, reward)
        if self.t == 0:
            return self.return_to_go
        return check_float32(self.return_to_go - float(reward), f"the return-to-go after step {self.t}'s reward")

    def _appended(self, observation: np.ndarray, reward: float | None, action: np.ndarray | None):
        rtg = self._next_return(reward)
        obs = np.asarray(observation, dtype=np.float32).reshape(self.spec.obs_dim)
        states = np.roll(self.states, -1, axis=0)
        actions = np.roll(self.actions, -1, axis=0)
        returns = np.roll(self.returns_to_go, -1, axis=0)
        timesteps = np.roll(self.timesteps, -1)
        states[-1] = obs
        actions[-1] = 0.0 if action is None else action
        returns[-1] = rtg
        timesteps[-1] = min(self.t, self.spec.max_timestep - 1)
        return states, actions, returns, timesteps, rtg

    def inputs(self, observation: np.ndarray, reward: float | None) -> dict[str, np.ndarray]:
        """Graph inputs (batch of one) for the step that ``observation`` starts."""
        states, actions, returns, timesteps, _ = self._appended(observation, reward, None)
        length = min(self.length + 1, self.spec.context_length)
        mask = np.zeros(self.spec.context_length, np.int64)
        mask[self.spec.context_length - length:] = 1
        return {"states": states[None], "actions": actions[None], "returns_to_go": returns[None],
                "timesteps": timesteps[None], "attention_mask": mask[None]}

    def pack(self) -> bytes:
        """The context as bytes (for a shared session store); ``unpack`` with the same spec restores it."""
        header = np.array([self.length, self.t], np.int64).tobytes() + np.float64(self.return_to_go).tobytes()
        return header + b"".join(a.tobytes() for a in (self.states, self.actions, self.returns_to_go,
                                                         self.timesteps))

    @classmethod
    def unpack(cls, spec: ContextSpec, data: bytes) -> "RollingContext":
        context = cls(spec, 0.0)
        length, t = np.frombuffer(data[:16], np.int64)
        context.length, context.t = int(length), int(t)
        context.return_to_go = float(np.frombuffer(data[16:24], np.float64)[0])
        offset = 24
        for name in ("states", "actions", "returns_to_go", "timesteps"):
            template = getattr(context, name)
            size = template.nbytes
            chunk = data[offset:offset + size]
            if len(chunk) != size:
                raise ValueError(f"a packed context of {len(data)} bytes does not fit this spec ({spec})")
            setattr(context, name, np.frombuffer(chunk, template.dtype).reshape(template.shape).copy())
            offset += size
        if offset != len(data):
            raise ValueError(f"a packed context of {len(data)} bytes does not fit this spec ({spec})")
        return context

    def advance(self, observation: np.ndarray, reward: float | None, action: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.float32).reshape(self.spec.act_dim)
        self.states, self.actions, self.returns_to_go, self.timesteps, self.return_to_go = self._appended(
            observation, reward, action)
        self.length = min(self.length + 1, self.spec.context_length)
        self.t += 1
