"""Episodes in an evaluation environment, and their summary.

Depends on numpy only at import time: the rollout client reuses
``run_episodes`` without pulling in torch or minari.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchrl.errors import UserError
from batchrl.protos.sequence import ContextSpec, RollingContext
from batchrl.training.data import normalized_score

# act(observation, reward) -> action. ``reward`` is what the previous action earned, None on the
# first step of an episode: stateful (sequence) policies start a new context there.
Act = Callable[[np.ndarray, "float | None"], np.ndarray]


def stateless(act_one: Callable[[np.ndarray], np.ndarray]) -> Act:
    """A feed-forward policy (observation -> action) as an ``Act``."""
    return lambda observation, reward: act_one(observation)


def sequence_agent(run: Callable[[dict], np.ndarray], spec: ContextSpec, target_return: float) -> Act:
    """A sequence policy as an ``Act``: a rolling context per episode, ``run`` maps the graph
    inputs to actions [1, act_dim] (torch in process, onnxruntime for an exported model)."""
    state: dict[str, RollingContext] = {}

    def act(observation: np.ndarray, reward: float | None) -> np.ndarray:
        if reward is None:
            state["context"] = RollingContext(spec, target_return)
        context = state["context"]
        action = run(context.inputs(observation, reward))[0]
        context.advance(observation, reward, action)
        return action

    return act


@dataclass(frozen=True)
class EvalResult:
    returns: list[float]
    lengths: list[int]
    mean_return: float
    std_return: float
    normalized_score: float | None
    normalized_std: float | None

    def summary(self) -> str:
        line = f"mean return {self.mean_return:.2f} ± {self.std_return:.2f} over {len(self.returns)} episodes"
        if self.normalized_score is not None:
            line += f"; normalised score {self.normalized_score:.1f} ± {self.normalized_std:.1f}"
        return line


def run_episodes(env, act: Act, episodes: int, seed: int, on_episode: Callable[[int, float, int], None] | None = None,
                 gamma: float = 1.0, on_end: Callable[[np.ndarray, float, bool], None] | None = None):
    """Run ``episodes`` episodes, episode i reset with seed ``seed + i``; returns (returns, lengths), the returns
    discounted by ``gamma`` (1: the plain sum of rewards). ``on_end(final_observation, reward, terminated)``
    is told how each episode ended (the observation and reward of its last step; truncated when not
    ``terminated``) before ``on_episode(i, return, length)``.

    Observations reach ``act`` as float32, the dtype that travels on the wire,
    so in-process and served evaluation see exactly the same inputs.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    returns, lengths = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, steps, done, reward, discount = 0.0, 0, False, None, 1.0
        while not done:
            action = act(np.asarray(obs, dtype=np.float32), reward)
            obs, reward, terminated, truncated, _ = env.step(action)
            reward = float(reward)
            total += discount * reward
            discount *= gamma
            steps += 1
            done = terminated or truncated
        if on_end is not None:
            on_end(np.asarray(obs, dtype=np.float32), reward, bool(terminated))
        returns.append(total)
        lengths.append(steps)
        if on_episode is not None:
            on_episode(i, total, steps)
    return returns, lengths


def summarize(returns: list[float], lengths: list[int], ref_min: float | None, ref_max: float | None) -> EvalResult:
    arr = np.asarray(returns, dtype=np.float64)
    norm = norm_std = None
    if ref_min is not None and ref_max is not None:
        scores = normalized_score(arr, ref_min, ref_max)
        norm, norm_std = float(scores.mean()), float(scores.std())
    return EvalResult(returns=[float(r) for r in arr], lengths=list(lengths), mean_return=float(arr.mean()),
                      std_return=float(arr.std()), normalized_score=norm, normalized_std=norm_std)


def evaluate(env, act: Act, episodes: int, seed: int, ref_min: float | None, ref_max: float | None) -> EvalResult:
    returns, lengths = run_episodes(env, act, episodes, seed)
    return summarize(returns, lengths, ref_min, ref_max)


def make_eval_env(dataset_id: str):
    """The dataset's (id or path) evaluation environment (Minari's recover_environment(eval_env=True))."""
    from batchrl.training.data import open_minari

    dataset = open_minari(dataset_id)
    return _making(f"the evaluation environment of {dataset_id!r}", lambda: dataset.recover_environment(eval_env=True))


def make_env(env_id: str):
    """A Gymnasium environment by id; UserError naming it when Gymnasium cannot make it."""
    import gymnasium as gym

    return _making(f"environment {env_id!r}", lambda: gym.make(env_id))


def _making(what: str, make):
    import gymnasium as gym

    try:
        return make()
    except gym.error.Error as exc:  # unknown id, missing dependency (e.g. Box2D), bad version
        raise UserError(f"cannot make {what}: {exc}") from None


def check_observation_size(env, expected: int, model: str) -> None:
    """UserError naming both sizes when ``env``'s observations are not the model's."""
    got = int(np.prod(env.observation_space.shape))
    if got != expected:
        name = env.spec.id if env.spec is not None else type(env).__name__
        raise UserError(f"environment {name!r} gives observations of size {got}, but {model} expects {expected}; "
                        "choose a matching environment with --env")
