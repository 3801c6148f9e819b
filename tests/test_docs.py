"""Docs that run (issue 32, item 4): every Python and shell block of README.md and deploy/README.md is run as
written, in document order, in one working folder, as a reader walking through the document would.

What the test changes, and nothing else (README.md, "The documentation is tested", lists the same):
- counts: every `--steps N` and the step counts of a sweep file become STEPS, `train`, `ope` and `promote`
  without `--steps` get `--steps STEPS`, `--eval-every N` becomes STEPS, `--episodes N` EPISODES, and a sweep
  file's lists (seeds, a setting's values) their first item;
- places: `../shared/datasets` becomes small Hopper-v5 datasets built here under the same ids (tests never read
  ../shared); port 50051 (and the example replica addresses 10.0.0.N:50051) becomes a free loopback port, which
  `serve` without `--address` and client commands without `--server` are given; `--metrics-port N` a free port;
  the Redis at redis://127.0.0.1:6379/0 the suite's own ($REDIS_URL, else a private redis-server);
- set-up command 1's install is the one .ci/run has just made (command 2 installs '.[dev]', a superset of
  '.[all]': checked below); only its `batchrl serve` runs here. Command 2 is .ci/run itself (checked verbatim).

Two readers share the work, each in document order in a folder of its own, at once (one torch thread per
process): one takes the offline blocks (training, evaluation, export, data import, sweeps, data files), the
other every other block. A block that starts a server in the foreground leaves it serving the blocks after it, like a second shell; so
does a server a block starts in the background. A block that starts a server stops the ones before it first
(SIGTERM, as Ctrl-C would), and each must have drained cleanly. A block that cannot run here says why in a
comment of its own ("Not run by tests/test_docs.py: ..."): a cluster, Docker, root. Every other block runs:
each shell block exits 0 under `set -euo pipefail` and each Python block prints; no output holds a traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import play, write_dataset
from tests.test_cli import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
STEPS, EPISODES = 10, 2
HOPPER_REF = (20.9, 2709.6)  # the reference returns ../shared's Hopper-v5 sets carry
HOPPER_IDS = ("bench/hopper/medium-v0", "bench/hopper/medium-replay-v0")
NOT_RUN = re.compile(r"#\s*Not run by tests/test_docs\.py: (?P<why>\S.*)")
FILE = re.compile(r"<!--\s*docs-test:\s*file\s+(?P<name>\S+)\s*-->")  # the block below is that file's content
RUNS = {"bash": "shell", "python": "python", "yaml": "file", "csv": "file", "text": "text"}
INSTALL_ALL = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[all]' && "
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e "
                "'.[dev]' && .venv/bin/python -m pytest -q")


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str
    file: str | None  # a data block's file name (its <!-- docs-test: file NAME --> line)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, indented ones (in a list item) included, dedented."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        start = re.match(r"^(\s*)```([\w-]*)\s*$", lines[i])
        if not start:
            i += 1
            continue
        indent, lang, body, j = len(start.group(1)), start.group(2), [], i + 1
        while not re.match(r"^\s*```\s*$", lines[j]):
            body.append(lines[j][indent:])
            j += 1
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        file = FILE.search(before)
        found.append(Block(path.relative_to(ROOT).as_posix(), i + 1, lang, "\n".join(body) + "\n",
                           file and file.group("name")))
        i = j + 1
    return found


def logical(text: str) -> list[str]:
    """A shell block's commands, one per line: continuation lines joined, comments and blank lines left out."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_every_block_is_run_or_says_why_not():
    """The extractor sees every block, each has a language the walk knows, and a block left out names its reason."""
    every = [b for doc in DOCS for b in blocks(doc)]
    assert len(every) >= 25 and {b.lang for b in every} <= set(RUNS), {(b.where, b.lang) for b in every}
    for block in every:
        assert RUNS[block.lang] != "file" or block.file, f"{block.where}: a data block names its file"
        assert RUNS[block.lang] != "text" or not re.search(r"^\s*(\.venv/bin/|batchrl |python)", block.text, re.M), \
            f"{block.where}: a command in a text block"
    skipped = [b for b in every if NOT_RUN.search(b.text)]
    assert {b.doc for b in skipped} == {"deploy/README.md"}, [b.where for b in skipped]  # a cluster, Docker, root
    assert all(b.lang == "bash" for b in skipped)


def test_setup_commands_are_what_ci_runs():
    """Command 2 is .ci/run's command verbatim; command 1 installs what command 2 installs, '.[all]' for '.[dev]'."""
    shell = [b for b in blocks(ROOT / "README.md") if b.lang == "bash"]
    assert logical(shell[0].text) == [INSTALL_ALL + ".venv/bin/batchrl serve"]
    assert logical(shell[2].text) == [TEST_COMMAND]
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.fullmatch(r"batchrl\[(\w+,)*all(,\w+)*\]", need) for need in extras["dev"]), extras["dev"]


class Walk:
    """One reader's walk through the documents: a working folder, a port, the servers left running."""

    def __init__(self, workdir: Path, data_root: Path, redis_url: str):
        self.workdir, self.data_root, self.redis_url = workdir, data_root, redis_url
        self.port = free_port()
        self.servers: list[tuple[int, subprocess.Popen | None]] = []  # (process group, the foreground server)
        # one thread per process (torch's, numpy's): two readers share the suite's two cores
        self.env = {**os.environ, "MINARI_DATASETS_PATH": str(data_root), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1"}
        self.logs: list[Path] = []

    def substitute(self, text: str) -> str:
        """The module docstring's substitutions, one logical command per line."""
        text = text.replace("export MINARI_DATASETS_PATH=../shared/datasets",
                            f"export MINARI_DATASETS_PATH={self.data_root}")
        text = re.sub(r"(?:10\.0\.0\.\d+|127\.0\.0\.1):50051", f"127.0.0.1:{self.port}", text)
        text = re.sub(r"--metrics-port \d+", lambda _: f"--metrics-port {free_port()}", text)
        text = text.replace("redis://127.0.0.1:6379/0", self.redis_url)
        text = re.sub(r"--steps \d+", f"--steps {STEPS}", text)
        text = re.sub(r"--eval-every \d+", f"--eval-every {STEPS}", text)
        text = re.sub(r"--episodes \d+", f"--episodes {EPISODES}", text)
        lines = []
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            command = line.split("#")[0] if line.lstrip().startswith("#") else line
            if re.search(r"batchrl (train|ope|promote)\b", command) and not re.search(r"--steps|--resume", command):
                line = re.sub(r"batchrl (train|ope|promote)\b", rf"batchrl \1 --steps {STEPS}", line, count=1)
            if "batchrl serve" in command and "--address" not in command:
                line = line.replace("batchrl serve", f"batchrl serve --address 127.0.0.1:{self.port}", 1)
            if re.search(r"batchrl (rollout|models)\b", command) and "--server" not in command:
                line = re.sub(r"batchrl (rollout|models)\b", rf"batchrl \1 --server 127.0.0.1:{self.port}", line,
                              count=1)
            lines.append(line)
        return "\n".join(lines) + "\n"

    def output(self, name: str) -> Path:
        log = self.workdir / ".docs-logs" / f"{len(self.logs):02d}-{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs.append(log)
        return log

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            return subprocess.Popen(argv, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def stop_servers(self) -> None:
        """Stop every server left running, each of which drains: one in the foreground of its shell by Ctrl-C
        (SIGINT to the shell's process group; the shell then exits with the server's status), one a shell left in
        the background (where SIGINT is ignored) by SIGTERM to its group."""
        for group, foreground in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM if foreground is None else signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if foreground is not None:
                    foreground.poll()
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.killpg(group, signal.SIGKILL)
                pytest.fail(f"a server started by the docs did not drain within 30 s of SIGTERM ({self.logs[-1]})")
            if foreground is not None:
                assert foreground.wait(5) == 0, f"the server did not drain cleanly: {foreground.returncode}"
        self.servers = []

    def shell(self, block: Block) -> None:
        text = self.substitute(block.text)
        commands = logical(text)
        if any("batchrl serve" in c for c in commands):
            self.stop_servers()
        log = self.output(f"line{block.line}")
        script = log.with_suffix(".sh")  # one per block: bash reads a script as it goes
        script.write_text("set -euo pipefail\n" + (TRACE if os.environ.get("DOCS_TRACE") else "") + text)
        process = self.start(["bash", str(script)], log)
        if "batchrl serve" in commands[-1] and not commands[-1].endswith("&"):  # a server in the foreground
            self.servers.append((process.pid, process))
            self.wait_serving(process, block, log)
            return
        try:
            status = process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            status = "timed out after 300 s"
        self.servers.append((process.pid, None))  # what it left in the background (its group) serves on
        assert status == 0, f"{block.where} exited {status}:\n{text}\n--- output\n{log.read_text()[-4000:]}"

    def wait_serving(self, process: subprocess.Popen, block: Block, log: Path) -> None:
        from batchrl.serving.client import PolicyClient

        with PolicyClient(f"127.0.0.1:{self.port}") as client:
            deadline = time.monotonic() + 120
            while process.poll() is None:
                with contextlib.suppress(ConnectionError):
                    client.wait_ready(1.0)
                    return
                assert time.monotonic() < deadline, f"{block.where}: no server answered in 120 s\n{log.read_text()}"
        pytest.fail(f"{block.where}: the server exited {process.returncode}:\n{log.read_text()[-4000:]}")

    def python(self, block: Block) -> None:
        code = self.substitute(block.text)
        log = self.output(f"line{block.line}")
        done = subprocess.run([sys.executable, "-c", code], cwd=self.workdir, env=self.env, capture_output=True,
                              text=True, timeout=120)
        log.write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"{block.where} failed:\n{code}\n--- output\n{done.stdout}{done.stderr}"
        assert done.stdout.strip(), f"{block.where} printed nothing:\n{code}"

    def file(self, block: Block) -> None:
        text = re.sub(r"\b100000\b", str(STEPS), block.text)  # a sweep file's step counts
        text = re.sub(r"(\w+): \[([\w.]+), [^\]]*\]", r"\1: [\2]", text)  # its lists (seeds, values): the first
        (self.workdir / block.file).write_text(text)

    def run(self, block: Block) -> None:
        kind = RUNS[block.lang]
        if kind in ("shell", "python", "file"):
            getattr(self, kind)(block)

    def tracebacks(self) -> list[str]:
        return [f"{log.name}:\n{log.read_text()[-3000:]}" for log in self.logs if "Traceback" in log.read_text()]


def hopper_datasets(root: Path) -> None:
    """Small Hopper-v5 datasets under the benchmark sets' ids: uniform random actions, 24 short episodes."""
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(0)
    episodes = play(env, lambda obs: rng.uniform(-1, 1, 3), 24, seed=0)
    for dataset_id in HOPPER_IDS:
        write_dataset(root, dataset_id, episodes, env="Hopper-v5", ref=HOPPER_REF)


TRACE = "exec 19>>\"$0.trace\"; BASH_XTRACEFD=19; PS4='+ $(date +%s.%N) '; set -x\n"  # DOCS_TRACE=1: timings

OFFLINE = re.compile(r"(export \w+=\S+|\.venv/bin/batchrl (train|eval|export|data import|sweep)\b.*)")


def offline(block: Block) -> bool:
    """A block that only trains, evaluates, exports, imports or sweeps (or is a data file): no server, no model
    that a server block changes. The second reader takes these (one that needed the first reader's files would
    fail: nothing is skipped)."""
    return RUNS[block.lang] == "file" or (RUNS[block.lang] == "shell" and all(
        OFFLINE.fullmatch(command) for command in logical(block.text)))


def readers(tmp_path: Path, redis_url: str) -> tuple[Walk, Walk]:
    """Two readers of one fresh clone, each in a folder of its own holding what such a reader has at hand: the
    venv .ci/run made (a link) and a copy of the shipped models."""
    import shutil

    data_root = tmp_path / "datasets-root"
    hopper_datasets(data_root)
    walks = []
    for name in ("serving", "offline"):
        work = tmp_path / name
        work.mkdir()
        (work / ".venv").symlink_to(Path(sys.prefix))
        shutil.copytree(ROOT / "models", work / "models")
        walks.append(Walk(work, data_root, redis_url))
    return walks[0], walks[1]


def test_the_docs_run_as_written(tmp_path, redis_url):
    """README.md, then deploy/README.md (whose blocks all need a cluster or root, and say so), by two readers at
    once, each in document order: one the offline blocks (training, evaluation, export, data import, sweeps), the
    other every other block, servers and their clients included."""
    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for block in [b for doc in DOCS for b in blocks(doc)]:
        if NOT_RUN.search(block.text):
            continue
        if block.doc == "README.md" and block.lang == "bash" and TEST_COMMAND in block.text:
            continue  # command 2: .ci/run itself (test_setup_commands_are_what_ci_runs)
        if INSTALL_ALL in block.text:
            block = Block(block.doc, block.line, block.lang, block.text.replace(INSTALL_ALL, ""), None)
        todo.append(block)
    serving, training = readers(tmp_path, redis_url)
    assert 4 <= sum(map(offline, todo)) < len(todo) - 10, [b.where for b in todo if offline(b)]

    def read(walk: Walk, mine: list[Block]) -> None:
        try:
            for block in mine:
                walk.run(block)
        finally:
            walk.stop_servers()

    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(read, serving, [b for b in todo if not offline(b)]),
                pool.submit(read, training, [b for b in todo if offline(b)])]
    for future in done:
        future.result()
    assert not serving.tracebacks() + training.tracebacks(), "\n".join(serving.tracebacks() + training.tracebacks())
