"""Start a real `edgeserve serve` process on a free loopback port and wait until it is ready."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeserve.tools.processes import free_port, server_process


@contextmanager
def running_server(models: Path, cache_dir: Path, *extra: str, log_path: Path,
                   timeout_s: float = 400.0) -> Iterator[str]:
    """Yields the base URL; the process is terminated (then killed) on exit. The first server
    of a test session calibrates every variant before it is ready, hence the long timeout."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(models),
               "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", str(port), *extra]
    with server_process("edgeserve", command, f"{base}/ready", log_path,
                        env={"EDGESERVE_LOG_FORMAT": "json"}, timeout_s=timeout_s):
        yield base
