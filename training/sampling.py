"""Minibatch samplers: uniform transitions, and episode segments for sequence models.

Each holds its data on the training device and draws from its own torch
Generator on that device (an index is never made on the host and copied per
step), whose state the trainer checkpoints so a resumed run replays the same
batches. On the CPU the streams are those of a plain CPU generator.
"""
from __future__ import annotations

import numpy as np
import torch

from batchrl.training.algorithms import Batch, SegmentBatch
from batchrl.training.data import OfflineDataset
from batchrl.training.policy import scale_actions


def _put(x, device: torch.device, dtype=np.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x, dtype=dtype), device=device)


class ReplaySampler:
    """Uniform minibatches of transitions."""

    def __init__(self, data: OfflineDataset, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device,
                 seed: int):
        self.obs = _put((data.observations - obs_mean) / obs_std, device)
        self.next_obs = _put((data.next_observations - obs_mean) / obs_std, device)
        self.actions = _put(scale_actions(data.actions, data.action_low, data.action_high), device)
        self.rewards = _put(data.rewards, device)
        self.terminals = _put(data.terminations, device)
        self.size = data.size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(self.size, (batch_size,), generator=self.generator, device=self.device)
        return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminals[idx])


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per step, the undiscounted sum of rewards from that step to the end of its episode (float64)."""
    out = np.empty(len(rewards), np.float64)
    for start, length in zip(starts, lengths):
        episode = rewards[start:start + length].astype(np.float64)
        out[start:start + length] = np.cumsum(episode[::-1])[::-1]
    return out


def episode_timesteps(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per step, its index within its episode."""
    return np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)


class SegmentSampler:
    """K-step segments: an episode drawn in proportion to its length, a start step uniform
    within it (as the reference implementation), the steps up to K from there, left-padded
    with zeros and mask 0 when the episode ends first."""

    def __init__(self, data: OfflineDataset, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device,
                 seed: int, context_length: int, max_timestep: int, return_scale: float):
        if return_scale <= 0:
            raise ValueError(f"return_scale must be > 0, got {return_scale}")
        self.k = context_length
        self.obs = _put((data.observations - obs_mean) / obs_std, device)
        self.actions = _put(scale_actions(data.actions, data.action_low, data.action_high), device)
        rtg = returns_to_go(data.rewards, data.episode_starts, data.episode_lengths) / return_scale
        self.rtg = _put(rtg[:, None], device)
        steps = np.minimum(episode_timesteps(data.episode_starts, data.episode_lengths), max_timestep - 1)
        self.timesteps = _put(steps, device, np.int64)
        self.starts = torch.as_tensor(data.episode_starts, dtype=torch.int64, device=device)
        self.lengths = torch.as_tensor(data.episode_lengths, dtype=torch.int64, device=device)
        self.weights = self.lengths.double() / self.lengths.sum()
        self.steps = torch.arange(self.k, device=device).unsqueeze(0)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, batch_size: int) -> SegmentBatch:
        g = self.generator
        episode = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        length = self.lengths[episode]
        offset = (torch.rand(batch_size, generator=g, dtype=torch.float64, device=self.device) * length).long()
        offset = torch.minimum(offset, length - 1)
        real = (length - offset).clamp(max=self.k)                 # real steps in the segment
        j = self.steps - (self.k - real).unsqueeze(1)                # step within the segment
        mask = j >= 0
        idx = (self.starts[episode] + offset).unsqueeze(1) + j.clamp(min=0)
        keep = mask.unsqueeze(-1)
        return SegmentBatch(
            states=self.obs[idx] * keep, actions=self.actions[idx] * keep, returns_to_go=self.rtg[idx] * keep,
            timesteps=self.timesteps[idx] * mask, mask=mask.long())
