"""batchrl promote: FQE's paired gate in front of the repository, a live server picking the version up."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests import chain_env
from tests.conftest import write_dataset
from tests.serving.running import running

FQE = ["--gamma", "0.9", "--steps", "300", "--bootstrap", "2", "--confidence", "0.9"]


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory, minari_root):
    """Runs on the chain: BC (clones random actions: a ≈ 0, value ≈ 0) and TD3+BC with a large α (a → 1,
    value ≈ 10 at γ = 0.9)."""
    from batchrl.training.trainer import TrainConfig, Trainer

    chain_env.register()
    write_dataset(minari_root, "test/chain/random-v0", chain_env.episodes(150), env=chain_env.ENV_ID, ref=None)
    runs = tmp_path_factory.mktemp("chain-runs")
    for algorithm, steps, algo in (("bc", 300, {"hidden": (32, 32)}),
                                   ("td3bc", 1500, {"hidden": (32, 32), "alpha": 100.0})):
        config = TrainConfig(algorithm=algorithm, dataset="test/chain/random-v0", steps=steps, eval_every=steps,
                             eval_episodes=2, device="cpu", algo=algo)
        Trainer(runs / algorithm, config, progress=False).run()
    return runs


def test_promote_publishes_a_better_candidate_under_traffic_and_refuses_a_worse_one(chain_runs, tmp_path, capsys):
    from batchrl.cli import main
    from batchrl.serving.client import act_request
    from batchrl.serving.runtime import load_model
    from batchrl.training.export import export_run

    repo = tmp_path / "models"
    assert main(["promote", "chain", "--candidate", str(chain_runs / "bc"), "--dataset", "test/chain/random-v0",
                 "--repository", str(repo)]) == 1
    assert "nothing named 'chain' is deployed in" in capsys.readouterr().err
    export_run(chain_runs / "bc", "chain", repo)  # deployed: version 1
    failures, versions, stop = [], [], threading.Event()
    with running(repo) as server:
        def traffic():
            while not stop.is_set():
                try:
                    answer = server.client.stub.Act(act_request("chain", np.zeros((1, 1), np.float32), None), timeout=10)
                    versions.append(answer.version)
                except Exception as exc:  # noqa: BLE001 - counted: the test requires none
                    failures.append(repr(exc))
                stop.wait(0.005)  # a controller's pace (~200 requests/s), leaving the CPU to the estimates

        client = threading.Thread(target=traffic)
        client.start()
        try:
            assert main(["promote", "chain", "--candidate", str(chain_runs / "td3bc"), "--dataset",
                         "test/chain/random-v0", "--repository", str(repo), *FQE]) == 0
            out = capsys.readouterr().out
            assert "promoted:" in out and "(version 2)" in out, out
            assert server.registry.poll() == ["loaded chain/2"]  # what `serve --poll` does
            seen = len(versions)
            while len(versions) < seen + 20 and client.is_alive() and not failures:
                stop.wait(0.01)
        finally:
            stop.set()
            client.join()
    assert failures == [] and versions[0] == 1 and versions[-1] == 2, (failures, versions[:3], versions[-3:])
    manifest = load_model("chain", 2, repo / "chain/2/model.onnx", ["CPUExecutionProvider"]).manifest
    assert manifest.promotion.startswith("gate passed: candidate ") and "deployed (version 1)" in manifest.promotion
    # The worse candidate against the new version: refused, nothing written.
    assert main(["promote", "chain", "--candidate", str(chain_runs / "bc"), "--dataset", "test/chain/random-v0",
                 "--repository", str(repo), *FQE]) == 1
    captured = capsys.readouterr()
    assert "deployed (version 2)" in captured.out and "not promoted: the lower bound" in captured.err, captured
    assert sorted(p.name for p in (repo / "chain").iterdir()) == ["1", "2"]
    # --force publishes it, and its manifest says so.
    assert main(["promote", "chain", "--candidate", str(repo / "chain/1"), "--dataset", "test/chain/random-v0",
                 "--repository", str(repo), "--force", "--steps", "50", "--bootstrap", "2"]) == 0
    forced = load_model("chain", 3, repo / "chain/3/model.onnx", ["CPUExecutionProvider"]).manifest
    assert forced.promotion.startswith("forced (the gate would have refused)"), forced.promotion
