"""Under systemd: READY=1, STATUS= and watchdog pings on NOTIFY_SOCKET; a graceful SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.tools.processes import RunningServer, free_port, server_process

pytestmark = pytest.mark.e2e

MODELS_TOML = Path(__file__).resolve().parents[2] / "models.toml"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


@contextmanager
def start(cache_dir: Path, log_path: Path, env: dict[str, str], *args: str) -> Iterator[tuple[str, RunningServer]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(MODELS_TOML),
               "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", str(port), *args]
    with server_process("edgeserve", command, f"{base}/ready", log_path,
                        env={"EDGESERVE_LOG_FORMAT": "json", **env}, timeout_s=400) as server:
        yield base, server


def listen(sock: socket.socket, messages: list[str], stop: threading.Event) -> threading.Thread:
    """Read the notify socket from the start, as systemd does."""
    def run() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            with suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_systemd_hears_status_ready_and_watchdog_pings(prepared: dict[str, PreparedVariant], cache_dir: Path,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    messages: list[str] = []
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        reader = listen(sock, messages, stop)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        try:
            with start(cache_dir, tmp_path / "server.log", env):
                time.sleep(1.5)
        finally:
            stop.set()
            reader.join()
    lines = [line for message in messages for line in message.splitlines()]
    assert "READY=1" in lines
    assert any(line.startswith("STATUS=loading") for line in lines)
    assert lines.count("WATCHDOG=1") >= 2


def stream_in_background(base: str, frames: list[bytes], first_frame: threading.Event,
                         max_tokens: int = 160) -> threading.Thread:
    def run() -> None:
        body = {"model": "smollm2-135m:q4_1", "messages": STORY, "max_tokens": max_tokens, "stream": True,
                "temperature": 0}
        # a server killed mid-stream breaks the connection: that is what one test wants
        with suppress(httpx.HTTPError), httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                                                     timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    frames.append(line.encode())
                    first_frame.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_refuses_new_requests_and_exits_0(
        prepared: dict[str, PreparedVariant], cache_dir: Path, tmp_path: Path) -> None:
    frames: list[bytes] = []
    first_frame = threading.Event()
    with start(cache_dir, tmp_path / "server.log", {}, "--grace-s", "30") as (base, server):
        reader = stream_in_background(base, frames, first_frame)
        assert first_frame.wait(30)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{base}/v1/chat/completions", timeout=10,
                             json={"model": "smollm2-135m", "messages": STORY, "max_tokens": 4})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["Retry-After"]) >= 1
        reader.join(60)
        assert server.process.wait(30) == 0
    assert frames[-1] == b"data: [DONE]", frames[-3:]  # the stream running at SIGTERM completed
    assert any(b'"finish_reason":"length"' in frame or b'"finish_reason":"stop"' in frame for frame in frames)


def test_a_stream_still_running_when_the_grace_period_ends_is_ended_properly(
        prepared: dict[str, PreparedVariant], cache_dir: Path, tmp_path: Path) -> None:
    frames: list[bytes] = []
    first_frame = threading.Event()
    with start(cache_dir, tmp_path / "server.log", {}, "--grace-s", "2") as (base, server):
        reader = stream_in_background(base, frames, first_frame, max_tokens=1500)
        assert first_frame.wait(30)
        server.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert server.process.wait(30) == 0
        assert time.monotonic() - stopped < 2 + 3  # the grace period and uvicorn's last second
        reader.join(30)
    assert frames[-1] == b"data: [DONE]", frames[-3:]
    assert b'"finish":"cancelled"' in frames[-2], frames[-2]  # stopped early, and says so
    assert (tmp_path / "server.log").read_text().count('"grace_expiring"') == 1


def test_a_second_sigterm_exits_at_once(prepared: dict[str, PreparedVariant], cache_dir: Path,
                                        tmp_path: Path) -> None:
    frames: list[bytes] = []
    first_frame = threading.Event()
    with start(cache_dir, tmp_path / "server.log", {}, "--grace-s", "60") as (base, server):
        reader = stream_in_background(base, frames, first_frame)
        assert first_frame.wait(30)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 1
        assert time.monotonic() - stopped < 5
        reader.join(30)
