"""Faults against a real server (issue 8, part 3): a runner that raises mid-generation, a storm of
clients leaving mid-stream, a corrupt or truncated GGUF and a cache that cannot be written at
start-up.

The runner failure is injected with EDGESERVE_FAULT_MARKER (see edgeserve.runtime.faults: no
request can make llama.cpp fail on demand): prompts containing MARKER raise right after their
first token, on the runner's thread, as a failed llama_decode would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edgeserve.runtime.faults import FAULT_MARKER_ENV
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.tools.processes import free_port, server_process
from tests.e2e.conftest import FAMILY, MODELS_TOML, STARTUP_TIMEOUT_S, Server

pytestmark = pytest.mark.e2e

MARKER = "FAULT-7f3a"
PINNED = f"{FAMILY}:q4_1"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
STORM = 50  # below --max-queue (64): `parallel` run, the rest wait, and every one of them leaves
EXIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FaultyServer(Server):
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def server(prepared: dict[str, PreparedVariant], cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyServer]:
    log_path = tmp_path_factory.mktemp("edgeserve-faults") / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(MODELS_TOML),
               "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", str(port)]
    with server_process("edgeserve", command, f"{base}/ready", log_path, timeout_s=STARTUP_TIMEOUT_S,
                        env={"EDGESERVE_LOG_FORMAT": "json", FAULT_MARKER_ENV: MARKER}) as running:
        yield FaultyServer(base, log_path, running.process)


def gauges(server: Server) -> tuple[float, float]:
    """(running generations, queue depth) from /metrics."""
    values = {}
    for line in httpx.get(f"{server.base}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("edgeserve_running_generations", "edgeserve_queue_depth"):
            values[name] = float(value)
    return values["edgeserve_running_generations"], values["edgeserve_queue_depth"]


def wait_idle(server: Server, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (now := gauges(server)) != (0.0, 0.0):
        assert time.monotonic() < deadline, f"still (running, queued) = {now} after {timeout_s} s"
        time.sleep(0.1)


def chat(server: Server, content: str, request_id: str, *, stream: bool = False,
         max_tokens: int = 8) -> httpx.Response:
    body = {"model": PINNED, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, headers={"X-Request-Id": request_id},
                      timeout=60)


def assert_serving(server: Server) -> None:
    response = chat(server, "Say hello.", f"after-{uuid.uuid4().hex[:8]}")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_a_runner_exception_is_a_500_naming_the_request_and_the_server_serves_on(server: Server) -> None:
    request_id = f"fault-{uuid.uuid4().hex[:8]}"
    response = chat(server, f"Say hello. {MARKER}", request_id)
    assert response.status_code == 500
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert request_id in error["message"]
    assert "injected fault" in error["message"]
    assert server.wait_for_completion_record(request_id)["outcome"] == "failed"
    wait_idle(server)
    assert_serving(server)


def test_a_runner_exception_mid_stream_ends_the_stream_with_an_error_event(server: Server) -> None:
    request_id = f"fault-stream-{uuid.uuid4().hex[:8]}"
    response = chat(server, f"Say hello. {MARKER}", request_id, stream=True)
    assert response.status_code == 200  # sent before the runner failed
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])
    assert server.wait_for_completion_record(request_id)["outcome"] == "failed"
    wait_idle(server)
    assert_serving(server)


def leave_mid_stream(server: Server, request_id: str, after_content: bool, seen: list[str]) -> None:
    """Stream, read the first frame (the role chunk, sent before the request gets its place) or
    the first piece of text, then close the connection."""
    body = {"model": PINNED, "messages": STORY, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60,
                      headers={"X-Request-Id": request_id}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            seen.append(request_id)
            if "error" in event or not after_content or event["choices"][0]["delta"].get("content"):
                break  # leaving the block closes the connection mid-stream


def test_fifty_clients_leaving_mid_stream_leave_nothing_running_and_no_place_held(server: Server) -> None:
    ids = [f"storm-{i}-{uuid.uuid4().hex[:6]}" for i in range(STORM)]
    seen: list[str] = []
    # half leave after the first frame (most are queued then), half after their first text
    threads = [threading.Thread(target=leave_mid_stream, args=(server, rid, i % 2 == 1, seen))
               for i, rid in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(seen) == set(ids)  # every client got a first frame before leaving
    wait_idle(server, timeout_s=10)
    records = [server.wait_for_completion_record(rid) for rid in ids]
    outcomes = {r["outcome"] for r in records}
    assert outcomes <= {"cancelled", "refused"}, [r for r in records if r["outcome"] not in ("cancelled", "refused")]
    assert sum(r["outcome"] == "cancelled" for r in records) >= STORM // 2
    assert any(r["completion_tokens"] for r in records)  # some were generating when they left
    assert_serving(server)
    wait_idle(server)


def test_after_the_faults_nothing_is_in_flight_and_a_stop_is_immediate(server: FaultyServer) -> None:
    """The last test of the module server: a leaked in-flight count would make SIGTERM wait out
    the whole grace period (30 s) for a response that never ends."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    draining = [r for r in server.log_records() if r.get("event") in ("draining", "stopping")]
    assert [r["event"] for r in draining] == ["draining", "stopping"]
    assert draining[0]["in_flight"] == 0 and draining[0]["running"] == 0 and draining[0]["queued"] == 0
    assert draining[1]["unfinished"] == 0


# ---- start-up failures: each starts its own short-lived server -----------------------------


def serve_until_exit(models: Path, cache_dir: Path, log_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(models), "--cache-dir",
               str(cache_dir), "--host", "127.0.0.1", "--port", str(free_port()), "--log-format", "json"]
    with log_path.open("w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.PIPE, text=True, timeout=EXIT_TIMEOUT_S)


def models_file(tmp_path: Path, gguf: Path) -> Path:
    models = tmp_path / "models.toml"
    models.write_text(f'[[families]]\nname = "broken"\ndefault_variant = "v"\n\n'
                      f'[[families.variants]]\nname = "v"\npath = "{gguf}"\nn_ctx = 512\n')
    return models


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_or_truncated_gguf_at_start_up_exits_naming_the_file(
        damage: str, prepared: dict[str, PreparedVariant], cache_dir: Path, tmp_path: Path) -> None:
    good = prepared[f"{FAMILY}:q2_k"].path
    bad = tmp_path / f"{damage}.gguf"
    if damage == "truncated":  # an interrupted copy: the header and part of the tensors
        with good.open("rb") as source, bad.open("wb") as target:
            target.write(source.read(good.stat().st_size // 3))
    else:
        bad.write_bytes(b"<html>404 Not Found</html>" * 4000)
    log_path = tmp_path / "server.log"
    done = serve_until_exit(models_file(tmp_path, bad), cache_dir, log_path)
    assert done.returncode == 2
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    failed = [r for r in records if r.get("event") == "load_failed"]
    assert len(failed) == 1 and str(bad) in failed[0]["error"]
    expected = "truncated or corrupt" if damage == "truncated" else "not a GGUF file"
    assert expected in failed[0]["error"]
    assert "Traceback" not in log_path.read_text() + done.stderr


@pytest.mark.parametrize("command", ["serve", "calibrate", "models prepare"])
def test_a_cache_directory_that_cannot_be_written_is_a_clear_error(command: str, tmp_path: Path) -> None:
    """A path under a regular file: unwritable even for root (chmod would not stop root)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cache = blocker / "cache"
    done = subprocess.run([sys.executable, "-m", "edgeserve.cli", *command.split(), "--models",
                           str(MODELS_TOML), "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    assert done.returncode == 2
    assert f"the cache directory {cache} cannot be written" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert blocker.is_file()


def test_a_file_where_the_cache_directory_should_be_is_named_and_left_alone(tmp_path: Path) -> None:
    """The check runs before anything is prepared: nothing is created beside it."""
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    done = subprocess.run([sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(MODELS_TOML),
                           "--cache-dir", str(cache), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    assert done.returncode == 2 and "a file, not a directory, is in the way" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
