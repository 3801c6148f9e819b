"""Network building blocks shared by the algorithms."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear/ReLU stack that computes in its input's float dtype (weights are stored in float32).

    Float64 inputs run the same weights in float64: an acting path that takes an
    argmax over near-equal values (BCQ) needs that for onnxruntime to agree with torch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, nn.Linear):
                x = nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
            else:
                x = layer(x)
        return x


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...]) -> MLP:
    layers: list[nn.Module] = []
    dim = in_dim
    for width in hidden:
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    layers.append(nn.Linear(dim, out_dim))
    return MLP(*layers)


class GaussianActor(nn.Module):
    """Diagonal Gaussian over actions in [-1, 1]: mean = tanh(MLP(s)), state-independent std.

    The deterministic action is the mean. This is IQL's locomotion policy
    (tanh on the mean, not a squashed distribution), and BC uses the same one.
    The log-std is a parameter p in [LOG_STD_MIN, LOG_STD_MAX]: ``std="clamp"`` clips p (starting at 0,
    std 1); ``std="sigmoid"`` maps it through MIN + (MAX - MIN) * sigmoid(p) (starting at -1.5), d3rlpy's form.
    """

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
    STDS = ("clamp", "sigmoid")

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], std: str = "clamp"):
        super().__init__()
        if std not in self.STDS:
            raise ValueError(f"Gaussian actor std must be one of {list(self.STDS)}, got {std!r}")
        self.std = std
        self.net = mlp(obs_dim, act_dim, hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def current_log_std(self) -> torch.Tensor:
        if self.std == "sigmoid":
            return self.LOG_STD_MIN + (self.LOG_STD_MAX - self.LOG_STD_MIN) * torch.sigmoid(self.log_std)
        return self.log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean = self(obs)
        log_std = self.current_log_std()
        z = (actions - mean) * torch.exp(-log_std)
        per_dim = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        return per_dim.sum(-1)


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


class DeterministicActor(nn.Module):
    """a = tanh(MLP(s)) in [-1, 1] (TD3+BC)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class TanhGaussianActor(nn.Module):
    """SAC's squashed Gaussian: a = tanh(u), u ~ N(mean(s), std(s)); deterministic action tanh(mean)."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.trunk = mlp(obs_dim, 2 * act_dim, hidden)
        self.act_dim = act_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.trunk(obs)[..., : self.act_dim])

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample and its log-probability (with the tanh change of variables)."""
        mean, log_std = self.trunk(obs).split(self.act_dim, dim=-1)
        log_std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)
        u = mean + torch.randn_like(mean) * log_std.exp()
        log_prob = (-0.5 * ((u - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2), in the numerically stable form 2 * (log 2 - u - softplus(-2u)).
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob
