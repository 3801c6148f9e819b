"""Conservative Q-learning (Kumar et al. 2020), CQL(H) on a SAC base, continuous actions.

Critic loss per Q network: Bellman error onto r + gamma * (1 - terminal) * min target Q(s', a'),
a' ~ pi(s') with no entropy term in the backup, plus
    alpha_cql * (logsumexp over 30 actions scored at s  -  Q(s, a_data))
where the 30 actions are 10 uniform on [-1, 1]^|A| (importance density 0.5^|A|), 10 from pi(.|s)
and 10 from pi(.|s'), each divided by its (detached) density. Optional Lagrange form tunes
alpha_cql so the gap holds a target. SAC actor with automatic entropy tuning (target -|A|).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from training.algorithms.base import Batch, Context, OfflineAlgorithm
from training.networks import TanhGaussianActor, TwinQ, soft_update


@dataclass
class CQLConfig:
    hidden: tuple[int, ...] = (256, 256, 256)
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 1e-4
    discount: float = 0.99
    tau: float = 0.005
    min_q_weight: float = 5.0         # alpha_cql, the weight of the conservative term
    num_actions: int = 10             # per source (uniform, pi(s), pi(s')): 30 in the logsumexp
    lagrange: bool = False            # tune alpha_cql to hold target_action_gap
    target_action_gap: float = 10.0
    lagrange_lr: float = 3e-4
    batch_size: int = 256


def conservative_gap(q_fn, obs: torch.Tensor, data_actions: torch.Tensor, uniform: torch.Tensor,
                     pi_s: torch.Tensor, logp_s: torch.Tensor, pi_next: torch.Tensor,
                     logp_next: torch.Tensor) -> torch.Tensor:
    """logsumexp over the 3N importance-weighted candidate Q-values at s, minus Q(s, a_data); per state.

    ``uniform``, ``pi_s`` and ``pi_next`` are [B, N, |A|]; the log-densities [B, N] are detached.
    """
    b, n, act_dim = uniform.shape
    obs_rep = obs.unsqueeze(1).expand(b, n, obs.shape[-1])
    uniform_log_density = act_dim * math.log(0.5)
    scored = torch.cat([q_fn(obs_rep, uniform) - uniform_log_density,
                        q_fn(obs_rep, pi_s) - logp_s.detach(),
                        q_fn(obs_rep, pi_next) - logp_next.detach()], dim=1)
    return torch.logsumexp(scored, dim=1) - q_fn(obs, data_actions)


class CQL(OfflineAlgorithm):
    name = "cql"

    def __init__(self, config: CQLConfig, ctx: Context):
        super().__init__()
        self.config = config
        self.batch_size = config.batch_size
        self.act_dim = ctx.act_dim
        self.actor = TanhGaussianActor(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.critic = TwinQ(ctx.obs_dim, ctx.act_dim, config.hidden).to(ctx.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.nn.Parameter(torch.zeros((), device=ctx.device))
        self.log_alpha_prime = torch.nn.Parameter(torch.zeros((), device=ctx.device))
        self.temperatures = torch.nn.ParameterDict({"log_alpha": self.log_alpha,
                                                    "log_alpha_prime": self.log_alpha_prime})
        self.modules = {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target,
                        "temperatures": self.temperatures}
        self.optimizers = {
            "actor": torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr),
            "alpha": torch.optim.Adam([self.log_alpha], lr=config.alpha_lr),
            "alpha_prime": torch.optim.Adam([self.log_alpha_prime], lr=config.lagrange_lr),
        }
        self.target_entropy = -float(ctx.act_dim)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        obs, b, n = batch.observations, batch.observations.shape[0], cfg.num_actions

        # Actor and temperature (SAC).
        pi, logp = self.actor.sample(obs)
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.step_optimizer("alpha", alpha_loss)
        alpha = self.log_alpha.exp().detach()
        actor_loss = (alpha * logp - torch.min(*self.critic(obs, pi))).mean()
        self.step_optimizer("actor", actor_loss)

        # Bellman backup without an entropy term.
        with torch.no_grad():
            next_pi, _ = self.actor.sample(batch.next_observations)
            next_q = torch.min(*self.critic_target(batch.next_observations, next_pi))
            target = batch.rewards + cfg.discount * (1.0 - batch.terminals) * next_q
            uniform = torch.empty(b, n, self.act_dim, device=obs.device).uniform_(-1.0, 1.0)
            pi_s, logp_s = self.actor.sample(obs.unsqueeze(1).expand(b, n, obs.shape[-1]))
            next_rep = batch.next_observations.unsqueeze(1).expand(b, n, obs.shape[-1])
            pi_next, logp_next = self.actor.sample(next_rep)
        q1, q2 = self.critic(obs, batch.actions)
        bellman = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        gaps = [conservative_gap(lambda o, a, i=i: self.critic(o, a)[i], obs, batch.actions, uniform, pi_s, logp_s,
                                 pi_next, logp_next).mean() for i in (0, 1)]
        if cfg.lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            conservative = sum(alpha_prime.detach() * cfg.min_q_weight * (g - cfg.target_action_gap) for g in gaps)
            alpha_prime_loss = -sum(alpha_prime * cfg.min_q_weight * (g.detach() - cfg.target_action_gap)
                                    for g in gaps) * 0.5
            self.step_optimizer("alpha_prime", alpha_prime_loss)
        else:
            conservative = cfg.min_q_weight * (gaps[0] + gaps[1])
        critic_loss = bellman + conservative
        self.step_optimizer("critic", critic_loss)
        soft_update(self.critic_target, self.critic, cfg.tau)
        return {"critic_loss": critic_loss.detach(), "bellman_loss": bellman.detach(),
                "cql_gap": (gaps[0].detach() + gaps[1].detach()) / 2, "actor_loss": actor_loss.detach(),
                "alpha": alpha, "q": q1.detach().mean(), "entropy": -logp.detach().mean()}

    def policy(self) -> torch.nn.Module:
        return self.actor
