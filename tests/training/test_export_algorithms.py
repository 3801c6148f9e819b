"""Every algorithm trains through the trainer, exports with parity <= 1e-5 and is served by Act."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from batchrl.serving.client import PolicyClient
from batchrl.serving.repository import Registry
from batchrl.serving.server import build_server
from batchrl.training.export import export_run
from batchrl.training.trainer import TrainConfig, Trainer, load_policy

SMALL = {
    "bc": {"hidden": (32, 32)},
    "td3bc": {"hidden": (32, 32)},
    "cql": {"hidden": (32, 32)},
    "bcq": {"vae_hidden": (32, 32), "actor_hidden": (32, 32), "critic_hidden": (32, 32)},
}


@pytest.fixture(scope="module")
def exported(minari_root, tmp_path_factory):
    repo = tmp_path_factory.mktemp("models")
    runs = {}
    for name, settings in SMALL.items():
        run_dir = tmp_path_factory.mktemp("runs") / name
        config = TrainConfig(algorithm=name, dataset="test/pendulum/play-v0", steps=60, eval_every=60,
                             eval_episodes=1, log_every=30, checkpoint_every=60, device="cpu",
                             algo={**settings, "batch_size": 32})
        Trainer(run_dir, config, progress=False).run()
        runs[name] = (run_dir, export_run(run_dir, name, repo))
    return repo, runs


@pytest.mark.parametrize("name", sorted(SMALL))
def test_export_parity(exported, name):
    _, runs = exported
    out = runs[name][1]
    assert out["max_abs_diff"] <= 1e-5
    assert out["manifest"]["algorithm"] == name


def test_served_act_matches_onnxruntime_for_every_algorithm(exported):
    repo, runs = exported
    served = build_server(Registry.open(repo, ["CPUExecutionProvider"]), "127.0.0.1:0")
    server, port = served.server, served.port
    server.start()
    obs = np.random.default_rng(3).normal(size=(16, 3)).astype(np.float32)
    try:
        with PolicyClient(f"127.0.0.1:{port}") as client:
            for name, (_, out) in runs.items():
                session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
                np.testing.assert_array_equal(client.act(name, obs), session.run(None, {"observations": obs})[0])
    finally:
        server.stop(grace=None)


def test_bcq_graph_holds_its_latents_and_they_can_be_overridden(exported, tmp_path):
    _, runs = exported
    _, policy, _ = load_policy(runs["bcq"][0])
    obs = torch.randn(64, 3)
    fixed = policy(obs)
    torch.testing.assert_close(policy(obs), fixed, rtol=0, atol=0)  # deterministic acting
    session = ort.InferenceSession(runs["bcq"][1]["path"], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"observations": obs.numpy()})[0], fixed.detach().numpy(), atol=1e-5)

    from batchrl.training.export import to_onnx
    from batchrl.protos.batchrl.v1 import manifest_pb2

    policy.policy.latents = torch.full_like(policy.policy.latents, 0.25)
    path = tmp_path / "override.onnx"
    to_onnx(policy, {"observations": obs.numpy()}, path, manifest_pb2.ModelManifest(algorithm="bcq"))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"observations": obs.numpy()})[0]
    with torch.no_grad():
        want = policy(obs).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # With every latent equal, all 100 candidates coincide: the action is the one decoded candidate.
    with torch.no_grad():
        inner = policy.policy.path
        normed = (obs - policy.obs_mean) / policy.obs_std
        single = inner.actor(normed, inner.vae.decode(normed, torch.full((64, inner.latents.shape[1]), 0.25)))
        scaled = policy.action_low + (single + 1) * 0.5 * (policy.action_high - policy.action_low)
    np.testing.assert_allclose(want, scaled.numpy(), atol=1e-6)
