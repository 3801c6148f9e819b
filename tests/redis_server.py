"""A private redis-server on a free loopback port (no persistence), for tests that need their own."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time


def start() -> tuple[subprocess.Popen, str]:
    """(the process, its redis:// URL) once it accepts connections; the caller terminates it."""
    binary = shutil.which("redis-server")
    assert binary, "no redis-server on PATH and REDIS_URL is not set: install Redis or point REDIS_URL at one"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("redis-server did not start") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)
