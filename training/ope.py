"""Off-policy evaluation: fitted Q evaluation (FQE, Le et al. 2019) of a deterministic policy on a dataset.

FQE fits Q^π(s, a) by regression on the dataset's transitions towards r + γ·(1 − terminated)·Q̄(s′, π(s′)),
with Q̄ a copy of Q refreshed every ``target_update`` steps, and estimates the policy's discounted value as
the mean of Q(s₀, π(s₀)) over the episodes' first states. The estimate is in the dataset's reward units (a
discounted return, not a normalised score). Truncated episode ends bootstrap (they are not terminal).

Uncertainty: a percentile bootstrap over ``bootstrap`` FQE refits, each on the episodes resampled with
replacement (replicate b draws its episodes from a generator seeded ``seed + 1 + b``, so two policies
evaluated with the same seed see the same replicates).

The policy is given as a function of raw observations [N, obs_dim] -> raw actions [N, act_dim] (numpy), e.g.
an exported model run by onnxruntime; it is called once on every next observation and first observation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from batchrl.training.data import OfflineDataset
from batchrl.training.device import resolve_device
from batchrl.training.networks import mlp
from batchrl.training.sampling import Normalizer, on_device

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FQEConfig:
    gamma: float = 0.99
    steps: int = 20_000          # gradient steps per fit
    batch_size: int = 256
    lr: float = 1e-4
    hidden: tuple[int, ...] = (256, 256)
    target_update: int = 100     # steps between refreshes of the target network (a hard copy)
    bootstrap: int = 10          # refits on episode-resampled data for the interval (0: no interval)
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}: FQE's Q has no time input, so an "
                             "undiscounted value (gamma = 1) is not defined for it")
        for name in ("steps", "batch_size", "target_update"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass
class Estimate:
    value: float                 # FQE on the whole dataset
    low: float | None            # percentile interval over the bootstrap replicates
    high: float | None
    replicates: list[float] = field(default_factory=list)
    gamma: float = 0.99
    bootstrap: int = 0
    confidence: float = 0.95

    @property
    def method(self) -> str:
        if not self.replicates:
            return "no interval (bootstrap = 0)"
        return (f"{self.confidence:.0%} percentile bootstrap over B={self.bootstrap} FQE refits on "
                "episode-resampled data")


class PolicyData:
    """The dataset's tensors for FQE (the raw arrays: on the CPU, the dataset cache's mapping) with the policy's
    raw actions at every next state and first state; batches are normalised as they are drawn, as the
    samplers' are (``sampling.Normalizer``)."""

    def __init__(self, data: OfflineDataset, policy: Policy, device: torch.device, chunk: int = 4096):
        mean, std = data.observation_stats()
        self.normalize = Normalizer(data, mean, std, device)
        self.obs, self.next_obs = on_device(data.observations, device), on_device(data.next_observations, device)
        self.actions = on_device(data.actions, device)
        scale = float(np.abs(data.rewards).max()) or 1.0
        self.reward_scale = scale  # rewards are fitted divided by it, values multiplied back
        self.rewards = on_device(data.rewards, device) / scale
        self.terminals = on_device(data.terminations, device)
        self.next_actions = on_device(_batched(policy, np.asarray(data.next_observations), chunk), device)
        first = np.asarray(data.observations)[data.episode_starts]
        self.first = self.inputs(on_device(first, device), on_device(_batched(policy, first, chunk), device))
        self.starts, self.lengths = data.episode_starts, data.episode_lengths
        self.obs_dim, self.act_dim = data.obs_dim, data.act_dim
        self.device = device

    def inputs(self, raw_obs: torch.Tensor, raw_actions: torch.Tensor) -> torch.Tensor:
        """Q's input: the normalised observations and scaled actions, side by side."""
        return torch.cat([self.normalize.observations(raw_obs), self.normalize.actions(raw_actions)], 1)


def _batched(policy: Policy, obs: np.ndarray, chunk: int) -> np.ndarray:
    out = [np.asarray(policy(obs[i:i + chunk].astype(np.float32)), dtype=np.float32)
           for i in range(0, len(obs), chunk)]
    actions = np.concatenate(out)
    if actions.shape[0] != obs.shape[0]:
        raise ValueError(f"the policy answered {actions.shape[0]} actions for {obs.shape[0]} observations")
    return actions.reshape(len(obs), -1)


def fit(pd: PolicyData, config: FQEConfig, episodes: np.ndarray, seed: int, progress=None) -> float:
    """One FQE fit on the transitions of ``episodes`` (indices, repeats allowed); the estimated value."""
    index = torch.as_tensor(np.concatenate([np.arange(pd.starts[e], pd.starts[e] + pd.lengths[e])
                                            for e in episodes]), device=pd.device)
    torch.manual_seed(seed)
    q = mlp(pd.obs_dim + pd.act_dim, 1, tuple(config.hidden)).to(pd.device)
    target = mlp(pd.obs_dim + pd.act_dim, 1, tuple(config.hidden)).to(pd.device)
    target.load_state_dict(q.state_dict())
    target.requires_grad_(False)
    optimizer = torch.optim.Adam(q.parameters(), lr=config.lr)
    generator = torch.Generator(device=pd.device).manual_seed(seed)
    for step in range(config.steps):
        if step % config.target_update == 0:
            target.load_state_dict(q.state_dict())
        i = index[torch.randint(len(index), (config.batch_size,), generator=generator, device=pd.device)]
        with torch.no_grad():
            bootstrap = target(pd.inputs(pd.next_obs[i], pd.next_actions[i])).squeeze(1)
            y = pd.rewards[i] + config.gamma * (1.0 - pd.terminals[i]) * bootstrap
        loss = nn.functional.mse_loss(q(pd.inputs(pd.obs[i], pd.actions[i])).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(1)
    first = torch.as_tensor(episodes, device=pd.device)
    with torch.no_grad():
        values = q(pd.first[first]).squeeze(1)
    return float(values.double().mean()) * pd.reward_scale


def replicate_episodes(n_episodes: int, config: FQEConfig) -> list[np.ndarray]:
    """The bootstrap replicates' episodes: replicate b resamples with a generator seeded seed + 1 + b."""
    return [np.random.default_rng(config.seed + 1 + b).integers(n_episodes, size=n_episodes)
            for b in range(config.bootstrap)]


def estimate(data: OfflineDataset, policy: Policy, config: FQEConfig = FQEConfig(), device: str = "cpu",
             progress: bool = True) -> Estimate:
    """FQE's estimate of ``policy``'s discounted value on ``data``, with its bootstrap interval."""
    from tqdm.auto import tqdm

    pd = PolicyData(data, policy, resolve_device(device))
    every = np.arange(len(data.episode_starts))
    with tqdm(total=config.steps * (1 + config.bootstrap), desc="FQE", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        value = fit(pd, config, every, config.seed, bar)
        replicates = [fit(pd, config, episodes, config.seed + 1 + b, bar)
                      for b, episodes in enumerate(replicate_episodes(len(every), config))]
    low = high = None
    if replicates:
        tail = (1.0 - config.confidence) / 2 * 100
        low, high = (float(v) for v in np.percentile(replicates, [tail, 100 - tail]))
    return Estimate(value, low, high, replicates, config.gamma, config.bootstrap, config.confidence)


@dataclass
class Comparison:
    candidate: Estimate
    deployed: Estimate
    difference: float            # candidate − deployed, fits on the whole dataset
    low: float | None            # percentile interval of the paired replicate differences
    high: float | None

    @property
    def better(self) -> bool:
        """The gate: the interval's lower bound of candidate − deployed is above 0."""
        return self.low is not None and self.low > 0


def compare(data: OfflineDataset, candidate: Policy, deployed: Policy, config: FQEConfig, device: str = "cpu",
            progress: bool = True) -> Comparison:
    """Both policies estimated with the same settings on the same data and the same bootstrap replicates (the
    same resampled episodes and fit seeds); the interval is over the replicates' paired differences."""
    if config.bootstrap < 2:
        raise ValueError(f"a paired comparison needs bootstrap >= 2 replicates, got {config.bootstrap}")
    c = estimate(data, candidate, config, device, progress)
    d = estimate(data, deployed, config, device, progress)
    tail = (1.0 - config.confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(np.subtract(c.replicates, d.replicates), [tail, 100 - tail]))
    return Comparison(c, d, c.value - d.value, low, high)
