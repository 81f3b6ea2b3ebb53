"""Server subprocesses for benchmarks and tests: start on a free loopback port, wait until
ready, always stop. Loopback only: nothing here ever binds or calls another address."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def vm_rss_mib(pid: int) -> float | None:
    """Resident memory of a process (Linux /proc), or None where that cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass(frozen=True)
class RunningServer:
    process: subprocess.Popen[bytes]
    ready_s: float


@contextlib.contextmanager
def server_process(name: str, command: list[str], ready_url: str, log_path: Path, *,
                   env: dict[str, str] | None = None, timeout_s: float = 300.0) -> Iterator[RunningServer]:
    """Start `command` with its output in `log_path`, wait until `ready_url` answers 200,
    and terminate it (then kill it) on exit, whatever happened."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        try:
            yield RunningServer(process, wait_ready(process, name, ready_url, log_path, timeout_s))
        finally:
            stop_process(process)


def wait_ready(process: subprocess.Popen[bytes], name: str, url: str, log_path: Path,
               timeout_s: float) -> float:
    """Seconds until `url` answered 200; raises, quoting the log, if the process exits or is slow."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready; "
                               f"its log ({log_path}) ends with:\n{tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s; "
                               f"its log ({log_path}) ends with:\n{tail(log_path)}")
        time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
