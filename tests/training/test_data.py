"""Loading Minari datasets into flat transitions: alignment, episode ends, statistics."""
import numpy as np
import pytest

from tests.conftest import write_dataset
from batchrl.training.data import load_dataset, normalized_score


def labelled_episodes(lengths, ends):
    """Episode e, step t has observation [e, t, e * 1000 + t]; action [e + t / 1000]; reward e * 100 + t.

    ``ends`` gives each episode's final flags: "term", "trunc" or "both".
    """
    episodes = []
    for e, (n, end) in enumerate(zip(lengths, ends)):
        t = np.arange(n + 1, dtype=np.float32)
        obs = np.stack([np.full(n + 1, e, np.float32), t, e * 1000 + t], axis=1)
        term = np.zeros(n, bool)
        trunc = np.zeros(n, bool)
        term[-1] = end in ("term", "both")
        trunc[-1] = end in ("trunc", "both")
        episodes.append({"observations": obs, "actions": (e + t[:-1] / 1000)[:, None].astype(np.float32),
                         "rewards": (e * 100 + t[:-1]).astype(np.float64), "terminations": term,
                         "truncations": trunc})
    return episodes


@pytest.fixture(scope="module")
def labelled(minari_root):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=40).tolist()
    ends = [("term", "trunc", "both")[i % 3] for i in range(40)]
    write_dataset(minari_root, "test/labelled/mixed-v0", labelled_episodes(lengths, ends))
    return load_dataset("test/labelled/mixed-v0"), lengths, ends


def test_every_episode_is_aligned_without_drift(labelled):
    data, lengths, _ = labelled
    assert data.size == sum(lengths)
    assert data.episode_lengths.tolist() == lengths
    assert data.episode_starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    for e, (start, n) in enumerate(zip(data.episode_starts, data.episode_lengths)):
        sl = slice(start, start + n)
        t = np.arange(n)
        np.testing.assert_array_equal(data.observations[sl], np.stack([np.full(n, e), t, e * 1000 + t], 1))
        np.testing.assert_array_equal(data.next_observations[sl], np.stack([np.full(n, e), t + 1, e * 1000 + t + 1], 1))
        np.testing.assert_allclose(data.actions[sl, 0], e + t / 1000, rtol=1e-6)
        np.testing.assert_array_equal(data.rewards[sl], e * 100 + t)


def test_terminations_and_truncations_at_episode_ends(labelled):
    data, lengths, ends = labelled
    last = data.episode_starts + data.episode_lengths - 1
    for e, end in enumerate(ends):
        # An episode flagged both ways ended by termination: it must not bootstrap.
        assert data.terminations[last[e]] == (1.0 if end in ("term", "both") else 0.0), (e, end)
        assert data.truncations[last[e]] == (1.0 if end == "trunc" else 0.0), (e, end)
    inner = np.ones(data.size, bool)
    inner[last] = False
    assert not data.terminations[inner].any() and not data.truncations[inner].any()


def test_returns_statistics_and_metadata(labelled):
    data, lengths, _ = labelled
    expected = [sum(e * 100 + t for t in range(n)) for e, n in enumerate(lengths)]
    np.testing.assert_allclose(data.episode_returns, expected)
    mean, std = data.observation_stats()
    np.testing.assert_allclose(mean, data.observations.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, np.maximum(data.observations.std(0), 1e-3), rtol=1e-5)
    assert data.env_id == "Pendulum-v1"
    assert (data.ref_min_score, data.ref_max_score) == (-1200.0, -150.0)
    assert data.normalized_score(-150.0) == pytest.approx(100.0)
    assert normalized_score(-1200.0, -1200.0, -150.0) == pytest.approx(0.0)
    assert data.action_low.tolist() == [-2.0] and data.action_high.tolist() == [2.0]


def test_unknown_dataset_names_the_id_and_the_root(minari_root):
    with pytest.raises(FileNotFoundError, match="test/none/missing-v0.*MINARI_DATASETS_PATH"):
        load_dataset("test/none/missing-v0")
