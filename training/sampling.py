"""Minibatch samplers: uniform transitions, and episode segments for sequence models.

Each holds the dataset's raw arrays on the training device (on the CPU, tensors that wrap the
dataset cache's read-only mapping: no copy, shared by every process on the machine; on CUDA, one
copy on the device) and normalises each batch as it draws it: observations by the dataset's mean
and std, actions to [-1, 1] (the same float32 operations as normalising the whole array first, so the
same bits). Indices come from the sampler's own torch Generator on the training device (an index is
never made on the host and copied per step), whose state the trainer checkpoints so a resumed run
replays the same batches. On the CPU the streams are those of a plain CPU generator.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from batchrl.training.algorithms import Batch, SegmentBatch
from batchrl.training.data import OfflineDataset


def on_device(x, device: torch.device, dtype=np.float32) -> torch.Tensor:
    """``x`` as a tensor on ``device``: on the CPU a float32 array (a read-only mapping included) is wrapped,
    not copied; anything else is converted or copied once."""
    x = np.asarray(x)
    if device.type == "cpu" and x.dtype == dtype and x.flags.c_contiguous:
        with warnings.catch_warnings():  # read-only: the samplers only ever gather from it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(x)
    return torch.as_tensor(np.ascontiguousarray(x, dtype=dtype), device=device)


class Normalizer:
    """Per-batch normalisation: observations by the dataset's mean and std, raw actions to [-1, 1] (the
    inverse of DeployedPolicy's output scaling)."""

    def __init__(self, data: OfflineDataset, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device):
        self.obs_mean, self.obs_std = on_device(obs_mean, device), on_device(obs_std, device)
        self.low = on_device(data.action_low, device)
        self.range = on_device(data.action_high - data.action_low, device)

    def observations(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.obs_mean) / self.obs_std

    def actions(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.clamp(2.0 * (raw - self.low) / self.range - 1.0, -1.0, 1.0)


class ReplaySampler:
    """Uniform minibatches of transitions."""

    def __init__(self, data: OfflineDataset, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device,
                 seed: int):
        self.obs = on_device(data.observations, device)
        self.next_obs = on_device(data.next_observations, device)
        self.actions = on_device(data.actions, device)
        self.rewards = on_device(data.rewards, device)
        self.terminals = on_device(data.terminations, device)
        self.normalize = Normalizer(data, obs_mean, obs_std, device)
        self.size = data.size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(self.size, (batch_size,), generator=self.generator, device=self.device)
        norm = self.normalize
        return Batch(norm.observations(self.obs[idx]), norm.actions(self.actions[idx]), self.rewards[idx],
                     norm.observations(self.next_obs[idx]), self.terminals[idx])


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
        self.obs = on_device(data.observations, device)
        self.actions = on_device(data.actions, device)
        self.normalize = Normalizer(data, obs_mean, obs_std, device)
        # Derived per step, private to the process (12 bytes a step, against the mapped data's 8 per
        # observation value): returns-to-go and timesteps.
        rtg = returns_to_go(data.rewards, data.episode_starts, data.episode_lengths) / return_scale
        self.rtg = on_device(rtg[:, None], device)
        steps = np.minimum(episode_timesteps(data.episode_starts, data.episode_lengths), max_timestep - 1)
        self.timesteps = on_device(steps, device, np.int64)
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
        norm = self.normalize
        return SegmentBatch(
            states=norm.observations(self.obs[idx]) * keep, actions=norm.actions(self.actions[idx]) * keep,
            returns_to_go=self.rtg[idx] * keep,
            timesteps=self.timesteps[idx] * mask, mask=mask.long())
