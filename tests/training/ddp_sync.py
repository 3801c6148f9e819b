"""Run by torchrun (2 processes) from test_distributed.py: every algorithm, synchronised, trained 5 updates on
each rank's own batches, must hold one state on both ranks; a parameter moved on one rank must be caught.

    torchrun --standalone --nproc-per-node 2 -m tests.training.ddp_sync

Rank 0 prints one JSON line: per algorithm, the modules and optimisers compared and whether the check caught
the moved parameter.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from batchrl.training import distributed
from batchrl.training.algorithms import ALGORITHMS
from batchrl.training.data import synthetic_dataset
from batchrl.training.trainer import TrainConfig, build_algorithm

SMALL = {"bc": {"hidden": "32,32"}, "td3bc": {"hidden": "32,32"}, "iql": {"hidden": "32,32"},
         "cql": {"hidden": "32,32", "batch_size": 64}, "bcq": {"batch_size": 64},
         "dt": {"embed": 32, "layers": 1, "heads": 1, "context_length": 4, "batch_size": 16}}


def main() -> None:
    device = torch.device("cpu")
    world = distributed.join(device)
    data = synthetic_dataset(obs_dim=5, act_dim=2, episodes=20, length=50)
    mean, std = data.observation_stats()
    report = {}
    for name in sorted(ALGORITHMS):
        config = TrainConfig(algorithm=name, dataset="synthetic", steps=5, device="cpu", algo=SMALL.get(name, {}))
        torch.manual_seed(0)
        algo = build_algorithm(config, data.obs_dim, data.act_dim, 10.0, device)
        if world.rank:  # a rank that started apart: synchronise must bring it to rank 0's networks
            for module in algo.modules.values():
                for p in module.parameters():
                    p.data.add_(0.01)
        distributed.synchronise(algo, world)
        torch.manual_seed(world.seed(0))
        sampler = algo.sampler(data, mean, std, device, world.seed(0))
        for _ in range(5):
            algo.update(sampler.sample(algo.batch_size // world.size))
        distributed.check_synchronised(algo, world)  # raises naming what differs
        compared = sorted(distributed.digest(algo))
        # The check itself: one parameter of the last module moved on rank 1 must be named.
        last = sorted(algo.modules)[-1]
        if world.rank == 1:
            next(algo.modules[last].parameters()).data.add_(1e-6)
        try:
            distributed.check_synchronised(algo, world)
            caught = None
        except RuntimeError as exc:
            caught = str(exc)
        report[name] = {"compared": compared, "moved": f"modules.{last}", "caught": caught,
                        "modules": sorted(algo.modules), "optimizers": sorted(algo.optimizers)}
    if world.main:
        print(json.dumps(report), flush=True)
    distributed.leave()


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
