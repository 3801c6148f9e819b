"""The deployed acting path: raw observation -> raw action, in one module.

Used both for in-process evaluation and as the graph exported to ONNX, so the
two can never disagree about normalisation or action scaling.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DeployedPolicy(nn.Module):
    def __init__(self, policy: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray,
                 action_low: np.ndarray, action_high: np.ndarray):
        super().__init__()
        self.policy = policy
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def to_bounds(self, unit: torch.Tensor) -> torch.Tensor:
        return self.action_low + (unit.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low)

    def to_unit(self, actions: torch.Tensor) -> torch.Tensor:
        return (2.0 * (actions - self.action_low) / (self.action_high - self.action_low) - 1.0).clamp(-1.0, 1.0)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.to_bounds(self.policy(self.normalize(observations)))

    @torch.no_grad()
    def act(self, observation: np.ndarray) -> np.ndarray:
        """One raw observation (numpy) -> one raw action (float32 numpy)."""
        device = self.obs_mean.device
        obs = torch.as_tensor(np.asarray(observation, dtype=np.float32), device=device).unsqueeze(0)
        return self(obs)[0].cpu().numpy()


class DeployedSequencePolicy(DeployedPolicy):
    """A sequence policy's acting path on the raw rolling context (protos/sequence.py):
    raw states, raw actions and raw returns-to-go in; normalisation, the return
    scale and action scaling all happen inside, so clients never pre-scale."""

    def __init__(self, policy: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray, action_low: np.ndarray,
                 action_high: np.ndarray, context_length: int, max_timestep: int, return_scale: float,
                 target_return: float):
        super().__init__(policy, obs_mean, obs_std, action_low, action_high)
        self.context_length, self.max_timestep = context_length, max_timestep
        self.return_scale, self.target_return = float(return_scale), float(target_return)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                timesteps: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        unit = self.policy(self.normalize(states), self.to_unit(actions), returns_to_go / self.return_scale,
                           timesteps, attention_mask)
        return self.to_bounds(unit)

    def act(self, observation: np.ndarray) -> np.ndarray:
        raise TypeError("a sequence policy acts on a rolling context: use training.evaluation.sequence_agent")

    @torch.no_grad()
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Graph inputs as numpy (protos.sequence.SEQUENCE_INPUTS) -> actions [B, act_dim] as numpy."""
        device = self.obs_mean.device
        return self(**{k: torch.as_tensor(v, device=device) for k, v in inputs.items()}).cpu().numpy()

