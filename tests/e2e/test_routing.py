"""Deadline routing through a real server: the header, the decision report, refusals, pins."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import FAMILY, Server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"}]
# Slack for the last token and the HTTP write: the runner stops *before* a token that would
# overrun, but one token on a loaded 2-core machine can take a few hundred ms.
TOKEN_SLACK_MS = 400


def post(server: Server, headers: dict[str, str], **body: object) -> httpx.Response:
    payload = {"model": FAMILY, "messages": QUESTION, "temperature": 0, **body}
    with server.http() as http:
        return http.post("/v1/chat/completions", json=payload, headers=headers)


def assert_deadline_enforced(body: dict[str, Any], deadline_ms: int) -> None:
    """Decoding stops before a token that would overrun the deadline. Prefill cannot be
    interrupted, so when an overloaded machine made the prompt alone overrun, all the server can
    do (and must do) is stop right after the first token."""
    info, timings = body["edgeserve"], body["timings"]
    if info["queue_ms"] + timings["prompt_ms"] < deadline_ms:
        assert info["actual_ms"] <= deadline_ms + TOKEN_SLACK_MS, body
    else:
        assert info["finish"] == "deadline" and timings["predicted_n"] <= 1, body


def workable_deadline_ms(server: Server, at_least: int) -> int:
    """A deadline this server can meet now: a refusal says the smallest one it would accept."""
    refused = post(server, {"X-Deadline-Ms": "1"}, max_tokens=64)
    assert refused.status_code == 429
    smallest = float(refused.headers["X-Edgeserve-Min-Deadline-Ms"])
    return max(at_least, int(smallest * 2))


def test_a_deadline_is_reported_and_met(server: Server) -> None:
    deadline = workable_deadline_ms(server, 3000)
    response = post(server, {"X-Deadline-Ms": str(deadline)}, max_tokens=400)
    assert response.status_code == 200, response.text
    info = response.json()["edgeserve"]
    assert info["deadline_ms"] == deadline
    assert info["finish"] in ("stop", "length", "deadline")
    assert_deadline_enforced(response.json(), deadline)
    assert info["predicted_ms"] <= deadline
    assert info["budget_tokens"] <= 400
    assert response.headers["X-Edgeserve-Variant"] == info["variant"]
    assert int(response.headers["X-Edgeserve-Budget-Tokens"]) == info["budget_tokens"]
    assert float(response.headers["X-Edgeserve-Predicted-Ms"]) == pytest.approx(info["predicted_ms"], abs=1)
    assert info["reason"]


def test_a_budget_cut_by_the_deadline_keeps_openai_finish_reason_length(server: Server) -> None:
    """The deadline caps the budget far below max_tokens; the generation then ends on that
    budget (`length`), at the deadline itself when the board ran slower than predicted
    (`deadline`), or on its own (`stop`). OpenAI clients only ever see `stop` or `length`."""
    deadline = workable_deadline_ms(server, 1200)
    response = post(server, {"X-Deadline-Ms": str(deadline), "X-Budget-Hint": "off"},
                    max_tokens=2000, ignore_me="unknown fields are ignored")
    assert response.status_code == 200, response.text
    body = response.json()
    info = body["edgeserve"]
    assert info["budget_tokens"] < 2000
    expected = {"stop": "stop", "length": "length", "deadline": "length"}
    assert body["choices"][0]["finish_reason"] == expected[info["finish"]]
    if info["finish"] != "stop":
        assert body["usage"]["completion_tokens"] <= info["budget_tokens"]
    assert_deadline_enforced(body, deadline)


def test_an_infeasible_deadline_is_refused_at_once_with_retry_after(server: Server) -> None:
    response = post(server, {"X-Deadline-Ms": "1"}, max_tokens=64)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "deadline_infeasible"
    assert "deadline" in error["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert float(response.headers["X-Edgeserve-Min-Deadline-Ms"]) > 1


@pytest.mark.parametrize("value", ["abc", "0", "3600001", "-5", "1.5", "", "12ms"])
def test_a_malformed_deadline_header_is_a_400_naming_it(server: Server, value: str) -> None:
    response = post(server, {"X-Deadline-Ms": value}, max_tokens=4)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "X-Deadline-Ms"
    assert "X-Deadline-Ms" in error["message"]
    assert post(server, {}, max_tokens=2).status_code == 200


def test_a_pinned_variant_keeps_its_pin_but_its_budget_is_capped(server: Server) -> None:
    pinned = f"{FAMILY}:q8_0"
    deadline = workable_deadline_ms(server, 1500)
    response = post(server, {"X-Deadline-Ms": str(deadline)}, model=pinned, max_tokens=1900)
    assert response.status_code == 200, response.text
    info = response.json()["edgeserve"]
    assert info["variant"] == pinned
    assert info["budget_tokens"] < 1900


def test_a_loose_deadline_picks_a_variant_the_quality_curves_favour(server: Server) -> None:
    """policies/smollm2-135m.toml ranks q4_1 = q8_0 above q2_k at every budget."""
    response = post(server, {"X-Deadline-Ms": "120000"}, max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["edgeserve"]["variant"] in (f"{FAMILY}:q4_1", f"{FAMILY}:q8_0")


def test_the_budget_hint_reaches_the_prompt_unless_switched_off(server: Server) -> None:
    on = post(server, {"X-Budget-Hint": "on"}, max_tokens=8).json()
    off = post(server, {"X-Budget-Hint": "off"}, max_tokens=8).json()
    assert on["edgeserve"]["hint_tokens"] == 4
    assert off["edgeserve"]["hint_tokens"] is None
    assert on["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]


def test_the_router_picks_the_style_and_forcing_when_asked_to(server: Server) -> None:
    auto = post(server, {"X-Prompt-Style": "auto", "X-Answer-Forcing": "auto", "X-Deadline-Ms": "20000"},
                max_tokens=8)
    assert auto.status_code == 200, auto.text
    info = auto.json()["edgeserve"]
    assert info["style"] in ("boxed", "aav")  # the styles the default family's curves cover
    assert "chosen by the curves" in info["reason"]
    assert info["answer_forcing"] is False  # no forced curve measured for this family
    plain = post(server, {}, max_tokens=8).json()["edgeserve"]
    assert plain["style"] is None and plain["answer_forcing"] is False  # the prompt as sent
    forced = post(server, {"X-Prompt-Style": "boxed", "X-Answer-Forcing": "on"}, max_tokens=8).json()
    assert forced["edgeserve"]["style"] == "boxed" and forced["edgeserve"]["answer_forcing"] is True


@pytest.mark.parametrize(("header", "value"), [("X-Budget-Hint", "maybe"), ("X-Prompt-Style", "poem"),
                                               ("X-Answer-Forcing", "yes")])
def test_bad_routing_headers_are_400s(server: Server, header: str, value: str) -> None:
    response = post(server, {header: value}, max_tokens=4)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == header
