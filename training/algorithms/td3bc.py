"""TD3+BC (Fujimoto & Gu 2021): TD3 with a behaviour-cloning term in the actor loss.

Actor loss: -lambda * Q1(s, pi(s)) + (pi(s) - a)^2 with lambda = alpha / mean|Q1(s, pi(s))|.
States arrive normalised (the trainer normalises every algorithm's inputs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from batchrl.training.algorithms.base import Batch, Context, OfflineAlgorithm, adam, frozen
from batchrl.training.networks import DeterministicActor, TwinQ, soft_update


@dataclass
class TD3BCConfig:
    hidden: tuple[int, ...] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    alpha: float = 2.5
    policy_delay: int = 2
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    batch_size: int = 256


def td3bc_actor_loss(q: torch.Tensor, pi: torch.Tensor, actions: torch.Tensor, alpha: float):
    """-lambda * mean Q + mean (pi - a)^2 with lambda = alpha / mean|Q| (lambda held constant)."""
    lmbda = alpha / q.abs().mean().detach()
    bc_loss = (pi - actions).pow(2).mean()
    return -lmbda * q.mean() + bc_loss, bc_loss, lmbda


class TD3BC(OfflineAlgorithm):
    name = "td3bc"

    def __init__(self, config: TD3BCConfig, ctx: Context):
        super().__init__(config)
        self.actor = DeterministicActor(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.critic = TwinQ(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.modules = {"actor": self.actor, "critic": self.critic, "actor_target": self.actor_target,
                        "critic_target": self.critic_target}
        self.optimizers = {"actor": adam(self.actor.parameters(), lr=config.actor_lr),
                           "critic": adam(self.critic.parameters(), lr=config.critic_lr)}
        self.counters = {"updates": 0}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            noise = (torch.randn_like(batch.actions) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            next_actions = (self.actor_target(batch.next_observations) + noise).clamp(-1.0, 1.0)
            next_q = torch.min(*self.critic_target(batch.next_observations, next_actions))
            target = batch.rewards + cfg.discount * (1.0 - batch.terminals) * next_q
        q1, q2 = self.critic(batch.observations, batch.actions)
        critic_loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        self.step_optimizer("critic", critic_loss)
        metrics = {"critic_loss": critic_loss.detach(), "q": q1.detach().mean()}

        self.counters["updates"] += 1
        if self.counters["updates"] % cfg.policy_delay == 0:
            pi = self.actor(batch.observations)
            with frozen(self.critic):
                q = self.critic.q1(batch.observations, pi)
                actor_loss, bc_loss, lmbda = td3bc_actor_loss(q, pi, batch.actions, cfg.alpha)
                self.step_optimizer("actor", actor_loss)
            soft_update(self.critic_target, self.critic, cfg.tau)
            soft_update(self.actor_target, self.actor, cfg.tau)
            metrics.update(actor_loss=actor_loss.detach(), bc_loss=bc_loss.detach(), lmbda=lmbda)
        return metrics

    def policy(self) -> torch.nn.Module:
        return self.actor
