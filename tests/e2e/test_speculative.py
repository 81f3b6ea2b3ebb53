"""A speculative pair served for real (tests/data/models-speculative.toml: q2_k drafts for
q8_0): pinned to the pair, greedy answers are the q8_0's own, byte for byte, for chat and text
completions, streamed or not; the response, the log line and /metrics say what was drafted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import TIMEOUT_S, Server, serving

pytestmark = pytest.mark.e2e

MODELS = Path(__file__).resolve().parents[1] / "data" / "models-speculative.toml"
TARGET = "smollm2-135m:q8_0"
PAIR = "smollm2-135m:q8_0+q2_k"
QUESTIONS = ["What is the capital of France?", "List three prime numbers.",
             "Tom has 3 apples and buys 4 more. How many apples does he have now?"]


@pytest.fixture(scope="module")
def server(prepared: dict[str, PreparedVariant], cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(MODELS, cache_dir, tmp_path_factory, "edgeserve-speculative") as started:
        yield started


def chat(server: Server, model: str, question: str) -> dict[str, Any]:
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_pair_is_listed_beside_its_variants(server: Server) -> None:
    with server.http() as http:
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert PAIR in ids and TARGET in ids


def test_greedy_chat_answers_are_the_targets_own(server: Server) -> None:
    for question in QUESTIONS:
        plain, spec = chat(server, TARGET, question), chat(server, PAIR, question)
        assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert spec["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        info = spec["edgeserve"]
        assert info["variant"] == PAIR and info["drafted_tokens"] > 0
        assert 0 <= info["accepted_tokens"] <= info["drafted_tokens"]
        assert spec["timings"]["draft_n"] == info["drafted_tokens"]
        assert plain["edgeserve"]["drafted_tokens"] == 0


def test_greedy_text_completions_streamed_are_the_targets_own(server: Server) -> None:
    client = server.client()
    prompt = "The three primary colours are"
    plain = client.completions.create(model=TARGET, prompt=prompt, max_tokens=32, temperature=0)
    stream = client.completions.create(model=PAIR, prompt=prompt, max_tokens=32, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == plain.choices[0].text


def test_the_log_line_and_metrics_count_drafted_tokens(server: Server) -> None:
    with server.http() as http:
        response = http.post("/v1/chat/completions", headers={"X-Request-Id": "spec-log-1"}, json={
            "model": PAIR, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 24,
            "temperature": 0})
        assert response.status_code == 200, response.text
        metrics = http.get("/metrics").text
    line = server.wait_for_completion_record("spec-log-1")
    assert line["variant"] == PAIR and line["drafted_tokens"] == response.json()["edgeserve"]["drafted_tokens"]
    drafted = [row for row in metrics.splitlines()
               if row.startswith(f'edgeserve_spec_decode_draft_tokens_total{{variant="{PAIR}"}}')]
    assert drafted and float(drafted[0].split()[-1]) > 0
    assert f'edgeserve_spec_decode_acceptance_ratio{{variant="{PAIR}"}}' in metrics


def test_sampled_requests_speculate_and_penalised_ones_do_not(server: Server) -> None:
    body = {"model": PAIR, "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 24}
    with server.http() as http:
        sampled = http.post("/v1/chat/completions", json={**body, "temperature": 0.8, "seed": 3}, timeout=TIMEOUT_S)
        penalised = http.post("/v1/chat/completions", json={**body, "temperature": 0, "presence_penalty": 0.5},
                              timeout=TIMEOUT_S)
    assert sampled.status_code == 200, sampled.text
    info = sampled.json()["edgeserve"]
    assert info["drafted_tokens"] > 0 and sampled.json()["usage"]["completion_tokens"] > 0
    assert penalised.status_code == 200, penalised.text
    assert penalised.json()["edgeserve"]["drafted_tokens"] == 0
