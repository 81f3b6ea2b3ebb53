"""Continuous batching against a real server: concurrent clients share a variant's batch and each
gets its own text; a client that hangs up on a plain (non-streamed) request stops its generation;
admission keeps the deadline of a request already running when a newcomer arrives."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import FAMILY, Server

pytestmark = pytest.mark.e2e

PINNED = f"{FAMILY}:q8_0"
TOPICS = ["the sea", "a lighthouse", "bread", "a red bicycle", "winter", "a library", "the moon", "a garden"]


def stream_text(server: Server, topic: str, max_tokens: int = 24) -> tuple[str, dict[str, Any]]:
    """The streamed text and the final usage (tokens counted by the server, not by chunks)."""
    body = {"model": PINNED, "messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, usage = [], {}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices", []):
                text.append(choice["delta"].get("content") or "")
            usage = chunk.get("usage") or usage
    return "".join(text), usage


def test_eight_concurrent_streams_each_get_their_own_text(server: Server) -> None:
    alone = [stream_text(server, topic)[0] for topic in TOPICS]
    with ThreadPoolExecutor(len(TOPICS)) as pool:
        together = list(pool.map(lambda topic: stream_text(server, topic), TOPICS))
    assert [text for text, _ in together] == alone
    assert all(usage["completion_tokens"] >= 1 for _, usage in together)
    metrics = server.http().get("/metrics").text
    widths = [line for line in metrics.splitlines()
              if line.startswith("edgeserve_batch_steps_total") and PINNED in line]
    assert any('width="1"' not in line and float(line.split()[-1]) > 0 for line in widths), widths


def test_a_repeated_system_prompt_reports_cached_tokens(server: Server) -> None:
    system = "You are a terse assistant who answers in one short sentence and never apologises."
    body = {"model": PINNED, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]}
    first = server.http().post("/v1/chat/completions", json=body).json()
    body["messages"][1]["content"] = "Name a fruit."  # type: ignore[index]
    second = server.http().post("/v1/chat/completions", json=body).json()
    assert first["usage"]["prompt_tokens"] > 10
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 10 and second["timings"]["cache_n"] == cached


def test_a_plain_request_whose_client_hangs_up_is_cancelled(server: Server) -> None:
    request_id = "hangs-up-1"
    body = {"model": PINNED, "max_tokens": 1500, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a storm at sea."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=1.0,
                   headers={"X-Request-Id": request_id, "X-Budget-Hint": "off"})
    record = server.wait_for_completion_record(request_id, timeout_s=30)
    assert record["finish"] == "cancelled" and record["outcome"] == "cancelled"
    assert record["completion_tokens"] is None or record["completion_tokens"] < 1500
    assert record["actual_ms"] < 5000  # stopped soon after the client left, not at its budget


def test_a_newcomer_never_makes_an_admitted_request_miss(server: Server) -> None:
    """A request runs with a deadline it needs most of; newcomers arrive meanwhile. Each is
    admitted only if the first still meets its deadline (or refused with 429), and every
    admitted request meets its own."""
    first_result: dict[str, Any] = {}

    def first() -> None:
        body = {"model": PINNED, "max_tokens": 4000, "temperature": 0, "stream": False,
                "messages": [{"role": "user", "content": "Write a very long story about a storm at sea."}]}
        response = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60,
                              headers={"X-Deadline-Ms": "4000", "X-Budget-Hint": "off"})
        first_result["status"] = response.status_code
        first_result["body"] = response.json()

    runner = threading.Thread(target=first)
    runner.start()
    time.sleep(0.8)
    newcomers = []
    for i in range(6):
        body = {"model": FAMILY, "max_tokens": 400, "temperature": 0,
                "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}
        response = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60,
                              headers={"X-Deadline-Ms": "3000", "X-Budget-Hint": "off"})
        newcomers.append(response)
    runner.join(60)
    assert first_result["status"] == 200
    info = first_result["body"]["edgeserve"]
    assert info["actual_ms"] <= 4000, info
    assert info["finish"] in ("length", "stop", "deadline")
    for response in newcomers:
        assert response.status_code in (200, 429), response.text
        if response.status_code == 200:
            assert response.json()["edgeserve"]["actual_ms"] <= 3000
        else:
            assert response.json()["error"]["code"] == "deadline_infeasible"
