"""Black-box regression test: every file the model repository opens follows the rule its folders follow,
a symlink may point anywhere inside the repository, never out of it.

A model.onnx linked to a file outside the repository used to load and become the default version,
and a config.json linked outside was read, while a version folder linked outside was refused. Now
such a version is refused like that folder: logged once, counted as batchrl_repository_rejected
{reason="outside"}, refused to an explicit load too, and the versions that are inside keep serving.
"""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from tests.serving.blackbox import serving
from tests.serving.test_repository_hardening import (POLLS, TOKEN, act, install, lines_with, load, models, rejected,
                                                     tiny_policy)


def test_model_and_config_files_linked_outside_the_repository_are_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stray = tiny_policy(outside / "model.onnx")  # a valid model: only where it lies is wrong
    (outside / "config.json").write_text('{"threads": 1}')
    repo = tmp_path / "models"
    install(repo, "a", "1", tiny_policy(tmp_path / "a.onnx"))
    (repo / "a" / "2").mkdir()
    (repo / "a" / "2" / "model.onnx").symlink_to(stray)
    install(repo, "b", "1", tiny_policy(tmp_path / "b.onnx"))
    (repo / "b" / "config.json").symlink_to(outside / "config.json")  # b's settings from outside: refused
    # Links that stay inside the repository are fine, for files as for folders.
    (repo / "settings.json").write_text('{"threads": 1}')
    (repo / "c" / "1").mkdir(parents=True)
    (repo / "c" / "1" / "model.onnx").symlink_to(os.path.join("..", "..", "a", "1", "model.onnx"))
    (repo / "c" / "config.json").symlink_to(os.path.join("..", "settings.json"))

    with serving(repo, "--poll", "0.2", metrics=True, env={"BATCHRL_ADMIN_TOKEN": TOKEN}) as server:
        assert models(server) == {"a": (1, [1]), "c": (1, [1])}
        assert act(server, "a", np.ones((2, 4))).version == 1
        assert act(server, "c", np.ones((2, 4))).actions.shape == [2, 1]
        time.sleep(POLLS)
        for link, target in ((repo / "a" / "2" / "model.onnx", stray), (repo / "b" / "config.json",
                                                                         outside / "config.json")):
            (line,) = lines_with(server, str(link))  # logged once, not on every poll
            assert "outside the repository" in line and str(target.resolve()) in line, line
        assert rejected(server, "a", "outside") == 1
        assert rejected(server, "b", "outside") == 1
        assert server.metric("batchrl_model_load_failures_total", model="a") == 0  # refused, never opened

        for name, version, link in (("a", 2, "a/2/model.onnx"), ("b", 1, "b/config.json")):
            with pytest.raises(grpc.RpcError) as info:  # an explicit load is refused alike
                load(server, name, version)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert link in info.value.details() and "outside the repository" in info.value.details()
        assert models(server) == {"a": (1, [1]), "c": (1, [1])}
        assert act(server, "a", np.ones((2, 4))).version == 1
    assert server.proc.returncode == 0
