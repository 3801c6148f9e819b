"""Behaviour cloning, with one of two policies:

- "gaussian": maximum likelihood of the dataset actions under IQL's Gaussian actor
  (tanh mean, state-independent std);
- "deterministic": mean squared error between tanh(MLP(s)) and the dataset action
  (d3rlpy's default BC, TD3+BC's actor without the Q term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchrl.training.algorithms.base import Batch, Context, OfflineAlgorithm, adam
from batchrl.training.networks import DeterministicActor, GaussianActor

POLICIES = ("gaussian", "deterministic")


@dataclass
class BCConfig:
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    batch_size: int = 256
    # one of POLICIES. Deterministic by default: on hopper/medium it scored 60.8 ± 0.1 against the
    # Gaussian likelihood's 59.2 ± 1.8 (last 3 evaluations, 2 seeds; benchmarks/results/peer-ablation.md),
    # and it is the baseline d3rlpy ships.
    policy: str = "deterministic"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"bc policy must be one of {list(POLICIES)}, got {self.policy!r}")


class BC(OfflineAlgorithm):
    name = "bc"

    def __init__(self, config: BCConfig, ctx: Context):
        super().__init__(config)
        actor = GaussianActor if config.policy == "gaussian" else DeterministicActor
        self.actor = actor(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.modules = {"actor": self.actor}
        self.optimizers = {"actor": adam(self.actor.parameters(), lr=config.lr)}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.config.policy == "gaussian":
            loss = -self.actor.log_prob(batch.observations, batch.actions).mean()
        else:
            loss = (self.actor(batch.observations) - batch.actions).pow(2).mean()
        self.step_optimizer("actor", loss)
        return {"actor_loss": loss.detach()}

    def policy(self) -> torch.nn.Module:
        return self.actor
