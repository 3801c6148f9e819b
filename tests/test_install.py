"""The install itself: one import namespace in the wheel, no old top-level names, and a
serving-only install (the Dockerfile's serving image) that starts and serves."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc

from tests.serving import blackbox
from tests.serving.blackbox import policy_pb2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` of the tracked files (a copy: setuptools' build/ folder in a working tree can
    hold files that are gone from the source)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)], check=True,
                   capture_output=True)
    return next(out.glob("batchrl-*.whl"))


def test_the_wheel_installs_only_the_batchrl_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
    assert all(n.startswith(("batchrl/", dist_info + "/")) for n in names), [
        n for n in names if not n.startswith(("batchrl/", dist_info + "/"))]
    for path in ("batchrl/cli.py", "batchrl/serving/server.py", "batchrl/training/trainer.py",
                 "batchrl/protos/batchrl/v1/policy_pb2.py", "batchrl/protos/batchrl/v1/policy.proto"):
        assert path in names


@pytest.mark.parametrize("cwd", ["elsewhere", "checkout"])
def test_the_old_top_level_names_do_not_import(cwd, tmp_path):
    for name in ("training", "serving", "protos"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path if cwd == "elsewhere" else ROOT,
                                capture_output=True, text=True)
        assert result.returncode != 0, name
        if cwd == "checkout":  # the folder is found, but refuses a second name
            assert f"this package is batchrl.{name}" in result.stderr


@pytest.fixture(scope="module")
def serving_python(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding exactly the serving install (the serving image's: with the experience
    log's extra)."""
    env = tmp_path_factory.mktemp("serve-venv")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[serve,experience]"], check=True,
                   capture_output=True)
    return python


def test_the_serving_install_holds_no_training_dependencies(serving_python, tmp_path):
    for name in ("torch", "minari", "gymnasium", "mujoco"):
        result = subprocess.run([str(serving_python), "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert result.returncode != 0, f"{name} is importable in the serving install"


def test_the_serving_install_serves_act_oip_and_a_whole_dt_session(serving_python, tmp_path):
    obs = np.zeros(11, np.float32)
    tensor = policy_pb2.Tensor(shape=[1, 11], data=obs.tobytes())
    with blackbox.serving(ROOT / "models", "--log-experience", str(tmp_path / "log"), python=serving_python) as srv:
        stub = srv.policy()
        assert list(stub.Act(policy_pb2.ActRequest(model="hopper-iql", observations=tensor), timeout=10)
                    .actions.shape) == [1, 3]
        request = kv.ModelInferRequest(model_name="hopper-iql")
        request.inputs.add(name="observations", datatype="FP32", shape=[1, 11])
        request.raw_input_contents.append(obs.tobytes())
        answer = kv_grpc.GRPCInferenceServiceStub(srv.channel()).ModelInfer(request, timeout=10)
        assert list(answer.outputs[0].shape) == [1, 3] and len(answer.raw_output_contents[0]) == 12
        session = stub.OpenSession(policy_pb2.OpenSessionRequest(model="hopper-dt"), timeout=10)
        one = policy_pb2.Tensor(shape=[11], data=obs.tobytes())
        steps = [stub.Step(policy_pb2.StepRequest(session_id=session.session_id, observation=one,
                                                  **({"reward": 1.0} if t else {})), timeout=10) for t in range(5)]
        assert [s.timestep for s in steps] == list(range(5)) and all(len(s.action.data) == 12 for s in steps)
        assert stub.CloseSession(policy_pb2.CloseSessionRequest(session_id=session.session_id), timeout=10).steps == 5
        assert "Traceback" not in srv.log
    assert len(list((tmp_path / "log").glob("experience-*.parquet"))) == 1  # the drain wrote the session's 5 steps


def test_the_dockerfile_serving_image_is_the_serving_install():
    text = (ROOT / "Dockerfile").read_text()
    stage = text.split(" AS serve\n", 1)[1].split("\nFROM ", 1)[0]
    assert re.findall(r"pip install ([^\n&\\#]+?)\s*(?:#|$)", stage, re.M) == ['".[serve,experience]"']
