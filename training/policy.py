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

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        unit = self.policy((observations - self.obs_mean) / self.obs_std)
        return self.action_low + (unit.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.action_high - self.action_low)

    @torch.no_grad()
    def act(self, observation: np.ndarray) -> np.ndarray:
        """One raw observation (numpy) -> one raw action (float32 numpy)."""
        device = self.obs_mean.device
        obs = torch.as_tensor(np.asarray(observation, dtype=np.float32), device=device).unsqueeze(0)
        return self(obs)[0].cpu().numpy()


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Raw actions -> [-1, 1], the inverse of DeployedPolicy's output scaling."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)
