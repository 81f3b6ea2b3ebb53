"""One real `edgeserve serve` process per test module, and readers for its JSON log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from edgeserve.config import load_models_file
from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.server import running_server

MODELS_TOML = Path(__file__).resolve().parents[2] / "models.toml"
TIMEOUT_S = 60.0  # one request
STARTUP_TIMEOUT_S = 400.0

_FAMILY = load_models_file(MODELS_TOML).families[0]
FAMILY = _FAMILY.name  # routed to one of its variants
VARIANTS = [f"{FAMILY}:{v.name}" for v in _FAMILY.variants]  # pinned


@dataclass(frozen=True)
class Server:
    base: str
    log_path: Path

    def client(self) -> openai.OpenAI:
        """No retries: a retried 5xx would hide the very failure a test looks for."""
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0,
                             timeout=TIMEOUT_S)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=TIMEOUT_S)

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON line the server printed so far (llama.cpp noise is skipped)."""
        records = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def completion_records(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records()
                if r.get("event") == "completion" and r.get("request_id") == request_id]

    def wait_for_completion_record(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The canonical `completion` line of one request (it may be written after the reply)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.completion_records(request_id)
            if found:
                assert len(found) == 1, f"{len(found)} completion lines for {request_id}: {found}"
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no completion line for request {request_id} in {timeout_s} s")
            time.sleep(0.05)

    def error_records(self) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("level") in ("error", "critical")]


@contextmanager
def serving(models: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Server]:
    """A real `edgeserve serve` of `models`, its JSON log in a temporary folder `name`. The first
    server of a session calibrates every variant (the profiles are cached in cache_dir): ~30 s on
    an idle 2-core machine, several times that on a busy one."""
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    with running_server(models, cache_dir, log_path=log_path, timeout_s=STARTUP_TIMEOUT_S) as base:
        yield Server(base, log_path)


@pytest.fixture(scope="module")
def server(prepared: dict[str, PreparedVariant], cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(MODELS_TOML, cache_dir, tmp_path_factory, "edgeserve-e2e") as started:
        yield started


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with server.client() as c:
        yield c
