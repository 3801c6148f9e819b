"""Packaging contracts: import boundaries, generated code in date, the console script."""
import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules_after(statement: str) -> list[str]:
    """Every module loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def imported_after(statement: str) -> set[str]:
    return {m.split(".")[0] for m in modules_after(statement)}


def serving_install_modules() -> list[str]:
    """Every module of the serving install that serves: batchrl.serving, batchrl.protos and the serve command."""
    import batchrl.protos
    import batchrl.serving

    return sorted([m.name for package in (batchrl.serving, batchrl.protos)
                   for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")] + ["batchrl.serve"])


@pytest.mark.parametrize("module", serving_install_modules())
def test_no_module_of_the_serving_install_imports_training_torch_minari_or_gymnasium(module):
    mods = modules_after(f"import {module}")
    assert not {"torch", "minari", "gymnasium", "mujoco"} & {m.split(".")[0] for m in mods}
    assert not [m for m in mods if m.startswith("batchrl.training")]


def test_server_imports_no_torch_minari_or_gymnasium():
    mods = imported_after("import batchrl.serving.server, batchrl.serving.client, batchrl.serving.repository")
    assert "grpc" in mods and "onnxruntime" in mods
    assert not {"torch", "minari", "gymnasium"} & mods


def test_cli_imports_its_sides_lazily():
    mods = imported_after("import batchrl.cli")
    assert not {"torch", "minari", "gymnasium", "grpc", "onnxruntime"} & mods


def test_training_never_imports_grpc():
    mods = imported_after("import batchrl.training.trainer, batchrl.training.export")
    assert "torch" in mods and "grpc" not in mods


def test_generated_protos_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "batchrl.protos.generate", "--check"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_console_script_lists_commands():
    exe = shutil.which("batchrl", path=str(Path(sys.executable).parent))
    assert exe, "the batchrl console script is not installed beside this interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "eval", "export", "serve", "rollout"):
        assert f"  {command} " in out.stdout


def test_the_proto_check_fails_when_a_proto_changes(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    proto = tmp_path / "protos" / "batchrl" / "v1" / "policy.proto"
    proto.write_text(proto.read_text().replace("message ListModelsRequest {}",
                                                "message ListModelsRequest { string filter = 1; }"))
    result = subprocess.run([sys.executable, "-m", "batchrl.protos.generate", "--check", "--root",
                             str(tmp_path / "protos")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "out of date: protos/batchrl/v1/policy_pb2.py" in result.stdout


def test_train_help_names_every_registered_algorithm():
    from batchrl.training.algorithms import ALGORITHMS

    out = subprocess.run([sys.executable, "-m", "batchrl.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0
    for name in ALGORITHMS:
        assert name in out.stdout


def test_the_cli_reports_user_errors_in_one_line_and_keeps_the_traceback_of_bugs(monkeypatch, capsys):
    from batchrl import cli
    from batchrl.errors import UserError

    def busy(argv):
        raise UserError("run folder runs/x is in use by another training process")

    def bug(argv):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.HANDLERS, "train", busy)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err.strip() == "batchrl train: error: run folder runs/x is in use by another training process"
    monkeypatch.setitem(cli.HANDLERS, "train", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed into one line
        cli.main(["train"])
