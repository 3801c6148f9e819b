"""Fitted Q evaluation on a tiny MDP whose values are known in closed form."""
from __future__ import annotations

import json

import numpy as np
import pytest

from batchrl.training.data import OfflineDataset
from tests.conftest import write_dataset
from batchrl.training.ope import FQEConfig, estimate, replicate_episodes


def bandit_chain(episodes: int = 300, length: int = 40, end_probability: float = 0.0, seed: int = 0):
    """States s ~ U[-1, 1] drawn afresh every step whatever the action; actions a ~ U[-1, 1]; reward s·a + a;
    each step terminates with probability ``end_probability``, else episodes are truncated at ``length``.
    A constant policy π(s) = c has expected reward c per step, so its value is c / (1 − γ(1 − p))."""
    rng = np.random.default_rng(seed)
    obs, nxt, act, rew, term, trunc, lengths = [], [], [], [], [], [], []
    for _ in range(episodes):
        s = rng.uniform(-1, 1, size=length + 1).astype(np.float32)
        a = rng.uniform(-1, 1, size=length).astype(np.float32)
        ends = rng.random(length) < end_probability
        n = int(np.argmax(ends)) + 1 if ends.any() else length
        obs.append(s[:n, None]), nxt.append(s[1:n + 1, None]), act.append(a[:n, None])
        rew.append((s[:n] * a[:n] + a[:n]).astype(np.float32))
        t = np.zeros(n, np.float32)
        t[-1] = 1.0 if ends.any() else 0.0
        term.append(t)
        u = np.zeros(n, np.float32)
        u[-1] = 1.0 - t[-1]
        trunc.append(u)
        lengths.append(n)
    lengths = np.asarray(lengths, np.int64)
    return OfflineDataset(
        dataset_id="test/bandit-chain", env_id="", observations=np.concatenate(obs), actions=np.concatenate(act),
        rewards=np.concatenate(rew), next_observations=np.concatenate(nxt), terminations=np.concatenate(term),
        truncations=np.concatenate(trunc), episode_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]),
        episode_lengths=lengths, action_low=-np.ones(1, np.float32), action_high=np.ones(1, np.float32),
        ref_min_score=None, ref_max_score=None)


def constant(c: float):
    return lambda obs: np.full((len(obs), 1), c, np.float32)


SMALL = dict(gamma=0.9, steps=3000, batch_size=256, lr=1e-3, hidden=(64, 64), target_update=50)


@pytest.mark.parametrize("c, end_probability", [(0.5, 0.0), (-0.5, 0.0), (0.5, 0.1)])
def test_fqe_recovers_a_known_value(c, end_probability):
    """Within 5% of c / (1 − γ(1 − p)): 5.0, −5.0 and 2.63 (termination must stop the bootstrap)."""
    data = bandit_chain(end_probability=end_probability)
    truth = c / (1 - 0.9 * (1 - end_probability))
    result = estimate(data, constant(c), FQEConfig(**SMALL, bootstrap=0), progress=False)
    assert result.value == pytest.approx(truth, rel=0.05), (result.value, truth)
    assert result.low is None and result.method == "no interval (bootstrap = 0)"


def test_the_bootstrap_interval_covers_the_value_and_replicates_are_shared():
    data = bandit_chain(episodes=200)
    config = FQEConfig(**{**SMALL, "steps": 2000, "target_update": 33}, bootstrap=3, confidence=0.9)  # 60 refreshes
    result = estimate(data, constant(0.5), config, progress=False)
    assert result.low < result.high and abs(result.value - 5.0) < 0.25, result
    assert all(abs(v - 5.0) < 0.5 for v in result.replicates), result  # each refit is near the truth too
    assert len(result.replicates) == 3 and result.method.startswith("90% percentile bootstrap over B=3")
    other = FQEConfig(**{**SMALL, "lr": 0.1}, bootstrap=3)  # other fit settings, the same seed: the same data
    first, again = replicate_episodes(200, config), replicate_episodes(200, other)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # the same replicates for every candidate
    assert not np.array_equal(first[0], first[1])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="gamma must be in"):
        FQEConfig(gamma=1.0)
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        FQEConfig(bootstrap=-1)


def test_ope_command_estimates_an_exported_model_and_refuses_a_sequence_model(dt_repository, capsys):
    from batchrl.cli import main

    assert main(["ope", str(dt_repository / "pendulum"), "--steps", "200", "--bootstrap", "2", "--gamma", "0.9",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "test/pendulum/play-v0" and out["transitions"] == 800 and out["episodes"] == 8
    assert len(out["replicates"]) == 2 and out["low"] <= out["high"] and np.isfinite(out["value"])
    assert out["method"] == "95% percentile bootstrap over B=2 FQE refits on episode-resampled data"
    # Pendulum's rewards are in [-16.3, 0]: a discounted value (gamma 0.9) lies in [-163, 0]
    assert -163.0 <= out["value"] <= 0.0
    assert main(["ope", str(dt_repository / "dt-a"), "--steps", "10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a sequence model (dt)" in err[0] and "batchrl eval" in err[0], err


def test_the_paired_gate_passes_a_better_policy_and_refuses_a_worse_one():
    from batchrl.training.ope import compare

    data = bandit_chain(episodes=100)
    # 24 target refreshes: within ~10% of the values (0.9^24 = 0.08 of the horizon left out), enough to rank
    config = FQEConfig(**{**SMALL, "steps": 600, "target_update": 25}, bootstrap=2, confidence=0.9)
    up = compare(data, constant(0.5), constant(0.2), config, progress=False)  # values 5.0 against 2.0
    assert up.better and up.low > 0 and up.difference == pytest.approx(3.0, rel=0.25), up
    down = compare(data, constant(0.2), constant(0.5), config, progress=False)  # candidate − deployed < 0
    assert not down.better and down.high < 0, down
    assert down.difference == pytest.approx(-up.difference)
    with pytest.raises(ValueError, match="needs bootstrap >= 2"):
        compare(data, constant(0.5), constant(0.2), FQEConfig(**SMALL, bootstrap=1), progress=False)


def test_ope_refuses_a_dataset_of_other_sizes(repository, minari_root, capsys):
    from batchrl.cli import main
    from tests import chain_env

    write_dataset(minari_root, "test/sizes/chain-v0", chain_env.episodes(3), env=chain_env.ENV_ID, ref=None)
    assert main(["ope", str(repository / "pendulum"), "--dataset", "test/sizes/chain-v0", "--steps", "10"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("dataset 'test/sizes/chain-v0' has observations of size 1, but "
                        f"{repository / 'pendulum' / '2' / 'model.onnx'} has 3"), err
