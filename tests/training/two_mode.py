"""A one-step task with a known answer: half the data takes a = -0.8 (reward 0), half a = +0.8
(reward 1). Offline RL must choose +0.8; behaviour cloning averages the two modes."""
import torch

from batchrl.training.algorithms import ALGORITHMS, Batch, Context
from batchrl.training.trainer import algorithm_config


def train_two_mode(name: str, steps: int = 1500, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    n = 2048
    obs = torch.randn(n, 3)
    act = torch.where(torch.rand(n) < 0.5, -0.8, 0.8).unsqueeze(1)
    rew = (act[:, 0] > 0).float()
    hidden_keys = [k for k in vars(ALGORITHMS[name][0]()) if k.endswith("hidden")]
    settings = {**{k: (64, 64) for k in hidden_keys}, **overrides}
    algo = ALGORITHMS[name][1](algorithm_config(name, settings), Context(3, 1, steps, 1.0, torch.device("cpu")))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(n, (256,), generator=gen)
        algo.update(Batch(obs[idx], act[idx], rew[idx], obs[idx], torch.ones(256)))
    probe = torch.randn(200, 3)
    with torch.no_grad():
        return algo, algo.policy()(probe).squeeze(-1), probe
