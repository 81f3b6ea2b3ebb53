"""Schemathesis against a real edgeserve process and the OpenAPI document it publishes: cases
generated from the schema (valid and invalid bodies, wrong types, missing fields, odd media
types) on every documented operation. None may get a 5xx other than 503 (not ready); every 4xx
is in the OpenAI error format; every body the schema says is invalid is refused with a 4xx
(schemathesis' `negative_data_rejection`).

The run is bounded: a fixed number of examples per operation, derandomized, no example
database. Generation stays cheap: the server's default deadline (1 s) caps every generated
request that reaches a model, and most generated bodies are refused before that anyway.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import FAMILY, MODELS_TOML, STARTUP_TIMEOUT_S, VARIANTS
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

# The two completion endpoints reach it; the GET ones have nothing to vary. A deeper run:
# EDGESERVE_SCHEMATHESIS_EXAMPLES=5000.
EXAMPLES_PER_OPERATION = int(os.environ.get("EDGESERVE_SCHEMATHESIS_EXAMPLES", "300"))
MIN_CASES = 500
DEADLINE_MS = "1000"


@pytest.fixture(scope="module")
def fuzz_base(prepared: dict[str, PreparedVariant], cache_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("edgeserve-schemathesis") / "server.log"
    with running_server(MODELS_TOML, cache_dir, "--default-deadline-ms", DEADLINE_MS,
                        log_path=log_path, timeout_s=STARTUP_TIMEOUT_S) as base:
        yield base


def _served_model(case: Any) -> st.SearchStrategy[Any]:
    """A generated `model` is almost never a configured one, so nearly every valid body would
    stop at the 404: in most cases it is replaced by a served family or variant, which takes
    the body through routing, admission and generation."""
    body = case.body
    if not (isinstance(body, dict) and isinstance(body.get("model"), str)):
        return st.just(case)

    def with_model(model: Any) -> Any:
        case.body = {**body, "model": model}
        return case

    return st.sampled_from([body["model"], FAMILY, *VARIANTS]).map(with_model)


def openai_error_format(ctx: Any, response: schemathesis.Response, case: Any) -> bool | None:
    """Every 4xx (and 503) body is `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"}, f"{response.status_code} body is not an OpenAI error: {response.text[:300]}"
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return None


def no_server_error(ctx: Any, response: schemathesis.Response, case: Any) -> bool | None:
    """No 5xx, except 503 (not ready: a transient state a client retries)."""
    assert response.status_code < 500 or response.status_code == 503, (
        f"{response.status_code} from {case.operation.label}: {response.text[:500]}")
    return None


def _cases(operation: Any) -> st.SearchStrategy[Any]:
    """Valid and invalid requests of one operation (an operation with nothing to make invalid,
    such as GET /health, gets valid ones only)."""
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    if operation.body:
        positive = st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))
    return positive.flatmap(_served_model)


def test_no_server_errors(fuzz_base: str) -> None:
    """Schemathesis' own pytest integration (`from_fixture`) does not run on pytest 9 (it sets
    a node attribute that is gone), so its strategies drive a plain hypothesis test here."""
    schema = schemathesis.openapi.from_url(f"{fuzz_base}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    run_cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    for operation in operations:
        @given(case=_cases(operation))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(timeout=60)
            run_cases[case.operation.label] += 1
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[no_server_error, openai_error_format, negative_data_rejection])

        run()
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {sum(run_cases.values())} cases in {elapsed:.0f} s; per operation {dict(run_cases)}; "
          f"statuses {dict(sorted(statuses.items()))}")
    assert sum(run_cases.values()) >= MIN_CASES, dict(run_cases)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health",
            "GET /ready"} <= set(run_cases), dict(run_cases)
    assert statuses[200] > 0, dict(statuses)  # some generated requests really generated
