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
        layers += [nn.Linear(dim, width), nn.ReLU(inplace=True)]  # (in place: the Linear output is not kept)
        dim = width
    layers.append(nn.Linear(dim, out_dim))
    return MLP(*layers)


class GaussianActor(nn.Module):
    """Diagonal Gaussian over actions in [-1, 1]: mean = tanh(MLP(s)), state-independent std.

    The deterministic action is the mean. This is IQL's locomotion policy
    (tanh on the mean, not a squashed distribution), and BC uses the same one.
    The log-std lies in [LOG_STD_MIN, LOG_STD_MAX], from a parameter p: ``std="clamp"`` clips p (starting at 0,
    std 1); ``std="sigmoid"`` maps it through MIN + (MAX - MIN) * sigmoid(p) (starting at -1.5), d3rlpy's form.
    """

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
    STDS = ("clamp", "sigmoid")

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], std: str = "clamp"):
        super().__init__()
        if std not in self.STDS:
            raise ValueError(f"Gaussian actor std must be one of {list(self.STDS)}, got {std!r}")
        self.std_form = std
        self.net = mlp(obs_dim, act_dim, hidden)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def current_log_std(self) -> torch.Tensor:
        if self.std_form == "sigmoid":
            return self.LOG_STD_MIN + (self.LOG_STD_MAX - self.LOG_STD_MIN) * torch.sigmoid(self.log_std)
        return self.log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean = self(obs)
        log_std = self.current_log_std()
        z = (actions - mean) * torch.exp(-log_std)
        per_dim = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        return per_dim.sum(-1)


class EnsembleLinear(nn.Module):
    """``members`` independent linear layers applied as one batched matmul: [n, M, in] -> [n, M, out].

    Plain matmul and add, so the ONNX exporter traces it; computes in its input's float dtype.
    EnsembleMLP initialises it.
    """

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.to(x.dtype), x, self.weight.to(x.dtype))


class EnsembleMLP(nn.Module):
    """``members`` MLPs of the same shape run as one: x [..., in] -> [members, ..., out]."""

    def __init__(self, members: int, in_dim: int, out_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        dims = (in_dim, *hidden, out_dim)
        self.members = members
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(dims[:-1], dims[1:]))
        # Each member drawn as separate nn.Linear MLPs would be, in the same order (member by member):
        # the same random stream gives the same initial networks as before the ensemble.
        with torch.no_grad():
            for m in range(members):
                for layer, (a, b) in zip(self.layers, zip(dims[:-1], dims[1:])):
                    linear = nn.Linear(a, b)
                    layer.weight[m] = linear.weight.t()
                    layer.bias[m, 0] = linear.bias

    def forward(self, x: torch.Tensor, member: int | None = None) -> torch.Tensor:
        """Every member, [members, ..., out]; or only ``member``, [..., out] (half the work of two)."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if member is not None:
            return self.member(member, flat).reshape(*lead, -1)
        # On CUDA one batched matmul per layer serves every member (one kernel, not one per member); on the
        # CPU a matmul per member runs faster than the batched one (CQL: 10.7 against 8.4-8.9 updates/s).
        h = self.batched(flat) if flat.is_cuda else torch.stack([self.member(m, flat) for m in range(self.members)])
        return h.reshape(self.members, *lead, h.shape[-1])

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every member at once, [M, in] -> [members, M, out], one baddbmm per layer."""
        h = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.relu_(h)
        return h

    def member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One member alone, [M, in] -> [M, out]."""
        for i, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias[index, 0].to(x.dtype), x, layer.weight[index].to(x.dtype))
            if i < len(self.layers) - 1:
                x = torch.relu_(x)  # (in place: the matmul output is not needed again)
        return x


class TwinQ(nn.Module):
    """Two Q-networks (clipped double Q) computed as one ensemble: ``forward`` -> (q1, q2), each [...].

    Checkpoints from before the ensemble (two separate MLPs, ``q1.*`` and ``q2.*``) load unchanged:
    their tensors are stacked into the ensemble's on load.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = EnsembleMLP(2, obs_dim + act_dim, 1, hidden)
        self._register_load_state_dict_pre_hook(_stack_separate_critics)

    def all(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Both Q-values, [2, ...]."""
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.all(obs, actions)
        return q[0], q[1]

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1), member=0).squeeze(-1)

    def legacy_optimizer_state(self, saved: dict) -> dict:
        """An optimizer state of the pre-ensemble TwinQ (one entry per tensor of q1, then of q2) as this
        module's (one per stacked tensor); any other state is returned as it is."""
        params = saved["param_groups"][0]["params"]
        new = len(list(self.parameters()))
        if len(saved["param_groups"]) != 1 or len(params) != 2 * new:
            return saved
        state = {}
        for j in range(new):  # layer l's weight (2l), then its bias (2l + 1)
            old = [saved["state"].get(params[m * new + j]) for m in (0, 1)]
            if old[0] is None:
                continue
            entry = dict(old[0])
            for key, value in old[0].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    parts = [o[key] for o in old]
                    entry[key] = torch.stack([p.t() for p in parts]) if value.dim() == 2 else \
                        torch.stack(parts).unsqueeze(1)
            state[j] = entry
        group = dict(saved["param_groups"][0], params=list(range(new)))
        return {"state": state, "param_groups": [group]}


def _stack_separate_critics(state: dict, prefix: str, *_) -> None:
    """Rewrite a pre-ensemble TwinQ state ({prefix}q1.<i>.weight [out, in], ...) in place as the ensemble's."""
    linear = sorted({int(k[len(prefix) + 3:].split(".")[0]) for k in state if k.startswith(prefix + "q1.")})
    for layer, i in enumerate(linear):
        weights = [state.pop(f"{prefix}q{m}.{i}.weight") for m in (1, 2)]
        biases = [state.pop(f"{prefix}q{m}.{i}.bias") for m in (1, 2)]
        state[f"{prefix}net.layers.{layer}.weight"] = torch.stack([w.t() for w in weights])
        state[f"{prefix}net.layers.{layer}.bias"] = torch.stack(biases).unsqueeze(1)


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
        return self._sample(*self.trunk(obs).split(self.act_dim, dim=-1))

    def sample_n(self, obs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples per observation, [..., n, act] and [..., n], from one pass of the network (the
        same draws as ``sample`` on the observations repeated n times along a new axis -2)."""
        mean, log_std = self.trunk(obs).split(self.act_dim, dim=-1)
        shape = (*mean.shape[:-1], n, self.act_dim)
        return self._sample(mean.unsqueeze(-2).expand(shape), log_std.unsqueeze(-2).expand(shape))

    def _sample(self, mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)
        u = mean + torch.randn_like(mean) * log_std.exp()
        log_prob = (-0.5 * ((u - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2), in the numerically stable form 2 * (log 2 - u - softplus(-2u)).
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob
