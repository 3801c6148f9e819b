"""The peer trial's data side (no d3rlpy needed): batchrl's transitions as d3rlpy episodes; the gate's noise."""
import math

import numpy as np
import pytest

from benchmarks.peer import write_dataset
from batchrl.training.data import load_dataset


def test_episodes_for_the_peer_keep_every_transition_and_count_what_it_drops(minari_root, tmp_path):
    path = tmp_path / "dataset.npz"
    dropped = write_dataset("test/pendulum/play-v0", path)
    data, arrays = load_dataset("test/pendulum/play-v0"), np.load(path)
    np.testing.assert_array_equal(arrays["observations"], data.observations)
    np.testing.assert_array_equal(arrays["actions"], data.actions)
    np.testing.assert_array_equal(arrays["rewards"], data.rewards)
    np.testing.assert_array_equal(arrays["next_observations"], data.next_observations)  # what check_data compares
    ends = data.episode_starts + data.episode_lengths - 1
    # every episode ends in exactly one of terminal or timeout, and nothing else does
    assert np.all(arrays["terminals"][ends] + arrays["timeouts"][ends] == 1)
    inner = np.setdiff1d(np.arange(len(data.rewards)), ends)
    assert not arrays["terminals"][inner].any() and not arrays["timeouts"][inner].any()
    # Pendulum never terminates: d3rlpy drops the last transition of each of the 8 episodes
    assert dropped == 8 == int(arrays["timeouts"].sum())
    mean, std = data.observation_stats()
    np.testing.assert_array_equal(arrays["obs_mean"], mean)
    np.testing.assert_array_equal(arrays["obs_std"], std)
    assert arrays["return_max"] == data.episode_returns.max() and arrays["return_min"] == data.episode_returns.min()


def test_identical_algorithms_fail_the_gate_as_often_as_students_t_says():
    """With per-seed std far above 5 points the margin is the pooled std, so 3 against 2 seeds fail when
    t = diff / (s_p * sqrt(1/3 + 1/2)) < -1/sqrt(5/6), t with 3 degrees of freedom: P = 0.1767 (closed form)."""
    from benchmarks.peer_gate_noise import false_failure

    t = -1 / math.sqrt(5 / 6)
    expected = 0.5 + (t / math.sqrt(3) / (1 + t * t / 3) + math.atan(t / math.sqrt(3))) / math.pi
    rng = np.random.default_rng(0)
    assert false_failure(1e4, 3, 2, 400_000, rng) == pytest.approx(expected, abs=0.003)
    assert false_failure(0.01, 3, 2, 10_000, rng) == 0.0  # far below 5 points: never
    # One seed a side: no pooled std, the margin is 5, so P = Phi(-5 / (sigma sqrt 2)); sigma 5: Phi(-0.7071).
    assert false_failure(5.0, 1, 1, 400_000, rng) == pytest.approx(0.2398, abs=0.003)


def test_the_peer_difference_names_the_actor_std_and_update_order_only_where_batchrl_differs():
    from benchmarks.peer import difference

    assert "sigmoid" in difference("iql", {"actor_std": "clamp", "update_order": "joint"})
    assert "sigmoid" not in difference("iql", {"actor_std": "sigmoid", "update_order": "joint"})
    assert "before the step's V update" in difference("iql", {"actor_std": "sigmoid", "update_order": "reference"})
    assert "before" not in difference("iql", {"actor_std": "sigmoid", "update_order": "joint"})
    assert "one learning rate" in difference("iql", {"actor_std": "sigmoid", "update_order": "joint"})
