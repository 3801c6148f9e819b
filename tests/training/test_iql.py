"""IQL and BC: hand-computed losses, and a one-step task whose right answer is known."""
import numpy as np
import pytest
import torch

from batchrl.training.algorithms import ALGORITHMS, Batch, Context
from batchrl.training.algorithms.iql import awr_weights, expectile_loss
from batchrl.training.networks import GaussianActor
from batchrl.training.trainer import algorithm_config

from tests.training.two_mode import train_two_mode


def test_expectile_loss_hand_computed():
    diff = torch.tensor([2.0, -2.0, 0.5, -0.5, 0.0])
    # tau * d^2 above zero, (1 - tau) * d^2 below.
    expected = torch.tensor([0.7 * 4, 0.3 * 4, 0.7 * 0.25, 0.3 * 0.25, 0.0])
    torch.testing.assert_close(expectile_loss(diff, 0.7), expected)
    # tau = 0.5 is half the mean squared error.
    torch.testing.assert_close(expectile_loss(diff, 0.5), 0.5 * diff.pow(2))


def test_expectile_minimiser_is_the_upper_expectile():
    # For samples {0, 1} with equal mass the tau-expectile is tau.
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    samples = torch.tensor([0.0, 1.0])
    for _ in range(200):
        opt.zero_grad()
        expectile_loss(samples - v, 0.7).mean().backward()
        opt.step()
    assert v.item() == pytest.approx(0.7, abs=1e-4)


def test_awr_weights_multiply_beta_and_clip():
    adv = torch.tensor([-1.0, 0.0, 0.5, 10.0])
    torch.testing.assert_close(awr_weights(adv, 3.0, 100.0),
                               torch.tensor([np.exp(-3.0), 1.0, np.exp(1.5), 100.0], dtype=torch.float32))


def test_gaussian_log_prob_hand_computed():
    actor = GaussianActor(2, 2, (4,))
    with torch.no_grad():
        actor.log_std.copy_(torch.log(torch.tensor([0.5, 2.0])))
    obs = torch.randn(3, 2)
    acts = torch.rand(3, 2) * 2 - 1
    mean = actor(obs)
    dist = torch.distributions.Normal(mean, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(actor.log_prob(obs, acts), dist.log_prob(acts).sum(-1))


def test_sigmoid_log_std_maps_the_parameter_into_its_range_from_minus_one_and_a_half():
    actor = GaussianActor(2, 2, (4,), std="sigmoid")
    obs, acts = torch.randn(3, 2), torch.rand(3, 2) * 2 - 1
    # p = 0 at the start: log-std -5 + 7 / 2 = -1.5 in every dimension.
    dist = torch.distributions.Normal(actor(obs), torch.full((2,), float(np.exp(-1.5))))
    torch.testing.assert_close(actor.log_prob(obs, acts), dist.log_prob(acts).sum(-1))
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([50.0, np.log(1 / 6)]))  # sigmoid: 1 and 1/7
    torch.testing.assert_close(actor.current_log_std(), torch.tensor([2.0, -4.0]))
    with pytest.raises(ValueError, match="std must be one of \\['clamp', 'sigmoid'\\], got 'exp'"):
        GaussianActor(2, 2, (4,), std="exp")


def test_iql_builds_its_actor_with_the_chosen_std():
    from batchrl.training.algorithms.iql import IQL, IQLConfig

    ctx = Context(obs_dim=3, act_dim=2, total_steps=10, return_range=1.0, device=torch.device("cpu"))
    assert IQL(IQLConfig(hidden=(8,)), ctx).actor.current_log_std()[0].item() == -1.5  # the default: sigmoid
    assert IQL(IQLConfig(hidden=(8,), actor_std="clamp"), ctx).actor.current_log_std()[0].item() == 0.0
    with pytest.raises(ValueError, match="iql actor_std must be one of \\['clamp', 'sigmoid'\\], got 'wide'"):
        IQLConfig(actor_std="wide")


@pytest.fixture(scope="module")
def iql_two_mode():
    return train_two_mode("iql", normalize_rewards=False)


def test_iql_chooses_the_better_mode(iql_two_mode):
    _, actions, _ = iql_two_mode
    assert actions.mean().item() > 0.6, actions.mean()
    assert (actions > 0.4).float().mean().item() > 0.95


def test_iql_value_is_the_upper_expectile_of_q(iql_two_mode):
    # Q(s, +0.8) = 1 and Q(s, -0.8) = 0 with equal mass: V = the 0.7-expectile = 0.7
    # (a flipped expectile sign would give 0.3).
    algo, _, probe = iql_two_mode
    with torch.no_grad():
        v = algo.value(probe).mean().item()
        q = torch.min(*algo.critic(probe, torch.full((200, 1), 0.8))).mean().item()
    assert q == pytest.approx(1.0, abs=0.1)
    assert v == pytest.approx(0.7, abs=0.08)


@pytest.mark.parametrize("policy", ["gaussian", "deterministic"])
def test_bc_averages_the_two_modes(policy):
    _, actions, _ = train_two_mode("bc", policy=policy)
    assert abs(actions.mean().item()) < 0.2, actions.mean()


def test_deterministic_bc_loss_is_the_mean_squared_error():
    algo = ALGORITHMS["bc"][1](algorithm_config("bc", {"hidden": (8,), "policy": "deterministic", "lr": "0"}),
                               Context(3, 2, 10, 1.0, torch.device("cpu")))
    obs, acts = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    with torch.no_grad():
        expected = (algo.actor(obs) - acts).pow(2).mean().item()
    assert algo.update(Batch(obs, acts, torch.zeros(5), obs, torch.zeros(5)))["actor_loss"].item() == \
        pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="bc policy must be one of"):
        algorithm_config("bc", {"policy": "mixture"})


def test_iql_with_a_deterministic_actor_chooses_the_better_mode():
    _, actions, _ = train_two_mode("iql", normalize_rewards=False, actor="deterministic")
    assert actions.mean().item() > 0.6, actions.mean()


@pytest.mark.parametrize("horizon, lr_at_end", [(None, 0.0), ("0", 3e-4), ("40", 3e-4 * (1 + np.cos(np.pi / 2)) / 2)])
def test_iql_actor_learning_rate_horizon(horizon, lr_at_end):
    settings = {"hidden": (8,)} | ({} if horizon is None else {"actor_lr_horizon": horizon})
    algo = ALGORITHMS["iql"][1](algorithm_config("iql", settings), Context(2, 1, 20, 1.0, torch.device("cpu")))
    for _ in range(20):  # the run's length: 20 steps
        algo.update(Batch(torch.randn(4, 2), torch.rand(4, 1), torch.zeros(4), torch.randn(4, 2), torch.zeros(4)))
    assert algo.optimizers["actor"].param_groups[0]["lr"] == pytest.approx(lr_at_end, abs=1e-9)


def test_a_flipped_beta_would_fail_the_mode_test():
    # The policy-improvement test is sensitive to the sign of beta: weighting by
    # exp(-beta * A) picks the worse mode.
    _, actions, _ = train_two_mode("iql", steps=800, normalize_rewards=False, beta=-3.0)
    assert actions.mean().item() < -0.5


def test_rewards_are_scaled_by_1000_over_the_return_range():
    config = algorithm_config("iql", {"hidden": (8,)})
    algo = ALGORITHMS["iql"][1](config, Context(3, 1, 10, 250.0, torch.device("cpu")))
    assert algo.reward_scale == pytest.approx(4.0)
    off = ALGORITHMS["iql"][1](algorithm_config("iql", {"hidden": (8,), "normalize_rewards": "false"}),
                               Context(3, 1, 10, 250.0, torch.device("cpu")))
    assert off.reward_scale == 1.0


def test_iql_critic_target_bootstraps_through_truncation_not_termination():
    # V is held at 5 (zero weights, bias 5, value lr 0): the critic's target must be
    # r + 0.99 * 5 where the episode goes on (or was truncated) and r alone where it terminated.
    torch.manual_seed(0)
    config = algorithm_config("iql", {"hidden": (8,), "normalize_rewards": False, "value_lr": 0.0})
    algo = ALGORITHMS["iql"][1](config, Context(2, 1, 10, 1.0, torch.device("cpu")))
    with torch.no_grad():
        for p in algo.value.parameters():
            p.zero_()
        algo.value.net[-1].bias.fill_(5.0)
    obs = torch.randn(4, 2)
    act = torch.rand(4, 1) * 2 - 1
    terminals = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        q1, q2 = algo.critic(obs, act)
    metrics = algo.update(Batch(obs, act, torch.ones(4), obs, terminals))
    target = 1.0 + 0.99 * 5.0 * (1.0 - terminals)
    expected = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
    assert metrics["critic_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert algo.value(obs).tolist() == pytest.approx([5.0] * 4)


@pytest.mark.parametrize("order, next_v", [("reference", 5.0 + 3e-4), ("joint", 5.0)])
def test_iql_update_order_chooses_the_v_the_critic_backs_up_onto(order, next_v):
    # V is a constant 5 (zero weights, bias 5) below the target Q, so V's first Adam step raises its bias by
    # exactly the learning rate: "reference" backs Q up onto the stepped V (5 + 3e-4), "joint" (d3rlpy's)
    # onto the V of before the step (5). Terminals 0, reward 1: target = 1 + 0.99 * next_v.
    torch.manual_seed(0)
    config = algorithm_config("iql", {"hidden": (8,), "normalize_rewards": False, "update_order": order})
    algo = ALGORITHMS["iql"][1](config, Context(2, 1, 10, 1.0, torch.device("cpu")))
    with torch.no_grad():
        for p in algo.value.parameters():
            p.zero_()
        algo.value.net[-1].bias.fill_(5.0)
        for p in algo.critic_target.parameters():
            p.zero_()
        algo.critic_target.net.layers[-1].bias.fill_(50.0)  # target Q = 50 > V: V's bias steps up
    obs = torch.randn(4, 2)
    act = torch.rand(4, 1) * 2 - 1
    with torch.no_grad():
        q1, q2 = algo.critic(obs, act)
    metrics = algo.update(Batch(obs, act, torch.ones(4), obs, torch.zeros(4)))
    target = 1.0 + 0.99 * next_v
    expected = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
    assert metrics["critic_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert algo.value(obs).tolist() == pytest.approx([5.0 + 3e-4] * 4, rel=1e-6)
    with pytest.raises(ValueError, match="iql update_order must be one of \\['reference', 'joint'\\], got 'late'"):
        algorithm_config("iql", {"update_order": "late"})
