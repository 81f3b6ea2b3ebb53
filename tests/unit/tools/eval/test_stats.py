"""Report arithmetic: Wilson intervals against published values, grouping, rates, token costs."""

from __future__ import annotations

import pytest

from edgeserve.tools.eval.stats import decode_ms_per_token, hint_honesty, summarize, wilson_interval
from tests.unit.tools.eval.helpers import record


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 0.2365931, 0.7634069),  # R: binom::binom.wilson(5, 10)
        (0, 10, 0.0, 0.2775328),
        (10, 10, 0.7224672, 1.0),
        (1, 100, 0.0017674, 0.0544862),
        (50, 100, 0.4038315, 0.5961685),
    ],
)
def test_wilson_interval_matches_known_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(3, 7)
    flipped = wilson_interval(4, 7)
    assert (low, high) == pytest.approx((1 - flipped[1], 1 - flipped[0]))
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_summarize_counts_refusals_and_errors_as_wrong_and_rates_over_answered() -> None:
    records = [
        record(index=0, correct=True, actual_ms=900.0),
        record(index=1, correct=False, actual_ms=1100.0, finish="deadline"),
        record(index=2, status="refused", variant=None, completion_tokens=None),
        record(index=3, status="http_error", variant=None, completion_tokens=None),
        record(index=0, policy="pin:q8_0", variant="fam:q8_0", correct=True),
    ]
    routed, pinned = summarize(records)
    assert (routed.policy, pinned.policy) == ("routed", "pin:q8_0")
    assert (routed.n, routed.correct, routed.answered, routed.refused, routed.errors) == (4, 1, 2, 1, 1)
    assert routed.accuracy == 0.25
    assert routed.deadline_hit_rate == 0.5
    assert routed.cut == 1
    assert routed.variant_shares == "q4_1 100%"
    assert pinned.accuracy == 1.0


def test_no_deadline_means_no_hit_rate() -> None:
    (s,) = summarize([record(mode="sweep", deadline_ms=None, budget=64, policy="pin:q2_k")])
    assert s.deadline_hit_rate is None


def test_decode_cost_per_variant_weights_by_tokens() -> None:
    costs = decode_ms_per_token([
        record(variant="fam:q2_k", decode_ms=100.0, completion_tokens=10),
        record(variant="fam:q2_k", decode_ms=300.0, completion_tokens=10),
        record(variant="fam:q8_0", decode_ms=500.0, completion_tokens=20),
        record(status="refused", variant=None),
    ])
    assert costs == {"q2_k": 20.0, "q8_0": 25.0}


def test_hint_honesty_per_variant_over_answers_that_carried_a_hint() -> None:
    records = [
        record(variant="fam:q8_0", hint_tokens=50, completion_tokens=40),
        record(variant="fam:q8_0", hint_tokens=50, completion_tokens=60),
        record(variant="fam:q8_0", hint_tokens=50, completion_tokens=100, finish="length"),
        record(variant="fam:q2_k", hint_tokens=20, completion_tokens=10),
        record(variant="fam:q2_k", hint_tokens=None, completion_tokens=500),  # no hint: not counted
        record(variant="fam:q2_k", hint_tokens=20, status="refused", completion_tokens=None),
    ]
    q2, q8 = hint_honesty(records)
    assert (q2.variant, q2.n, q2.median_ratio, q2.over_share, q2.over_budget_share) == ("fam:q2_k", 1, 0.5, 0.0, 0.0)
    assert (q8.variant, q8.n) == ("fam:q8_0", 3)
    assert q8.median_ratio == pytest.approx(1.2)
    assert q8.over_share == pytest.approx(2 / 3) and q8.over_budget_share == pytest.approx(1 / 3)
