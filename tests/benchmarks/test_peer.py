"""The peer trial's data side (no d3rlpy needed): batchrl's transitions as d3rlpy episodes."""
import numpy as np

from benchmarks.peer import write_dataset
from batchrl.training.data import load_dataset


def test_episodes_for_the_peer_keep_every_transition_and_count_what_it_drops(minari_root, tmp_path):
    path = tmp_path / "dataset.npz"
    dropped = write_dataset("test/pendulum/play-v0", path)
    data, arrays = load_dataset("test/pendulum/play-v0"), np.load(path)
    np.testing.assert_array_equal(arrays["observations"], data.observations)
    np.testing.assert_array_equal(arrays["actions"], data.actions)
    np.testing.assert_array_equal(arrays["rewards"], data.rewards)
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
