"""GET /metrics of a real server: Prometheus text that parses, and that moves with requests."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import FAMILY, VARIANTS, Server

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]
FAMILIES = {
    "edgeserve_requests": "counter", "edgeserve_deadline": "counter",
    "edgeserve_queue_wait_seconds": "histogram", "edgeserve_time_to_first_token_seconds": "histogram",
    "edgeserve_request_duration_seconds": "histogram", "edgeserve_prediction_error_ratio": "histogram",
    "edgeserve_prompt_tokens": "counter", "edgeserve_completion_tokens": "counter",
    "edgeserve_queue_depth": "gauge", "edgeserve_running_generations": "gauge",
    "edgeserve_variant_loaded": "gauge", "edgeserve_variant_resident_bytes": "gauge",
    "edgeserve_variant_file_bytes": "gauge", "edgeserve_decode_ms_per_token": "gauge",
    "edgeserve_prefill_ms_per_token": "gauge",
}


def scrape(http: httpx.Client) -> tuple[dict[str, str], Samples]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    types, samples = {}, {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_with_every_family_and_unit(server: Server) -> None:
    with server.http() as http:
        types, samples = scrape(http)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    for variant in VARIANTS:
        assert value(samples, "edgeserve_variant_loaded", variant=variant) == 1
        assert value(samples, "edgeserve_variant_resident_bytes", variant=variant) > 0
        assert value(samples, "edgeserve_variant_file_bytes", variant=variant) > 0
        assert value(samples, "edgeserve_decode_ms_per_token", variant=variant) > 0
    assert value(samples, "edgeserve_queue_depth") == 0


def test_metrics_move_after_a_request(server: Server) -> None:
    with server.http() as http:
        _, before = scrape(http)
        response = http.post("/v1/chat/completions", headers={"X-Deadline-Ms": "30000"}, json={
            "model": FAMILY, "messages": QUESTION, "max_tokens": 16, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        variant, usage = body["edgeserve"]["variant"], body["usage"]
        refused = http.post("/v1/chat/completions", headers={"X-Deadline-Ms": "1"}, json={
            "model": FAMILY, "messages": QUESTION, "max_tokens": 16})
        assert refused.status_code == 429
        _, after = scrape(http)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("edgeserve_requests_total", variant=variant, outcome="met") == 1
    assert moved("edgeserve_requests_total", variant="none", outcome="refused") == 1
    assert moved("edgeserve_deadline_total", result="met") == 1
    assert moved("edgeserve_prompt_tokens_total", variant=variant) == usage["prompt_tokens"]
    assert moved("edgeserve_completion_tokens_total", variant=variant) == usage["completion_tokens"]
    for histogram in ("queue_wait_seconds", "time_to_first_token_seconds", "request_duration_seconds",
                      "prediction_error_ratio"):
        assert moved(f"edgeserve_{histogram}_count", variant=variant) == 1, histogram
    duration = moved("edgeserve_request_duration_seconds_sum", variant=variant)
    assert 0 < duration <= body["edgeserve"]["actual_ms"] / 1000 + 0.05
    assert 0 < moved("edgeserve_time_to_first_token_seconds_sum", variant=variant) <= duration
