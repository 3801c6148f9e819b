"""A policy server on 127.0.0.1 (ephemeral port) over a model repository, for tests."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from batchrl.serving.client import PolicyClient
from batchrl.serving.repository import Registry
from batchrl.serving.server import ServerOptions, build_server
from batchrl.serving.sessions import Sessions, SessionStore


@dataclass
class Running:
    address: str
    registry: Registry
    sessions: Sessions
    client: PolicyClient | None  # None when the test connects its own way (TLS)


@contextlib.contextmanager
def running(repo: Path, options: ServerOptions | None = None, sessions=None, connect: bool = True,
            metrics=None, experience=None, **registry_options):
    """``sessions``: a store, or a function of the registry that makes one (default: in-process);
    ``experience``: an ExperienceLog (the caller closes it)."""
    registry = Registry.open(repo, ["CPUExecutionProvider"], **registry_options)
    store = SessionStore() if sessions is None else sessions(registry) if callable(sessions) else sessions
    served = build_server(registry, options or ServerOptions(), store, metrics, experience)
    served.start()
    address = f"127.0.0.1:{served.port}"
    try:
        if not connect:
            yield Running(address, registry, store, None)
            return
        with PolicyClient(address) as client:
            client.wait_ready()
            yield Running(address, registry, store, client)
    finally:
        served.stop()
