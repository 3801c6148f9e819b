"""Batch-constrained Q-learning (Fujimoto, Meger & Precup 2019), continuous actions.

A conditional VAE models the behaviour policy; a perturbation actor nudges its
samples by at most phi; twin critics learn with the soft clipped double-Q target
lambda * min + (1 - lambda) * max over 10 decoded candidates per next state.
Acting decodes 100 candidates, perturbs them and takes the argmax of Q1. The
exported acting path uses a fixed, seeded set of candidate latents stored in the
module, so acting is deterministic and the ONNX graph reproduces it exactly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from batchrl.training.algorithms.base import Batch, Context, OfflineAlgorithm, adam, frozen
from batchrl.training.networks import TwinQ, mlp, soft_update


@dataclass
class BCQConfig:
    vae_hidden: tuple[int, ...] = (750, 750)
    actor_hidden: tuple[int, ...] = (400, 300)
    critic_hidden: tuple[int, ...] = (400, 300)
    lr: float = 1e-3
    discount: float = 0.99
    tau: float = 0.005
    lmbda: float = 0.75          # soft clipped double-Q weight on the minimum
    phi: float = 0.05            # the perturbation's bound, in units of the action range
    kl_weight: float = 0.5
    latent_clip: float = 0.5
    target_candidates: int = 10
    act_candidates: int = 100
    batch_size: int = 100
    latent_seed: int = 0         # seeds the fixed acting latents


class VAE(nn.Module):
    """Conditional VAE over actions given states; latent dimension 2 * |A|."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], latent_clip: float):
        super().__init__()
        self.latent_dim = 2 * act_dim
        self.latent_clip = latent_clip
        self.encoder = mlp(obs_dim + act_dim, 2 * self.latent_dim, hidden)
        self.decoder = mlp(obs_dim + self.latent_dim, act_dim, hidden)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).split(self.latent_dim, -1)
        log_std = log_std.clamp(-4.0, 15.0)
        std = log_std.exp()
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            z = torch.randn(*obs.shape[:-1], self.latent_dim, device=obs.device)
            z = z.clamp(-self.latent_clip, self.latent_clip)
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))


def vae_loss(recon: torch.Tensor, actions: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    recon_loss = (recon - actions).pow(2).mean()
    kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
    return recon_loss + kl_weight * kl, recon_loss, kl


def soft_clipped_double_q(t1: torch.Tensor, t2: torch.Tensor, lmbda: float) -> torch.Tensor:
    """lambda * min(Q1, Q2) + (1 - lambda) * max(Q1, Q2), then the max over candidates (last axis)."""
    return (lmbda * torch.min(t1, t2) + (1.0 - lmbda) * torch.max(t1, t2)).max(dim=-1).values


class Perturbation(nn.Module):
    """a' = clip(a + phi * tanh(MLP(s, a)), -1, 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], phi: float):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, act_dim, hidden)
        self.phi = phi

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return (actions + self.phi * torch.tanh(self.net(torch.cat([obs, actions], -1)))).clamp(-1.0, 1.0)


class CandidateArgmax(nn.Module):
    """Decode the fixed latents, perturb, and take the candidate with the highest Q1 (any float dtype)."""

    def __init__(self, vae: VAE, actor: Perturbation, critic: TwinQ, latents: torch.Tensor):
        super().__init__()
        self.vae, self.actor, self.critic = vae, actor, critic
        self.register_buffer("latents", latents)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        b, n = obs.shape[0], self.latents.shape[0]
        obs_rep = obs.unsqueeze(1).expand(b, n, obs.shape[-1])
        z = self.latents.to(obs.dtype).unsqueeze(0).expand(b, n, self.latents.shape[-1])
        candidates = self.actor(obs_rep, self.vae.decode(obs_rep, z))
        q1 = self.critic.q1(obs_rep, candidates)  # [b, n]
        index = q1.argmax(dim=1).view(b, 1, 1).expand(b, 1, candidates.shape[-1])
        return candidates.gather(1, index).squeeze(1)


class BCQPolicy(nn.Module):
    """BCQ's deterministic acting path, computed in float64.

    Candidates decoded from nearby latents often have Q-values within float32
    rounding of each other, so a float32 argmax can pick a different candidate in
    onnxruntime than in torch. In float64 the two agree except at exact ties,
    which both break towards the first candidate.
    """

    def __init__(self, vae: VAE, actor: Perturbation, critic: TwinQ, latents: torch.Tensor):
        super().__init__()
        self.path = CandidateArgmax(vae, actor, critic, latents)

    @property
    def latents(self) -> torch.Tensor:
        return self.path.latents

    @latents.setter
    def latents(self, value: torch.Tensor) -> None:
        self.path.latents = value

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.path(obs.double()).float()


class BCQ(OfflineAlgorithm):
    name = "bcq"

    def __init__(self, config: BCQConfig, ctx: Context):
        super().__init__(config)
        self.vae = VAE(ctx.obs_dim, ctx.act_dim, config.vae_hidden, config.latent_clip).to(ctx.device)
        self.actor = Perturbation(ctx.obs_dim, ctx.act_dim, config.actor_hidden, config.phi).to(ctx.device)
        self.critic = TwinQ(ctx.obs_dim, ctx.act_dim, config.critic_hidden).to(ctx.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        generator = torch.Generator().manual_seed(config.latent_seed)
        latents = torch.randn(config.act_candidates, self.vae.latent_dim, generator=generator)
        self.acting = BCQPolicy(self.vae, self.actor, self.critic,
                                latents.clamp(-config.latent_clip, config.latent_clip).to(ctx.device))
        self.modules = {"vae": self.vae, "actor": self.actor, "critic": self.critic,
                        "actor_target": self.actor_target, "critic_target": self.critic_target}
        self.optimizers = {"vae": adam(self.vae.parameters(), lr=config.lr),
                           "actor": adam(self.actor.parameters(), lr=config.lr),
                           "critic": adam(self.critic.parameters(), lr=config.lr)}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        obs = batch.observations
        recon, mean, std = self.vae(obs, batch.actions)
        loss_vae, recon_loss, kl = vae_loss(recon, batch.actions, mean, std, cfg.kl_weight)
        self.step_optimizer("vae", loss_vae)

        with torch.no_grad():
            b, k = obs.shape[0], cfg.target_candidates
            next_rep = batch.next_observations.unsqueeze(1).expand(b, k, obs.shape[-1])
            next_actions = self.actor_target(next_rep, self.vae.decode(next_rep))
            t1, t2 = self.critic_target(next_rep, next_actions)  # [b, k]
            next_v = soft_clipped_double_q(t1, t2, cfg.lmbda)
            target = batch.rewards + cfg.discount * (1.0 - batch.terminals) * next_v
        q1, q2 = self.critic(obs, batch.actions)
        critic_loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        self.step_optimizer("critic", critic_loss)

        with torch.no_grad():
            sampled = self.vae.decode(obs)
        with frozen(self.critic):
            actor_loss = -self.critic.q1(obs, self.actor(obs, sampled)).mean()
            self.step_optimizer("actor", actor_loss)
        soft_update(self.critic_target, self.critic, cfg.tau)
        soft_update(self.actor_target, self.actor, cfg.tau)
        return {"vae_loss": loss_vae.detach(), "recon_loss": recon_loss.detach(), "kl": kl.detach(),
                "critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "q": q1.detach().mean()}

    def policy(self) -> nn.Module:
        return self.acting
