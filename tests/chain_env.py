"""A Gymnasium environment whose values are known: the state s ~ U[-1, 1] is drawn afresh every step whatever
the action, the reward is s·a + a, episodes are truncated after 40 steps. A constant policy a = c earns c per
step on average, so its discounted value is c / (1 − γ) (before truncation); the best policy is a = 1."""
from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "batchrl-test/BanditChain-v0"


class BanditChain(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = self.np_random.uniform(-1, 1, size=1).astype(np.float32)
        return self.s, {}

    def step(self, action):
        a = float(np.clip(np.asarray(action, dtype=np.float32).reshape(-1)[0], -1, 1))
        reward = float(self.s[0]) * a + a
        self.s = self.np_random.uniform(-1, 1, size=1).astype(np.float32)
        return self.s, reward, False, False, {}


def register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point="tests.chain_env:BanditChain", max_episode_steps=40)


def episodes(n: int, seed: int = 0) -> list[dict]:
    """``n`` episodes of uniformly random actions."""
    from tests.conftest import play

    register()
    rng = np.random.default_rng(seed)
    return play(gym.make(ENV_ID), lambda obs: rng.uniform(-1, 1, size=1), n, seed)
