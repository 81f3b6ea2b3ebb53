"""Issue 7, memory-aware residency, on a real server whose memory budget holds one variant only:
alternating pinned requests swap the variants in and out, every swap's prediction includes the
load time, and /v1/models, /metrics and the log say what is resident."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import FAMILY, MODELS_TOML, STARTUP_TIMEOUT_S, Server
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

# Resident sizes (weights + 10 %, and a KV cache of n_ctx 2048 × parallel 4 × 22.5 KiB = 180 MiB
# each): q2_k ~272 MiB, q4_1 ~283 MiB, q8_0 ~332 MiB. 340 MiB holds any one of them and no two.
BUDGET_MIB = 340
LOAD = re.compile(r"including (\d+) ms to load it")


@pytest.fixture(scope="module")
def server(prepared: dict[str, PreparedVariant], cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("edgeserve-residency") / "server.log"
    with running_server(MODELS_TOML, cache_dir, "--memory-budget", f"{BUDGET_MIB}MiB", "--min-residency-s", "0",
                        log_path=log_path, timeout_s=STARTUP_TIMEOUT_S) as base:
        yield Server(base, log_path)


def resident(http: httpx.Client) -> list[str]:
    cards = http.get("/v1/models").json()["data"]
    return [c["id"] for c in cards if c.get("kind") == "variant" and c.get("loaded")]


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def ask(http: httpx.Client, variant: str) -> dict[str, object]:
    body = {"model": f"{FAMILY}:{variant}", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    info: dict[str, object] = response.json()["edgeserve"]
    assert info["variant"] == f"{FAMILY}:{variant}"
    return info


def test_alternating_pinned_requests_swap_variants_and_predict_the_load(server: Server) -> None:
    with server.http() as http:
        assert resident(http) == [f"{FAMILY}:q4_1"]  # start-up leaves the family's default resident
        assert metric(http, "edgeserve_memory_budget_bytes") == BUDGET_MIB * 2**20
        evictions = metric(http, "edgeserve_variant_evictions_total")
        for variant in ("q2_k", "q8_0", "q2_k", "q8_0"):
            info = ask(http, variant)
            load = LOAD.search(str(info["reason"]))
            assert load is not None, f"the swap to {variant} does not count its load: {info['reason']}"
            assert float(str(info["predicted_ms"])) >= int(load.group(1)) > 0
            assert resident(http) == [f"{FAMILY}:{variant}"]
            assert metric(http, "edgeserve_memory_resident_bytes") <= BUDGET_MIB * 2**20
        assert metric(http, "edgeserve_variant_evictions_total") == evictions + 4
        again = ask(http, "q8_0")  # resident now: no load in its prediction
        assert "to load it" not in str(again["reason"])
    swaps = [r for r in server.log_records() if r.get("event") == "variant_swapped"]
    assert [(r["variant"], r["evicted"]) for r in swaps[-4:]] == [
        (f"{FAMILY}:q2_k", [f"{FAMILY}:q4_1"]), (f"{FAMILY}:q8_0", [f"{FAMILY}:q2_k"]),
        (f"{FAMILY}:q2_k", [f"{FAMILY}:q8_0"]), (f"{FAMILY}:q8_0", [f"{FAMILY}:q2_k"]),
    ]
    assert not server.error_records()
