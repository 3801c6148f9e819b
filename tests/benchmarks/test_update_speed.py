"""benchmarks/update_speed.py runs every registered algorithm through its own sampler (so it cannot rot)."""
import pytest

from batchrl.training.algorithms import ALGORITHMS
from benchmarks.update_speed import synthetic_dataset, updates_per_second


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(episodes=4, length=50)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_update_speed_measures_every_algorithm(name, data):
    assert updates_per_second(name, updates=2, data=data, warmup=1) > 0
