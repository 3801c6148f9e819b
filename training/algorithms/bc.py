"""Behaviour cloning: maximum likelihood of the dataset actions under IQL's actor."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.algorithms.base import Batch, Context, OfflineAlgorithm
from training.networks import GaussianActor


@dataclass
class BCConfig:
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    batch_size: int = 256


class BC(OfflineAlgorithm):
    name = "bc"

    def __init__(self, config: BCConfig, ctx: Context):
        super().__init__(config)
        self.actor = GaussianActor(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.modules = {"actor": self.actor}
        self.optimizers = {"actor": torch.optim.Adam(self.actor.parameters(), lr=config.lr)}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss = -self.actor.log_prob(batch.observations, batch.actions).mean()
        self.step_optimizer("actor", loss)
        return {"actor_loss": loss.detach()}

    def policy(self) -> torch.nn.Module:
        return self.actor
