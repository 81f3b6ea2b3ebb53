"""Two families on one server, each with its own policy: every request is routed by the curves of
ITS family (tests/data/models-two-families.toml: the same SmolLM2 files, opposite curves)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import STARTUP_TIMEOUT_S, TIMEOUT_S
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

MODELS = Path(__file__).resolve().parents[1] / "data" / "models-two-families.toml"
QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"}]


@pytest.fixture(scope="module")
def base(prepared: dict[str, PreparedVariant], cache_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("edgeserve-families") / "server.log"
    with running_server(MODELS, cache_dir, log_path=log_path, timeout_s=STARTUP_TIMEOUT_S) as url:
        yield url


def routed(base: str, family: str) -> httpx.Response:
    """A deadline long enough for any variant: the curves alone decide (hint on, 64 tokens)."""
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        response = http.post("/v1/chat/completions", headers={"X-Deadline-Ms": "120000"},
                             json={"model": family, "messages": QUESTION, "max_tokens": 64, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


def test_each_family_routes_by_its_own_curves(base: str) -> None:
    # policies/smollm2-135m.toml at 64 tokens: q2_k 0.0, below q4_1 and q8_0 (0.025 each, the
    # faster of the two wins the tie); tests/data/policies/smollm2-135m-b.toml: q2_k 0.70 over
    # q4_1 0.30 and q8_0 0.15. The same variant names, the same files: only the curves differ.
    first = routed(base, "smollm2-135m")
    second = routed(base, "smollm2-135m-b")
    assert first.headers["X-Edgeserve-Variant"] in ("smollm2-135m:q4_1", "smollm2-135m:q8_0"), \
        first.json()["edgeserve"]["reason"]
    assert second.headers["X-Edgeserve-Variant"] == "smollm2-135m-b:q2_k", second.json()["edgeserve"]["reason"]
    assert "0.70 expected accuracy" in second.json()["edgeserve"]["reason"]


def test_the_model_list_shows_both_families(base: str) -> None:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        cards = http.get("/v1/models").json()["data"]
    families = {c["id"]: c["variants"] for c in cards if c["kind"] == "family"}
    assert families == {f: [f"{f}:q2_k", f"{f}:q4_1", f"{f}:q8_0"] for f in ("smollm2-135m", "smollm2-135m-b")}
