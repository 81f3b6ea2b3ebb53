"""Start a real `edgeserve serve` process on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_server(models: Path, cache_dir: Path, *extra: str, log_path: Path | None = None,
                   timeout_s: float = 120.0) -> Iterator[str]:
    """Yields the base URL; the process is terminated (then killed) on exit."""
    port = free_port()
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = {**os.environ, "EDGESERVE_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(models),
         "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"edgeserve exited with {process.returncode} before it was ready")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"edgeserve not ready after {timeout_s} s")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]
