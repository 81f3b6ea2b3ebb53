"""A remote variant: a real `python -m llama_cpp.server` on a loopback port. Requests routed there
succeed and stream; killing it makes the router exclude it (with a logged reason) while local
requests keep succeeding; bringing it back re-admits it. The deadline is enforced locally."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeserve.config import VariantConfig
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.remote import RemoteRequest, RemoteVariant
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.tools.processes import free_port, server_process
from edgeserve.variant_id import VariantId
from tests.e2e.conftest import STARTUP_TIMEOUT_S
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

FAMILY = "smollm2-135m"
CLOUD = f"{FAMILY}:cloud"
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]

# The remote (Q8_0 here) is declared far better than the local Q4_1, so routing sends every
# request that fits there while it is up.
POLICY = """
name = "remote-test"
family = "smollm2-135m"
[routing]
min_useful_tokens = 4
[curves.cloud.boxed]
budgets = [8, 64]
accuracy = [0.5, 0.9]
[curves.q4_1.boxed]
budgets = [8, 64]
accuracy = [0.01, 0.02]
"""


@contextmanager
def llama_server(path: Path, port: int, log_path: Path) -> Iterator[None]:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "cloud-model",
               "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port), "--verbose", "False"]
    with server_process("llama_cpp.server", command, f"http://127.0.0.1:{port}/v1/models", log_path,
                        timeout_s=120):
        yield


@pytest.fixture(scope="module")
def remote_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def files(prepared: dict[str, PreparedVariant], remote_port: int,
          tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("remote")
    (folder / "models.toml").write_text(f"""
[[families]]
name = "{FAMILY}"
default_variant = "q4_1"

[[families.variants]]
name = "q4_1"
path = "{prepared[f"{FAMILY}:q4_1"].path}"

[[families.variants]]
name = "cloud"
kind = "remote"
base_url = "http://127.0.0.1:{remote_port}/v1"
model = "cloud-model"
timeout_s = 20
""")
    (folder / "policy.toml").write_text(POLICY)
    return folder


def chat(base: str, **extra: Any) -> httpx.Response:
    body = {"model": FAMILY, "messages": QUESTION, "max_tokens": 16, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers={"X-Deadline-Ms": "20000"}, timeout=60)


def cloud_card(base: str) -> dict[str, Any]:
    cards = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    return next(c for c in cards if c["id"] == CLOUD)


def remote_up(base: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "edgeserve_remote_up" and sample.labels["variant"] == CLOUD:
                return sample.value
    raise AssertionError("no edgeserve_remote_up sample for the remote")


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.2)


def test_requests_routed_to_the_remote_succeed_and_stream(
        prepared: dict[str, PreparedVariant], cache_dir: Path, files: Path, remote_port: int,
        tmp_path: Path) -> None:
    q8 = prepared[f"{FAMILY}:q8_0"].path
    log_path = tmp_path / "edgeserve.log"
    with llama_server(q8, remote_port, tmp_path / "remote-1.log"), running_server(
            files / "models.toml", cache_dir, "--policy", str(files / "policy.toml"), log_path=log_path,
            timeout_s=STARTUP_TIMEOUT_S) as base:
        card = cloud_card(base)
        assert card["kind"] == "remote" and card["loaded"] is True, card

        answered = chat(base)
        assert answered.status_code == 200, answered.text
        assert answered.headers["X-Edgeserve-Variant"] == CLOUD
        assert answered.json()["choices"][0]["message"]["content"].strip()

        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, headers={"X-Deadline-Ms": "20000"},
                          json={"model": FAMILY, "messages": QUESTION, "max_tokens": 16, "stream": True}) as s:
            assert s.headers["X-Edgeserve-Variant"] == CLOUD
            frames = [line for line in s.iter_lines() if line.startswith("data:")]
        assert frames[-1] == "data: [DONE]"
        pieces = [json.loads(f[5:])["choices"][0]["delta"].get("content") for f in frames[:-1]
                  if json.loads(f[5:]).get("choices")]
        assert "".join(p for p in pieces if p).strip()


def test_a_killed_remote_is_excluded_and_a_restarted_one_readmitted(
        prepared: dict[str, PreparedVariant], cache_dir: Path, files: Path, remote_port: int,
        tmp_path: Path) -> None:
    q8 = prepared[f"{FAMILY}:q8_0"].path
    log_path = tmp_path / "edgeserve.log"
    remote = llama_server(q8, remote_port, tmp_path / "remote-1.log")
    remote.__enter__()
    try:
        with running_server(files / "models.toml", cache_dir, "--policy", str(files / "policy.toml"),
                            log_path=log_path, timeout_s=STARTUP_TIMEOUT_S) as base:
            assert chat(base).headers["X-Edgeserve-Variant"] == CLOUD

            remote.__exit__(None, None, None)  # kill the remote mid-test
            remote = None
            fallback = chat(base)  # routed to the dead remote, then again to the local variant
            assert fallback.status_code == 200, fallback.text
            assert fallback.headers["X-Edgeserve-Variant"] == f"{FAMILY}:q4_1"
            local = chat(base)
            assert local.status_code == 200
            reason = local.json()["edgeserve"]["reason"]
            assert f"excluded: {CLOUD} is down (cannot connect" in reason, reason
            card = cloud_card(base)
            assert card["loaded"] is False and "cannot connect" in card["status"]
            assert remote_up(base) == 0.0
            events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
            down = [e for e in events if e.get("event") == "remote_down"]
            assert down and "cannot connect" in down[0]["reason"], down
            assert any(e.get("event") == "remote_fallback" for e in events)

            remote = llama_server(q8, remote_port, tmp_path / "remote-2.log")
            remote.__enter__()
            wait_for(lambda: cloud_card(base)["loaded"], 30, "the restarted remote is re-admitted")
            back = chat(base)
            assert back.status_code == 200 and back.headers["X-Edgeserve-Variant"] == CLOUD
            assert remote_up(base) == 1.0
            assert any(json.loads(line).get("event") == "remote_up"
                       for line in log_path.read_text().splitlines() if line.startswith("{"))
    finally:
        if remote is not None:
            remote.__exit__(None, None, None)


def test_the_deadline_closes_the_upstream_stream(prepared: dict[str, PreparedVariant], remote_port: int,
                                                 tmp_path: Path) -> None:
    config = VariantConfig(name="cloud", kind="remote", base_url=f"http://127.0.0.1:{remote_port}/v1",
                           model="cloud-model")
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]

    async def run() -> tuple[str, float, float]:
        remote = RemoteVariant(VariantId.parse(CLOUD), config)
        try:
            deadline_at = time.perf_counter() + 0.6
            job = GenerationJob([], 1000, SamplingParams(temperature=0.0), deadline_at=deadline_at)
            generation = await remote.send(RemoteRequest(story, None, 20), job)
            text = await generation.text()
            assert generation.result is not None and text
            return generation.result.finish, time.perf_counter(), deadline_at
        finally:
            await remote.aclose()

    with llama_server(prepared[f"{FAMILY}:q8_0"].path, remote_port, tmp_path / "remote.log"):
        finish, ended, deadline_at = asyncio.run(run())
    assert finish == "deadline"
    assert ended <= deadline_at + 0.05
