"""The replay buffer's split into episodes (benchmarks.make_datasets, issue 33) on arrays whose episodes are known."""
import numpy as np

from benchmarks.make_datasets import split_episodes


def test_a_replay_buffer_splits_at_its_dones_keeps_final_observations_and_drops_the_partial_tail():
    steps = 9  # episodes: 0-2 (terminated), 3-6 (time limit), then 7-8 unfinished
    obs = np.arange(steps, dtype=np.float32)[:, None] * 10
    next_obs = obs + 1  # the observation after each step: the final one of an episode is only here
    dones, timeouts = np.zeros(steps), np.zeros(steps)
    dones[[2, 6]] = 1
    timeouts[6] = 1
    episodes = split_episodes(obs, next_obs, obs[:, :1] / 10, np.arange(steps) * 0.5, dones, timeouts)
    assert [len(e["actions"]) for e in episodes] == [3, 4]
    first, second = episodes
    np.testing.assert_array_equal(first["observations"][:, 0], [0, 10, 20, 21])
    np.testing.assert_array_equal(second["observations"][:, 0], [30, 40, 50, 60, 61])
    np.testing.assert_array_equal(second["rewards"], [1.5, 2.0, 2.5, 3.0])
    assert first["terminations"].tolist() == [False, False, True] and not first["truncations"].any()
    assert second["truncations"].tolist() == [False, False, False, True] and not second["terminations"].any()
