"""Implicit Q-learning (Kostrikov, Nair & Levine 2021), continuous actions.

Defaults are the paper's gym-locomotion settings. Per step, in the reference
order: V by expectile regression onto min(target Q1, Q2); the actor by
advantage-weighted regression with weights min(exp(beta * (Q - V)), 100); the
twin Q onto r + gamma * (1 - terminal) * V(s'); then the Polyak target update.
``update_order="joint"`` is d3rlpy's order instead: the twin Q backs up onto V(s') of before this
step's V update (d3rlpy steps Q and V together), and the actor follows.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from batchrl.training.algorithms.base import Batch, Context, OfflineAlgorithm, adam
from batchrl.training.networks import DeterministicActor, GaussianActor, TwinQ, ValueNet, soft_update


@dataclass
class IQLConfig:
    hidden: tuple[int, ...] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    expectile: float = 0.7
    beta: float = 3.0            # inverse temperature: weights grow with beta * advantage
    max_weight: float = 100.0
    batch_size: int = 256
    normalize_rewards: bool = True  # r * 1000 / (max episode return - min episode return)
    actor: str = "gaussian"      # "gaussian": weighted log-likelihood; "deterministic": weighted squared error
    actor_lr_horizon: int | None = None  # cosine decay of the actor's lr over this many steps; None: the run's
                                         # length, 0: constant
    actor_std: str = "sigmoid"   # the Gaussian actor's log-std: "sigmoid" (d3rlpy's: -5 + 7 sigmoid(p), from -1.5)
                                 # or "clamp" (a clipped parameter from 0, the default before issue 12)
    update_order: str = "reference"  # "reference": Q backs up onto V(s') after this step's V update;
                                     # "joint": onto V(s') before it (d3rlpy)

    ORDERS = ("reference", "joint")

    def __post_init__(self) -> None:
        if self.actor not in ("gaussian", "deterministic"):
            raise ValueError(f"iql actor must be 'gaussian' or 'deterministic', got {self.actor!r}")
        if self.actor_std not in GaussianActor.STDS:
            raise ValueError(f"iql actor_std must be one of {list(GaussianActor.STDS)}, got {self.actor_std!r}")
        if self.update_order not in self.ORDERS:
            raise ValueError(f"iql update_order must be one of {list(self.ORDERS)}, got {self.update_order!r}")
        if self.actor_lr_horizon is not None and self.actor_lr_horizon < 0:
            raise ValueError(f"actor_lr_horizon must be >= 0 (0: constant), got {self.actor_lr_horizon}")


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss |tau - 1(diff < 0)| * diff^2, with diff = target - prediction."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff.pow(2)


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    return torch.exp(beta * advantage).clamp(max=max_weight)


class IQL(OfflineAlgorithm):
    name = "iql"

    def __init__(self, config: IQLConfig, ctx: Context):
        super().__init__(config)
        self.reward_scale = 1000.0 / max(ctx.return_range, 1e-6) if config.normalize_rewards else 1.0
        self.actor = (GaussianActor(ctx.obs_dim, ctx.act_dim, config.hidden, config.actor_std)
                      if config.actor == "gaussian" else DeterministicActor(ctx.obs_dim, ctx.act_dim, config.hidden))
        self.actor.to(ctx.device)
        self.critic = TwinQ(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.value = ValueNet(ctx.obs_dim, config.hidden).to(ctx.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.modules = {"actor": self.actor, "critic": self.critic, "value": self.value,
                        "critic_target": self.critic_target}
        self.optimizers = {
            "actor": adam(self.actor.parameters(), lr=config.actor_lr),
            "critic": adam(self.critic.parameters(), lr=config.critic_lr),
            "value": adam(self.value.parameters(), lr=config.value_lr),
        }
        horizon = ctx.total_steps if config.actor_lr_horizon is None else config.actor_lr_horizon
        self.schedulers = {
            "actor": torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizers["actor"], T_max=horizon)
        } if horizon else {}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            target_q = torch.min(*self.critic_target(batch.observations, batch.actions))
            next_v = self.value(batch.next_observations) if cfg.update_order == "joint" else None

        value = self.value(batch.observations)
        value_loss = expectile_loss(target_q - value, cfg.expectile).mean()
        self.step_optimizer("value", value_loss)

        with torch.no_grad():
            advantage = target_q - self.value(batch.observations)
            weights = awr_weights(advantage, cfg.beta, cfg.max_weight)
        if cfg.actor == "gaussian":
            actor_loss = -(weights * self.actor.log_prob(batch.observations, batch.actions)).mean()
        else:
            actor_loss = (weights * (self.actor(batch.observations) - batch.actions).pow(2).sum(-1)).mean()
        self.step_optimizer("actor", actor_loss)
        for scheduler in self.schedulers.values():
            scheduler.step()

        with torch.no_grad():
            if next_v is None:
                next_v = self.value(batch.next_observations)
            target = batch.rewards * self.reward_scale + cfg.discount * (1.0 - batch.terminals) * next_v
        q1, q2 = self.critic(batch.observations, batch.actions)
        critic_loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        self.step_optimizer("critic", critic_loss)
        soft_update(self.critic_target, self.critic, cfg.tau)

        return {"value_loss": value_loss.detach(), "actor_loss": actor_loss.detach(),
                "critic_loss": critic_loss.detach(), "value": value.detach().mean(),
                "advantage": advantage.mean(), "weight": weights.mean()}

    def policy(self) -> torch.nn.Module:
        return self.actor
