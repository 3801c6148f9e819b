"""The twin critic as one ensemble computation: the same numbers as two separate networks, and
checkpoints of the separate networks (modules and optimizer state) still load."""
import copy

import torch

from batchrl.training.algorithms.base import adam
from batchrl.training.networks import TwinQ, mlp

OBS, ACT, HIDDEN = 5, 2, (16, 16)


def separate_pair(seed=0):
    """Two MLPs as the critic was before the ensemble, drawn in the same order."""
    torch.manual_seed(seed)
    return mlp(OBS + ACT, 1, HIDDEN), mlp(OBS + ACT, 1, HIDDEN)


def legacy_state(q1, q2):
    return {**{f"q1.{k}": v for k, v in q1.state_dict().items()}, **{f"q2.{k}": v for k, v in q2.state_dict().items()}}


def inputs(lead=(8,)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*lead, OBS, generator=g), torch.rand(*lead, ACT, generator=g) * 2 - 1


def test_the_ensemble_is_drawn_as_the_separate_networks_were():
    q1, q2 = separate_pair()
    torch.manual_seed(0)
    twin = TwinQ(OBS, ACT, HIDDEN)
    reference = TwinQ(OBS, ACT, HIDDEN)
    reference.load_state_dict(legacy_state(q1, q2))
    for a, b in zip(twin.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_batched_critics_give_the_losses_and_gradients_of_separate_ones():
    q1, q2 = separate_pair()
    twin = TwinQ(OBS, ACT, HIDDEN)
    twin.load_state_dict(legacy_state(q1, q2))
    for lead in ((8,), (4, 6)):  # a batch, and a batch of candidate sets (CQL, BCQ)
        obs, act = inputs(lead)
        target = torch.randn(lead)
        x = torch.cat([obs, act], -1)
        separate = [q(x).squeeze(-1) for q in (q1, q2)]
        batched = twin(obs, act)
        for s, b in zip(separate, batched):
            assert b.shape == lead and torch.allclose(s, b, atol=1e-6, rtol=0)
        assert torch.allclose(twin.q1(obs, act), separate[0], atol=1e-6, rtol=0)
        loss_s = sum((q - target).pow(2).mean() for q in separate)
        loss_b = sum((q - target).pow(2).mean() for q in batched)
        assert abs(loss_s.item() - loss_b.item()) <= 1e-6
        for module in (q1, q2, twin):
            module.zero_grad()
        loss_s.backward()
        loss_b.backward()
        for i, layer in enumerate(twin.net.layers):
            linear = 2 * i  # Linear, ReLU, Linear, ...
            for m, q in enumerate((q1, q2)):
                assert torch.allclose(layer.weight.grad[m], q[linear].weight.grad.t(), atol=1e-6, rtol=0)
                assert torch.allclose(layer.bias.grad[m, 0], q[linear].bias.grad, atol=1e-6, rtol=0)


def test_a_checkpoint_of_separate_critics_resumes_on_the_ensemble():
    """Modules and Adam's moments of the old layout load, and the next step is the one the old code took."""
    q1, q2 = separate_pair()
    old_params = list(q1.parameters()) + list(q2.parameters())  # the old TwinQ's order: q1, then q2
    old_opt = adam(old_params, 1e-3)
    obs, act = inputs()
    target = torch.randn(8)

    def loss(pair):
        x = torch.cat([obs, act], -1)
        return sum((q(x).squeeze(-1) - target).pow(2).mean() for q in pair)

    for _ in range(3):
        old_opt.zero_grad()
        loss((q1, q2)).backward()
        old_opt.step()
    saved_module, saved_opt = copy.deepcopy(legacy_state(q1, q2)), copy.deepcopy(old_opt.state_dict())

    twin = TwinQ(OBS, ACT, HIDDEN)
    twin.load_state_dict(saved_module)
    new_opt = adam(twin.parameters(), 1e-3)
    new_opt.load_state_dict(twin.legacy_optimizer_state(saved_opt))
    old_opt.zero_grad()
    loss((q1, q2)).backward()
    old_opt.step()
    new_opt.zero_grad()
    sum((q - target).pow(2).mean() for q in twin(obs, act)).backward()
    new_opt.step()
    for i, layer in enumerate(twin.net.layers):
        for m, q in enumerate((q1, q2)):
            assert torch.allclose(layer.weight[m], q[2 * i].weight.t(), atol=1e-6, rtol=0)
            assert torch.allclose(layer.bias[m, 0], q[2 * i].bias, atol=1e-6, rtol=0)
    # A state already in the ensemble's layout passes through untouched.
    current = new_opt.state_dict()
    assert twin.legacy_optimizer_state(current) is current


def as_separate(twin_state: dict, opt_state: dict | None = None):
    """The inverse of the ensemble's layout: what a pre-ensemble checkpoint held."""
    module = {}
    layers = sorted({int(k.split(".")[2]) for k in twin_state})
    for layer in layers:
        weight, bias = twin_state[f"net.layers.{layer}.weight"], twin_state[f"net.layers.{layer}.bias"]
        for m in (0, 1):
            module[f"q{m + 1}.{2 * layer}.weight"] = weight[m].t().clone()
            module[f"q{m + 1}.{2 * layer}.bias"] = bias[m, 0].clone()
    if opt_state is None:
        return module
    new = 2 * len(layers)
    state = {}
    for j, entry in opt_state["state"].items():
        for m in (0, 1):
            state[m * new + j] = {k: (v[m].t().clone() if v.dim() == 3 and j % 2 == 0 else v[m, 0].clone())
                                  if torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()}
    group = dict(opt_state["param_groups"][0], params=list(range(2 * new)))
    return module, {"state": state, "param_groups": [group]}


def test_an_algorithm_checkpoint_from_before_the_ensemble_resumes():
    """OfflineAlgorithm.load_state_dict takes the old critic, target critic and critic optimizer as they were."""
    from batchrl.training.algorithms import ALGORITHMS, Context
    from batchrl.training.trainer import algorithm_config

    def build():
        torch.manual_seed(0)
        return ALGORITHMS["td3bc"][1](algorithm_config("td3bc", {"hidden": "16,16"}),
                                      Context(OBS, ACT, 1000, 100.0, torch.device("cpu")))

    algo = build()
    obs, act = inputs((32,))
    from batchrl.training.algorithms.base import Batch

    batch = Batch(obs, act, torch.randn(32), obs.flip(0), torch.zeros(32))
    for _ in range(4):
        algo.update(batch)
    state = copy.deepcopy(algo.state_dict())  # (as a checkpoint read from disk: no tensor shared with algo)
    legacy = copy.deepcopy(state)
    legacy["modules"]["critic"], legacy["optimizers"]["critic"] = as_separate(state["modules"]["critic"],
                                                                              state["optimizers"]["critic"])
    legacy["modules"]["critic_target"] = as_separate(state["modules"]["critic_target"])
    resumed = build()
    resumed.load_state_dict(legacy)
    for model in (algo, resumed):
        torch.manual_seed(5)  # the same target-policy noise for both
        model.update(batch)
    for a, b in zip(algo.critic.parameters(), resumed.critic.parameters()):
        assert torch.equal(a, b)


def test_n_samples_from_one_pass_are_the_draws_of_the_repeated_observations():
    from batchrl.training.networks import TanhGaussianActor

    torch.manual_seed(0)
    actor = TanhGaussianActor(OBS, ACT, HIDDEN)
    obs = inputs((6,))[0]
    torch.manual_seed(1)
    repeated = actor.sample(obs.unsqueeze(1).expand(6, 10, OBS))
    torch.manual_seed(1)
    once = actor.sample_n(obs, 10)
    for a, b in zip(repeated, once):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)


def test_a_frozen_module_takes_no_gradient_and_thaws_as_it_was():
    from batchrl.training.algorithms.base import frozen

    critic = TwinQ(OBS, ACT, HIDDEN)
    critic.net.layers[0].bias.requires_grad_(False)  # a flag of the caller's own, kept
    obs, act = inputs()
    act.requires_grad_(True)
    with frozen(critic):
        critic.q1(obs, act).sum().backward()
    assert act.grad is not None and act.grad.abs().sum() > 0  # the gradient still flows through it
    assert all(p.grad is None for p in critic.parameters())
    assert [p.requires_grad for p in critic.parameters()] == [True, False, True, True, True, True]


def test_the_batched_path_of_cuda_equals_the_per_member_path_of_the_cpu():
    twin = TwinQ(OBS, ACT, HIDDEN)
    obs, act = inputs((4, 6))
    x = torch.cat([obs, act], -1).reshape(-1, OBS + ACT)
    per_member = torch.stack([twin.net.member(m, x) for m in range(2)])
    assert torch.allclose(twin.net.batched(x), per_member, atol=1e-6, rtol=0)
