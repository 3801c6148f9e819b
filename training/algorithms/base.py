"""What every offline algorithm provides to the trainer."""
from __future__ import annotations

import contextlib

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Batch:
    """A minibatch of transitions: normalised observations, actions scaled to [-1, 1]."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor  # 1.0 where the episode terminated (no bootstrap); truncations are 0


@dataclass(frozen=True)
class SegmentBatch:
    """A minibatch of K-step episode segments for sequence models, left-padded.

    states normalised, actions in [-1, 1], returns_to_go divided by the return
    scale [B, K, 1], timesteps [B, K] int64, mask [B, K] (1 real step, 0 padding).
    Padding holds zeros.
    """

    states: torch.Tensor
    actions: torch.Tensor
    returns_to_go: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class Context:
    """What an algorithm may know about the dataset and the run when it is built."""

    obs_dim: int
    act_dim: int
    total_steps: int
    return_range: float  # max episode return - min episode return
    device: torch.device


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters take no gradient inside the block: for a loss that only passes through it
    (an actor's loss through its critic), whose gradients for it would be computed and thrown away."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


def adam(params, lr: float, weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (AdamW when ``decoupled``) with the fused kernel: one step for every parameter at once, where the
    default implementation loops over them on the CPU. The same update, in another order of float operations."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    return kind(params, lr=lr, weight_decay=weight_decay, fused=True)


class OfflineAlgorithm(ABC):
    """Networks, optimisers and schedules in named dicts, so checkpoints are generic.

    Subclasses fill ``modules``, ``optimizers`` and ``schedulers`` and implement
    ``update`` (one gradient step) and ``policy`` (normalised obs -> action in [-1, 1]).
    What differs between algorithms beyond that is theirs too: ``sampler`` (what feeds
    ``update``) and ``deployed`` (the acting path with normalisation and action scaling);
    the defaults are the transition algorithms'. The trainer holds no per-algorithm branch.
    """

    name: ClassVar[str]

    def __init__(self, config) -> None:
        self.config = config
        self.batch_size: int = config.batch_size
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.counters: dict[str, int] = {}  # plain integer state, e.g. the update count for delayed actors

    @abstractmethod
    def update(self, batch) -> dict[str, torch.Tensor]:
        """One gradient step on a Batch (or a SegmentBatch); returns detached scalar metrics (read on the host
        only when logged)."""

    @abstractmethod
    def policy(self) -> nn.Module:
        """The deterministic acting path: normalised observations -> actions in [-1, 1]
        (sequence models: the normalised context -> the last step's action)."""

    def sampler(self, data, obs_mean: np.ndarray, obs_std: np.ndarray, device: torch.device, seed: int):
        """What feeds ``update``: uniformly drawn transitions (a ReplaySampler)."""
        from batchrl.training.sampling import ReplaySampler  # sampling imports this module

        return ReplaySampler(data, obs_mean, obs_std, device, seed)

    def deployed(self, obs_mean: np.ndarray, obs_std: np.ndarray, action_low: np.ndarray, action_high: np.ndarray,
                 best_return: float) -> nn.Module:
        """The acting path with observation normalisation and action scaling (what export traces)."""
        from batchrl.training.policy import DeployedPolicy

        return DeployedPolicy(self.policy(), obs_mean, obs_std, action_low, action_high)

    def compile_units(self) -> list[nn.Module]:
        """What ``--compile`` compiles: by default every MLP and critic ensemble inside the modules (the
        networks' other methods run through them)."""
        from batchrl.training.networks import MLP, EnsembleMLP  # networks has no algorithm imports

        return [sub for module in self.modules.values() for sub in module.modules()
                if isinstance(sub, (MLP, EnsembleMLP))]

    def step_optimizer(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def state_dict(self) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        for group, items in (("modules", self.modules), ("optimizers", self.optimizers),
                             ("schedulers", self.schedulers)):
            missing = set(items) ^ set(state[group])
            if missing:
                raise ValueError(f"checkpoint {group} do not match the algorithm: {sorted(missing)}")
            for key, obj in items.items():
                saved = state[group][key]
                legacy = getattr(self.modules.get(key), "legacy_optimizer_state", None)
                if group == "optimizers" and legacy is not None:
                    saved = legacy(saved)  # (the module's own optimizer, named as it is)
                obj.load_state_dict(saved)
        counters = state.get("counters", {})  # checkpoints written before counters existed hold none
        if set(counters) != set(self.counters):
            raise ValueError(f"checkpoint counters {sorted(counters)} do not match the algorithm's "
                             f"{sorted(self.counters)}")
        self.counters.update(counters)
