"""The one canonical `completion` line per request, captured from a real server's JSON log."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.conftest import FAMILY, VARIANTS, Server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Name three colours."}]
FIELDS = {"request_id", "family", "variant", "deadline_ms", "predicted_ms", "actual_ms", "queue_ms",
          "budget_tokens", "hint_tokens", "prompt_tokens", "completion_tokens", "finish", "outcome", "code",
          "client", "cached_prompt_tokens", "batch_width", "drafted_tokens", "accepted_tokens", "level",
          "timestamp", "event"}


def post(server: Server, request_id: str, headers: dict[str, str] | None = None, **body: object) -> int:
    payload = {"model": FAMILY, "messages": QUESTION, "max_tokens": 12, "temperature": 0, **body}
    with server.http() as http:
        if payload.get("stream"):
            with http.stream("POST", "/v1/chat/completions", json=payload,
                             headers={"X-Request-Id": request_id, **(headers or {})}) as response:
                for _ in response.iter_lines():
                    pass
                return response.status_code
        return http.post("/v1/chat/completions", json=payload,
                         headers={"X-Request-Id": request_id, **(headers or {})}).status_code


def new_id(kind: str) -> str:
    return f"e2e-log-{kind}-{uuid.uuid4().hex[:8]}"


def test_an_admitted_request_logs_every_field(server: Server) -> None:
    request_id = new_id("met")
    assert post(server, request_id, {"X-Deadline-Ms": "30000"}) == 200
    record = server.wait_for_completion_record(request_id)
    assert set(record) >= FIELDS, FIELDS - set(record)
    assert record["family"] == FAMILY and record["variant"] in VARIANTS
    assert record["deadline_ms"] == 30000 and record["outcome"] == "met"
    assert record["finish"] in ("stop", "length", "deadline")
    assert 0 < record["predicted_ms"] <= 30000 and 0 < record["actual_ms"] <= 30000
    assert record["queue_ms"] >= 0 and record["budget_tokens"] <= 12
    assert record["prompt_tokens"] > 0 and 0 <= record["completion_tokens"] <= 12
    assert record["client"].startswith("127.0.0.1:")
    assert record["level"] == "info"


def test_a_request_without_deadline_is_completed(server: Server) -> None:
    request_id = new_id("nodeadline")
    assert post(server, request_id, stream=True) == 200
    record = server.wait_for_completion_record(request_id)
    assert record["outcome"] == "completed" and record["deadline_ms"] is None


def test_a_refused_request_has_its_line_too(server: Server) -> None:
    request_id = new_id("refused")
    assert post(server, request_id, {"X-Deadline-Ms": "1"}) == 429
    record = server.wait_for_completion_record(request_id)
    assert set(record) >= FIELDS, FIELDS - set(record)
    assert record["outcome"] == "refused" and record["code"] == "deadline_infeasible"
    assert record["family"] == FAMILY and record["variant"] is None and record["finish"] is None
    assert record["deadline_ms"] == 1
