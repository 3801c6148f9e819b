"""Training on a device: the data on it once, batches drawn there, no host synchronisation in an update, and a
checkpoint that resumes exactly. Each test runs on the CPU here; its CUDA variant is marked ``cuda``, left out
by default and run by benchmarks/device_check.sh on a GPU machine (``pytest -m cuda``)."""
import copy

import pytest
import torch

from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.data import synthetic_dataset
from batchrl.training.trainer import algorithm_config, load_checkpoint, rng_state, save_checkpoint, set_rng_state

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Small networks: what is checked is where tensors live and what is replayed, not speed.
SMALL = {"bc": {"hidden": "32,32"}, "td3bc": {"hidden": "32,32"}, "iql": {"hidden": "32,32"},
         "cql": {"hidden": "32,32", "num_actions": "4"},
         "bcq": {"vae_hidden": "32,32", "actor_hidden": "32,32", "critic_hidden": "32,32"},
         "dt": {"embed": "32", "layers": "1", "context_length": "5", "max_timestep": "50"}}


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(obs_dim=5, act_dim=2, episodes=6, length=40)


@pytest.fixture
def deterministic(request):
    """On CUDA: deterministic kernels (device_check.sh sets CUBLAS_WORKSPACE_CONFIG for cuBLAS)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def build(name: str, data, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    algo = ALGORITHMS[name][1](algorithm_config(name, SMALL[name]),
                               Context(data.obs_dim, data.act_dim, 1_000, 40.0, device))
    mean, std = data.observation_stats()
    return algo, algo.sampler(data, mean, std, device, seed)


def parameters(algo) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": p.detach().cpu().clone() for key, module in algo.modules.items()
            for name, p in module.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
def test_every_algorithm_updates_on_the_device_without_a_host_sync(device, data):
    device = torch.device(device)
    for name in sorted(ALGORITHMS):
        algo, sampler = build(name, data, device)
        batch = sampler.sample(algo.batch_size)
        assert all(t.device.type == device.type for t in vars(batch).values()), name
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # a synchronising call in the step raises
        try:
            for _ in range(3):
                metrics = algo.update(sampler.sample(algo.batch_size))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert all(p.device.type == device.type for m in algo.modules.values() for p in m.parameters()), name
        assert all(torch.isfinite(v).all() for v in metrics.values()), (name, metrics)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["td3bc", "cql", "dt"])  # noise, sampled actions, dropout: every kind of draw
def test_a_checkpoint_resumes_exactly_on_the_device(device, name, data, tmp_path, deterministic):
    device = torch.device(device)
    straight, sampler = build(name, data, device)
    for _ in range(6):
        straight.update(sampler.sample(straight.batch_size))

    first, sampler = build(name, data, device)
    for _ in range(3):
        first.update(sampler.sample(first.batch_size))
    save_checkpoint(tmp_path / "checkpoint.pt", {"algorithm": first.state_dict(), **rng_state(sampler, device)})
    for _ in range(4):  # draws after the checkpoint, which the restore must undo
        torch.rand(3, device=device)
        sampler.sample(first.batch_size)

    resumed, sampler = build(name, data, device, seed=1)  # other weights and streams until restored
    ckpt = load_checkpoint(tmp_path, map_location=device)
    resumed.load_state_dict(ckpt["algorithm"])
    set_rng_state(ckpt, sampler, device)
    for _ in range(3):
        resumed.update(sampler.sample(resumed.batch_size))
    expected, got = parameters(straight), parameters(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected
                                                                    if not torch.equal(expected[k], got[k])]


def test_a_checkpoint_of_one_device_type_is_refused_on_another_with_the_reason(data):
    _, sampler = build("bc", data, torch.device("cpu"))
    state = rng_state(sampler, torch.device("cpu"))
    with pytest.raises(Exception, match="drawn on cpu, not cuda.*--device cpu"):
        set_rng_state(state, copy.copy(sampler), torch.device("cuda"))


@pytest.mark.cuda
def test_the_batched_critics_on_cuda_equal_the_per_member_path_on_the_cpu():
    from batchrl.training.networks import TwinQ

    torch.manual_seed(0)
    twin = TwinQ(5, 2, (32, 32))
    x = torch.randn(64, 7)
    cpu = torch.stack([twin.net.member(m, x) for m in range(2)])
    gpu = copy.deepcopy(twin).cuda().net(x.cuda())  # (the CUDA path: one baddbmm per layer)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
