"""Do the faster updates compute what the old ones did? (`python -m benchmarks.critic_equivalence`)

For each algorithm with a twin critic, runs from the same seed on the same batch stream (the
synthetic Hopper-sized data of benchmarks/update_speed.py, each algorithm's defaults), each compared
with the code as it was (two separate critic networks, Adam's default for-each step: restored here by
swapping the two back in): the code as it is (the critics as one ensemble computation, Adam's fused
step), each of the two changes alone, and, as the yardstick of how far float rounding alone carries
two runs apart, the old code started from weights one unit in the last place away (every critic
weight nudged to the next float32). All start from the same weights otherwise (the ensemble draws
its members in the old order). Reported: the largest absolute and relative difference of every
logged loss over the updates, and the update at which a difference first exceeds 1e-5. Results in
benchmarks/results/critic_equivalence.md.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch
from torch import nn

from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.networks import mlp
from batchrl.training.trainer import algorithm_config
from benchmarks import RESULTS
from batchrl.training.data import synthetic_dataset

TWIN_CRITICS = ("td3bc", "iql", "cql", "bcq")
TOLERANCE = 1e-5


class SeparateTwinQ(nn.Module):
    """The twin critic as it was: two MLPs, evaluated one after the other."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1_net = mlp(obs_dim + act_dim, 1, hidden)
        self.q2_net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], dim=-1)
        return self.q1_net(x).squeeze(-1), self.q2_net(x).squeeze(-1)

    def q1(self, obs, actions):
        return self.q1_net(torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def all(self, obs, actions):
        """(CQL's one pass over the data action and its candidates: here still two networks, one after the
        other. The old CQL scored the data action and the candidates in two passes of each network; that
        split changes only how rows are grouped into matmuls.)"""
        return torch.stack(self(obs, actions))


def unfused_adam(params, lr, weight_decay=0.0, decoupled=False):
    return (torch.optim.AdamW if decoupled else torch.optim.Adam)(params, lr=lr, weight_decay=weight_decay)


# variant: (the critic, the optimizer, nudge the critics' initial weights by one ulp)
VARIANTS = {"old": (SeparateTwinQ, unfused_adam, False), "new": (None, None, False),
            "ensemble only": (None, unfused_adam, False), "fused Adam only": (SeparateTwinQ, None, False),
            "old, one ulp away": (SeparateTwinQ, unfused_adam, True)}


def losses(name: str, updates: int, variant: str, data) -> list[dict[str, float]]:
    module = importlib.import_module(f"batchrl.training.algorithms.{name}")
    saved = module.TwinQ, module.adam
    critic, optimizer, nudge = VARIANTS[variant]
    module.TwinQ, module.adam = critic or saved[0], optimizer or saved[1]
    try:
        torch.manual_seed(0)
        algo = ALGORITHMS[name][1](algorithm_config(name, {}), Context(data.obs_dim, data.act_dim, 100_000, 3000.0,
                                                                         torch.device("cpu")))
        if nudge:
            with torch.no_grad():
                for key in ("critic", "critic_target"):
                    for param in algo.modules[key].parameters():
                        param.copy_(torch.nextafter(param, torch.full_like(param, float("inf"))))
        mean, std = data.observation_stats()
        sampler = algo.sampler(data, mean, std, torch.device("cpu"), seed=0)
        out = []
        for _ in range(updates):
            metrics = algo.update(sampler.sample(algo.batch_size))
            out.append({k: float(v) for k, v in metrics.items() if k.endswith("loss")})
        return out
    finally:
        module.TwinQ, module.adam = saved


def compare(old: list[dict], new: list[dict]) -> dict:
    keys = sorted(set().union(*new))  # (a delayed actor logs its loss on some updates only)
    pairs = list(zip(new, old))
    worst = {k: max(abs(n[k] - o[k]) for n, o in pairs if k in n) for k in keys}
    relative = {k: max(abs(n[k] - o[k]) / max(abs(o[k]), 1e-8) for n, o in pairs if k in n) for k in keys}
    first = next((i + 1 for i, (n, o) in enumerate(pairs) if any(abs(n[k] - o[k]) > TOLERANCE for k in n)), None)
    return {"worst": worst, "relative": relative, "first_over": first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--algorithms", default=",".join(TWIN_CRITICS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = synthetic_dataset()
    lines = ["# The ensemble critics and fused Adam against the code they replaced", "",
             f"{args.updates} updates per algorithm at its defaults on the synthetic Hopper-sized data, the same "
             f"seed and batch stream for both; torch {torch.__version__}, {platform.machine()}, one thread. "
             f"Reproduce: `python -m benchmarks.critic_equivalence --updates {args.updates}`.", "",
             "| algorithm | against the old code | loss | largest absolute difference | largest relative difference "
             f"| first update over {TOLERANCE:g} |", "|---|---|---|---|---|---|"]
    for name in args.algorithms.split(","):
        reference = losses(name, args.updates, "old", data)
        for variant in list(VARIANTS)[1:]:
            result = compare(reference, losses(name, args.updates, variant, data))
            for loss in result["worst"]:
                lines.append(f"| {name} | {variant} | {loss} | {result['worst'][loss]:.2e} | "
                             f"{result['relative'][loss]:.2e} | {result['first_over'] or 'none'} |")
            print(f"{name}, {variant}: {result}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "critic_equivalence.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
