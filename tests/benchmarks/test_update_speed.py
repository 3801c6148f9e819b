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


def test_the_report_puts_every_algorithm_beside_its_flops_and_ceiling(data, monkeypatch):
    from benchmarks import update_speed

    monkeypatch.setattr(update_speed, "synthetic_dataset", lambda: data)
    monkeypatch.setattr(update_speed, "UPDATES", {name: 2 for name in update_speed.UPDATES})
    monkeypatch.setattr(update_speed, "MATMUL_ROWS", 64)
    rows = update_speed.measure(["bc", "td3bc"], rounds=1, peer=False, compile_too=False)
    for name, row in rows.items():
        assert row["gflop_per_update"] > 0 and row["matmul_gflops"] > 0
        assert row["ceiling"] == pytest.approx(row["matmul_gflops"] / row["gflop_per_update"])
        assert row["fraction_of_ceiling"] == pytest.approx(row["batchrl_median"] / row["ceiling"])
    # TD3+BC's twin critic counts as two layers per ensemble layer; its update costs more than BC's.
    assert rows["td3bc"]["gflop_per_update"] > rows["bc"]["gflop_per_update"]
    text = update_speed.markdown({"machine": "m", "torch": "t", "rounds": 1, "load_before": (0.0,) * 3,
                                  "load_after": (0.0,) * 3, "note": "", "command": "c", "rows": rows})
    assert "| bc | 256 |" in text and "| td3bc | 256 |" in text


def test_flops_are_counted_on_the_update_and_layer_shapes_on_trained_networks(data):
    from benchmarks.update_speed import update_flops

    flops, shapes = update_flops("td3bc", data)
    # actor 11-256-256-3 and two critics 14-256-256-1 (targets excluded)
    assert sorted(shapes) == sorted([(11, 256), (256, 256), (256, 3)] + [(14, 256), (256, 256), (256, 1)] * 2)
    assert flops > 2 * 256 * (14 * 256 + 256 * 256) * 2  # at least the critics' forward on one batch
