"""The HTTP client against a fake server (httpx.MockTransport): what each reply becomes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeserve.tools.eval.client import EvalClient, ServerError, request_for
from edgeserve.tools.eval.dataset import Problem
from edgeserve.tools.eval.plan import EvalPolicy, WorkItem, deadline_items, pending
from edgeserve.tools.eval.records import ResultsWriter, done_keys, read_records
from edgeserve.tools.eval.runner import Progress, ServerGoneError, run_items

PROBLEM = Problem(3, "Tom has 3 apples and buys 4. How many?", "3 + 4 = 7\n#### 7", "7")


def item(**changes: Any) -> WorkItem:
    fields: dict[str, Any] = {"problem": PROBLEM, "mode": "deadline", "policy": EvalPolicy("q8_0"),
                              "deadline_ms": 3000, "style": "boxed", "hint": False, "budget": 24}
    fields.update(changes)
    return WorkItem(**fields)


def reply(content: str = "3 + 4 = \\boxed{7}") -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59},
        "edgeserve": {"variant": "fam:q8_0", "deadline_ms": 3000, "predicted_ms": 800.0, "actual_ms": 700.5,
                      "queue_ms": 1.0, "budget_tokens": 24, "hint_tokens": None, "finish": "stop", "reason": "pinned"},
        "timings": {"prompt_n": 50, "prompt_ms": 100.0, "predicted_n": 9, "predicted_ms": 450.0},
    }


def client_for(handler: Any) -> EvalClient:
    return EvalClient("http://edge.test", timeout_s=5, transport=httpx.MockTransport(handler))


def test_request_carries_the_experiment_in_headers() -> None:
    headers, body = request_for(item(forcing=True), "fam")
    assert headers == {"X-Prompt-Style": "boxed", "X-Budget-Hint": "off", "X-Deadline-Ms": "3000",
                       "X-Answer-Forcing": "on"}
    assert body["model"] == "fam:q8_0" and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["messages"] == [{"role": "user", "content": PROBLEM.question}]
    headers, body = request_for(item(policy=EvalPolicy(), deadline_ms=None, budget=None, hint=True), "fam")
    assert "X-Deadline-Ms" not in headers and headers["X-Budget-Hint"] == "on"
    assert body["model"] == "fam" and "max_tokens" not in body


async def test_an_answer_is_graded_and_timed() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=reply())

    async with client_for(handler) as client:
        record = await client.answer(item(), "fam")
    assert seen[0].headers["X-Deadline-Ms"] == "3000"
    assert json.loads(seen[0].content)["temperature"] == 0
    assert record.status == "ok" and record.correct and record.extracted == "7" and record.gold == "7"
    assert (record.variant, record.prompt_tokens, record.completion_tokens) == ("fam:q8_0", 50, 9)
    assert (record.actual_ms, record.predicted_ms, record.decode_ms, record.finish) == (700.5, 800.0, 450.0, "stop")
    assert record.latency_ms is not None and record.latency_ms >= 0
    assert record.key == (3, "pin:q8_0", 3000, "boxed", False, 24, None)


async def test_a_deadline_refusal_is_recorded_as_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "Cannot answer within the deadline", "type": "rate_limit_error",
                           "param": None, "code": "deadline_infeasible"}}
        return httpx.Response(429, json=error, headers={"Retry-After": "2", "X-Edgeserve-Min-Deadline-Ms": "1500"})

    async with client_for(handler) as client:
        record = await client.answer(item(), "fam")
    assert record.status == "refused" and not record.correct
    assert (record.http_status, record.min_deadline_ms, record.retry_after_s) == (429, 1500.0, 2)
    assert "deadline" in (record.error or "")


async def test_a_patient_client_asks_again_with_what_is_left_of_the_deadline() -> None:
    asked: list[int] = []
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(int(request.headers["X-Deadline-Ms"]))
        if len(asked) == 1:
            error = {"error": {"message": "busy", "code": "deadline_infeasible"}}
            return httpx.Response(429, json=error, headers={"Retry-After": "2"})
        return httpx.Response(200, json=reply())

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    transport = httpx.MockTransport(handler)
    async with EvalClient("http://edge.test", timeout_s=5, transport=transport, retry_refused=True,
                          sleep=sleep) as client:
        record = await client.answer(item(deadline_ms=3000), "fam")
        assert record.status == "ok" and record.attempts == 2 and slept == [2]
        assert asked[0] == 3000 and 0 < asked[1] <= 3000  # the same deadline, less the time gone
        asked.clear()
        slept.clear()
        short = await client.answer(item(deadline_ms=1500), "fam")  # 2 s of waiting leave nothing
        assert short.status == "refused" and short.attempts == 1 and slept == [] and asked == [1500]
    async with client_for(handler) as impatient:
        asked.clear()
        assert (await impatient.answer(item(), "fam")).status == "refused" and len(asked) == 1


@pytest.mark.parametrize(
    ("response", "needle"),
    [(httpx.Response(500, json={"error": {"message": "boom", "code": None}}), "500"),
     (httpx.Response(429, json={"error": {"message": "The queue is full", "code": "queue_full"}}), "queue_full"),
     (httpx.Response(502, text="<html>bad gateway</html>"), "bad gateway"),
     (httpx.Response(200, json={"unexpected": True}), "without choices")],
)
async def test_other_failures_are_http_errors(response: httpx.Response, needle: str) -> None:
    async with client_for(lambda _request: response) as client:
        record = await client.answer(item(), "fam")
    assert record.status == "http_error" and needle in (record.error or "")


async def test_timeouts_and_dropped_connections() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def gone(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_for(slow) as client:
        assert (await client.answer(item(), "fam")).status == "timeout"
    async with client_for(gone) as client:
        record = await client.answer(item(), "fam")
    assert record.status == "http_error" and record.http_status is None and "refused" in (record.error or "")


async def test_served_models_and_family_choice() -> None:
    models = {"object": "list", "data": [
        {"id": "fam", "kind": "family", "variants": ["fam:q2_k", "fam:q8_0"]},
        {"id": "fam:q2_k", "kind": "variant"}, {"id": "fam:q8_0", "kind": "variant"}]}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            return httpx.Response(200, json={"status": "ready"})
        return httpx.Response(200, json=models)

    async with client_for(handler) as client:
        served = await client.served_models()
    assert served.families == {"fam": ["q2_k", "q8_0"]}
    assert served.family(None) == "fam"
    with pytest.raises(ServerError, match="other"):
        served.family("other")
    async with client_for(lambda _r: httpx.Response(503, json={"status": "loading"})) as client:
        with pytest.raises(ServerError, match="not ready"):
            await client.served_models()


async def test_run_items_writes_every_answer_with_concurrency_and_resumes(tmp_path: Path) -> None:
    in_flight = 0
    most = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json=reply())

    problems = [Problem(i, f"q{i}", "#### 7", "7") for i in range(4)]
    items = deadline_items(problems, [EvalPolicy(), EvalPolicy("q8_0")], [1000], ["boxed"], [True], None)
    path = tmp_path / "results.jsonl"
    async with client_for(handler) as client:
        with ResultsWriter(path) as writer:
            records = await run_items(client, items[:5], "fam", writer, concurrency=3, progress=Progress(len(items)))
        assert len(records) == 5 and most == 3
        todo = pending(items, done_keys(read_records(path)))
        assert [i.key for i in todo] == [i.key for i in items[5:]]
        with ResultsWriter(path) as writer:
            await run_items(client, todo, "fam", writer, concurrency=2)
    assert len(read_records(path)) == len(items)
    assert pending(items, done_keys(read_records(path))) == []


async def test_a_vanished_server_stops_the_run(tmp_path: Path) -> None:
    def gone(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    problems = [Problem(i, f"q{i}", "#### 7", "7") for i in range(30)]
    items = deadline_items(problems, [EvalPolicy()], [1000], ["boxed"], [True], None)
    async with client_for(gone) as client:
        with ResultsWriter(tmp_path / "r.jsonl") as writer, pytest.raises(ServerGoneError, match="resume"):
            await run_items(client, items, "fam", writer, concurrency=1, max_consecutive_failures=4)
    assert len(read_records(tmp_path / "r.jsonl")) == 4
