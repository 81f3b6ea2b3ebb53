"""Table-driven tests of choose on hand-computable numbers.

fast: 10 ms/token, curve 0.3 @100 → 0.4 @200; slow: 30 ms/token, curve 0.2 @100 → 0.8 @200
(0 → first point linear, flat after). predict_ms(n) = n × ms/token. No safety margin unless
a test sets one; min_useful_tokens 16; default max_tokens 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import pytest

from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy import (
    Decision,
    Refusal,
    RoutingRequest,
    VariantCandidate,
    choose,
    format_ms,
    uncovered_variants,
)
from edgeserve.routing.policy_file import PolicyFile, parse_policy
from tests.unit.routing.conftest import SIMPLE_POLICY, candidate, flat_profile


@dataclass(frozen=True)
class Case:
    name: str
    deadline: float | None
    variant: str
    tokens: int
    accuracy: float
    queue: float = 0.0
    max_tokens: int | None = None
    pinned: str | None = None


CASES = [
    # the crossover: the fast variant while the slow one cannot reach its good part of the curve
    Case("short deadline → fast", 1000, "fast", 100, 0.3),
    Case("medium deadline → fast at its cap", 3000, "fast", 256, 0.4),
    Case("just below the crossover", 4000, "fast", 256, 0.4),
    Case("just above the crossover", 4020, "slow", 134, 0.404),
    Case("long deadline → slow", 6000, "slow", 200, 0.8),
    Case("very long deadline → slow at the cap", 60_000, "slow", 256, 0.8),
    # the queue wait comes off the deadline
    Case("queue shrinks the budget", 1000, "fast", 50, 0.15, queue=500),
    Case("queue pushes back below the crossover", 6000, "fast", 256, 0.4, queue=2000),
    # no deadline: best accuracy at the requested max_tokens
    Case("no deadline → best curve", None, "slow", 256, 0.8),
    Case("no deadline, small max_tokens", None, "fast", 100, 0.3, max_tokens=100),
    # requested max_tokens caps every variant
    Case("max_tokens respected", 6000, "fast", 50, 0.15, max_tokens=50),
    Case("max_tokens below min useful is its own minimum", 100, "fast", 8, 0.024, max_tokens=8),
    # pins: kept, capped by the deadline
    Case("pinned slow, capped", 1000, "slow", 33, 0.066, pinned="fam:slow"),
    Case("pinned fast where slow would win", 6000, "fast", 256, 0.4, pinned="fam:fast"),
    Case("pinned, no deadline", None, "fast", 256, 0.4, pinned="fam:fast"),
    Case("pinned, queue counts", 1000, "slow", 16, 0.032, queue=520, pinned="fam:slow"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose(case: Case, simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    request = RoutingRequest(prompt_tokens=50, requested_max_tokens=case.max_tokens,
                             deadline_ms=case.deadline, pinned=case.pinned)
    decision = choose(request, fast_slow, simple_policy, case.queue)
    assert isinstance(decision, Decision), decision
    assert decision.variant_name == case.variant
    assert decision.variant_id == f"fam:{case.variant}"
    assert decision.max_tokens == case.tokens
    assert decision.expected_accuracy == pytest.approx(case.accuracy)
    ms = 10.0 if case.variant == "fast" else 30.0
    assert decision.predicted_ms == pytest.approx(case.tokens * ms)
    assert decision.hint_tokens == max(1, case.tokens // 2)
    assert decision.style == "boxed"
    assert decision.queue_wait_ms == case.queue
    if case.deadline is not None:
        assert decision.predicted_ms + case.queue <= case.deadline
    assert case.variant in decision.reason


@pytest.mark.parametrize("deadline,queue,retry,min_deadline", [
    (100, 0, 1, 160),        # 16 fast tokens need 160 ms; an empty queue does not help
    (150, 0, 1, 160),
    (2000, 5000, 4, 5160),   # the queue must drain from 5 s to 1.84 s
    (2000, 1900, 1, 2060),
    (100, 3500, 4, 3660),    # never fits this deadline: retry when the queue is empty
])
def test_infeasible_deadlines_are_refused_with_retry_after(
        deadline: float, queue: float, retry: int, min_deadline: float,
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    refusal = choose(RoutingRequest(prompt_tokens=50, deadline_ms=deadline), fast_slow,
                     simple_policy, queue)
    assert isinstance(refusal, Refusal)
    assert refusal.code == "deadline_infeasible"
    assert refusal.retry_after_s == retry
    assert refusal.min_deadline_ms == min_deadline
    assert "infeasible" in refusal.reason and "fast" in refusal.reason
    accepted = choose(RoutingRequest(prompt_tokens=50, deadline_ms=min_deadline), fast_slow,
                      simple_policy, queue)
    assert isinstance(accepted, Decision)
    assert accepted.max_tokens == 16


def test_retry_after_is_when_the_queue_has_drained_enough(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    refusal = choose(RoutingRequest(prompt_tokens=50, deadline_ms=2000), fast_slow,
                     simple_policy, 5000)
    assert isinstance(refusal, Refusal) and refusal.retry_after_s is not None
    later = choose(RoutingRequest(prompt_tokens=50, deadline_ms=2000), fast_slow, simple_policy,
                   5000 - 1000 * refusal.retry_after_s)
    assert isinstance(later, Decision)


def test_pinned_variant_that_cannot_reach_its_minimum_is_refused(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    # the fast variant would fit 40 tokens, but the pin keeps the slow one: 13 < 16
    refusal = choose(RoutingRequest(prompt_tokens=50, deadline_ms=400, pinned="fam:slow"),
                     fast_slow, simple_policy, 0)
    assert isinstance(refusal, Refusal)
    assert refusal.code == "deadline_infeasible"
    assert refusal.min_deadline_ms == 480
    assert "pinned slow" in refusal.reason


@pytest.mark.parametrize("pinned,available,code", [
    ("fam:nope", True, "variant_unavailable"),
    ("fam:slow", False, "variant_unavailable"),
    (None, False, "variant_unavailable"),
])
def test_unavailable(pinned: str | None, available: bool, code: str,
                     simple_policy: PolicyFile) -> None:
    candidates = [candidate("fast", 10, available=available),
                  candidate("slow", 30, available=available)]
    result = choose(RoutingRequest(prompt_tokens=5, deadline_ms=10_000, pinned=pinned),
                    candidates, simple_policy, 0)
    assert isinstance(result, Refusal)
    assert result.code == code
    assert result.retry_after_s is None


def test_unavailable_variants_are_skipped(simple_policy: PolicyFile) -> None:
    candidates = [candidate("fast", 10), candidate("slow", 30, available=False)]
    decision = choose(RoutingRequest(prompt_tokens=5, deadline_ms=60_000), candidates,
                      simple_policy, 0)
    assert isinstance(decision, Decision) and decision.variant_name == "fast"


def test_context_caps_the_budget_and_can_rule_a_variant_out(simple_policy: PolicyFile) -> None:
    candidates = [candidate("fast", 10), candidate("slow", 30, n_ctx=230)]
    decision = choose(RoutingRequest(prompt_tokens=50, deadline_ms=60_000), candidates,
                      simple_policy, 0)
    assert isinstance(decision, Decision)
    assert (decision.variant_name, decision.max_tokens) == ("slow", 180)
    assert "capped by the context" in decision.reason
    tiny = [candidate("fast", 10, n_ctx=40), candidate("slow", 30, n_ctx=50)]
    refusal = choose(RoutingRequest(prompt_tokens=50, deadline_ms=60_000), tiny, simple_policy, 0)
    assert isinstance(refusal, Refusal) and refusal.code == "context_length_exceeded"


TIE_POLICY = b"""
name = "tie"
[routing]
safety_margin_ms = 0
safety_margin_ratio = 0
[curves.a.boxed]
budgets = [100]
accuracy = [0.5]
[curves.b.boxed]
budgets = [100]
accuracy = [0.5]
"""


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
@pytest.mark.parametrize("deadline", [None, 10_000.0])
def test_ties_go_to_the_faster_variant(order: tuple[str, str], deadline: float | None) -> None:
    policy = parse_policy(TIE_POLICY, "tie.toml")
    speeds = {"a": 30.0, "b": 10.0}
    candidates = [candidate(name, speeds[name]) for name in order]
    decision = choose(RoutingRequest(prompt_tokens=10, deadline_ms=deadline), candidates,
                      policy, 0)
    assert isinstance(decision, Decision)
    assert decision.variant_name == "b"
    assert decision.expected_accuracy == pytest.approx(0.5)


def test_equal_speed_and_accuracy_keeps_the_candidate_order() -> None:
    policy = parse_policy(TIE_POLICY, "tie.toml")
    for order in (("a", "b"), ("b", "a")):
        candidates = [candidate(name, 10.0) for name in order]
        decision = choose(RoutingRequest(prompt_tokens=10), candidates, policy, 0)
        assert isinstance(decision, Decision) and decision.variant_name == order[0]


def test_safety_margin_is_the_larger_of_fixed_and_ratio(
        fast_slow: list[VariantCandidate]) -> None:
    policy = parse_policy(SIMPLE_POLICY.replace(b"safety_margin_ms = 0", b"safety_margin_ms = 200")
                          .replace(b"safety_margin_ratio = 0", b"safety_margin_ratio = 0.1"),
                          "m.toml")
    short = choose(RoutingRequest(prompt_tokens=5, deadline_ms=1000), fast_slow, policy, 0)
    assert isinstance(short, Decision) and short.max_tokens == 80  # 1000 − 200
    long = choose(RoutingRequest(prompt_tokens=5, deadline_ms=3000, requested_max_tokens=1000),
                  fast_slow, policy, 0)
    assert isinstance(long, Decision) and long.max_tokens == 270  # 3000 − 300
    assert "margin" in long.reason


def test_hint_and_style_follow_the_request(simple_policy: PolicyFile,
                                           fast_slow: list[VariantCandidate]) -> None:
    off = choose(RoutingRequest(prompt_tokens=5, deadline_ms=1000, hint=False), fast_slow,
                 simple_policy, 0)
    assert isinstance(off, Decision) and off.hint_tokens is None
    # no aav curve: the boxed (default style) curve is used, the style is still reported
    aav = choose(RoutingRequest(prompt_tokens=5, deadline_ms=1000, style="aav"), fast_slow,
                 simple_policy, 0)
    assert isinstance(aav, Decision)
    assert aav.style == "aav" and aav.expected_accuracy == pytest.approx(0.3)


def test_hint_off_in_the_policy() -> None:
    policy = parse_policy(SIMPLE_POLICY + b"[hint]\nenabled = false\n", "h.toml")
    decision = choose(RoutingRequest(prompt_tokens=5), [candidate("fast", 10)], policy, 0)
    assert isinstance(decision, Decision) and decision.hint_tokens is None
    forced = choose(RoutingRequest(prompt_tokens=5, hint=True), [candidate("fast", 10)], policy, 0)
    assert isinstance(forced, Decision) and forced.hint_tokens == 128


def test_variants_without_curves_score_zero(simple_policy: PolicyFile) -> None:
    candidates = [candidate("mystery", 1.0), candidate("fast", 10.0)]
    assert uncovered_variants(simple_policy, ["mystery", "fast"]) == ["mystery"]
    decision = choose(RoutingRequest(prompt_tokens=5, deadline_ms=1000), candidates,
                      simple_policy, 0)
    assert isinstance(decision, Decision) and decision.variant_name == "fast"
    # nothing measured at all: everything scores 0 and the fastest wins the tie
    bare = parse_policy(b'name = "bare"\n', "bare.toml")
    decision = choose(RoutingRequest(prompt_tokens=5, deadline_ms=1000),
                      [candidate("fast", 10.0), candidate("mystery", 1.0)], bare, 0)
    assert isinstance(decision, Decision)
    assert decision.variant_name == "mystery" and decision.expected_accuracy == 0.0
    assert "no quality curve" in decision.reason


def test_reason_reads_like_a_sentence(simple_policy: PolicyFile,
                                      fast_slow: list[VariantCandidate]) -> None:
    decision = choose(RoutingRequest(prompt_tokens=50, deadline_ms=6000), fast_slow,
                      simple_policy, 300)
    assert isinstance(decision, Decision)
    assert decision.reason == ("slow: 0.74 expected accuracy at 190 tokens in 5.7 s ≤ 6.0 s − "
                               "300 ms queue − 0 ms margin; fast 0.40 at 256")


def test_bad_max_tokens_is_a_programming_error(simple_policy: PolicyFile,
                                               fast_slow: list[VariantCandidate]) -> None:
    with pytest.raises(ValueError):
        choose(RoutingRequest(prompt_tokens=5, requested_max_tokens=0), fast_slow,
               simple_policy, 0)


@pytest.mark.parametrize("ms,text", [(850, "850 ms"), (4100, "4.1 s"), (725_000, "12 min 5 s"),
                                     (9_240_000, "2 h 34 min")])
def test_format_ms(ms: float, text: str) -> None:
    assert format_ms(ms) == text


def test_decisions_serialise() -> None:
    decision = Decision(variant_id="f:q", variant_name="q", max_tokens=1, hint_tokens=None,
                        predicted_ms=1.0, expected_accuracy=0.1, reason="r", style="boxed",
                        deadline_ms=None, queue_wait_ms=0.0)
    assert msgspec.json.decode(msgspec.json.encode(decision), type=Decision) == decision


def test_a_variant_with_its_own_wait_is_not_delayed_by_the_local_queue(simple_policy: PolicyFile) -> None:
    local = candidate("fast", 10.0)
    remote = VariantCandidate(variant_id="fam:slow", name="slow", profile=flat_profile("fam:slow", 30.0),
                              n_ctx=4096, wait_ms=0.0)
    request = RoutingRequest(prompt_tokens=50, deadline_ms=3000)
    decision = choose(request, [local, remote], simple_policy, 2900)
    # the local queue (2.9 s) leaves the fast variant 10 tokens; the remote one has the whole 3 s
    assert isinstance(decision, Decision)
    assert (decision.variant_name, decision.max_tokens, decision.queue_wait_ms) == ("slow", 100, 0.0)
    assert decision.predicted_ms + decision.queue_wait_ms <= 3000


def test_load_time_is_part_of_the_prediction_and_the_reason(simple_policy: PolicyFile) -> None:
    cold = VariantCandidate(variant_id="fam:slow", name="slow", profile=flat_profile("fam:slow", 30.0),
                            n_ctx=4096, load_ms=1500.0)
    decision = choose(RoutingRequest(prompt_tokens=50, deadline_ms=4500, requested_max_tokens=200),
                      [candidate("fast", 10.0), cold], simple_policy, 0)
    # warm, slow would get 150 tokens (0.5); cold, it gets 100 (0.2): fast's 200 tokens (0.4) win
    assert isinstance(decision, Decision) and decision.variant_name == "fast"
    pinned = choose(RoutingRequest(prompt_tokens=50, deadline_ms=4500, pinned="fam:slow"), [cold],
                    simple_policy, 0)
    assert isinstance(pinned, Decision)
    assert pinned.max_tokens == 100 and pinned.predicted_ms == pytest.approx(1500 + 100 * 30)
    assert "1.5 s to load it" in pinned.reason


def test_excluded_variants_are_named_with_their_reason(simple_policy: PolicyFile) -> None:
    down = VariantCandidate(variant_id="fam:slow", name="slow", profile=flat_profile("fam:slow", 30.0),
                            n_ctx=4096, available=False,
                            unavailable_reason="is down (connection refused; next check in 4 s)")
    decision = choose(RoutingRequest(prompt_tokens=50, deadline_ms=3000), [candidate("fast", 10.0), down],
                      simple_policy, 0)
    assert isinstance(decision, Decision) and decision.variant_name == "fast"
    assert "excluded: fam:slow is down (connection refused" in decision.reason
    refusal = choose(RoutingRequest(prompt_tokens=50, deadline_ms=3000, pinned="fam:slow"), [down],
                     simple_policy, 0)
    assert isinstance(refusal, Refusal) and refusal.code == "variant_unavailable"
    assert "connection refused" in refusal.reason


# ---- the router's choice of style and answer forcing ------------------------------------------

KNOBS_POLICY = SIMPLE_POLICY + b"""
[curves.fast.aav]
budgets = [100, 200]
accuracy = [0.35, 0.45]

[curves.fast.boxed-forced]
budgets = [100, 200]
accuracy = [0.5, 0.5]

[curves.slow.aav-forced]
budgets = [100, 200]
accuracy = [0.1, 0.1]
"""


@pytest.fixture
def knobs_policy() -> PolicyFile:
    return parse_policy(KNOBS_POLICY, "knobs.toml")


def test_auto_style_takes_the_style_whose_curve_promises_more(knobs_policy: PolicyFile,
                                                               fast_slow: list[VariantCandidate]) -> None:
    request = RoutingRequest(prompt_tokens=50, deadline_ms=1000, style_choices=("boxed", "aav"))
    decision = choose(request, fast_slow, knobs_policy, 0)
    assert isinstance(decision, Decision)
    assert (decision.variant_name, decision.style, decision.max_tokens) == ("fast", "aav", 100)
    assert decision.expected_accuracy == pytest.approx(0.35)
    assert "style aav" in decision.reason and "chosen by the curves" in decision.reason


def test_auto_style_counts_each_styles_own_prompt_length(knobs_policy: PolicyFile) -> None:
    # prefill 10 ms per prompt token: aav's longer prompt (60 tokens) leaves 40 tokens of budget
    # (0.14), boxed's (10 tokens) 91 (0.27), though aav's curve is higher at equal budgets
    profile = CostProfile(variant_id="fam:fast", prefill_ms_per_token=10.0, decode_ms_per_token=10.0)
    fast = VariantCandidate(variant_id="fam:fast", name="fast", profile=profile, n_ctx=4096)
    request = RoutingRequest(prompt_tokens=10, deadline_ms=1000, style_choices=("boxed", "aav"),
                             style_prompt_tokens={"boxed": 10, "aav": 60})
    decision = choose(request, [fast], knobs_policy, 0)
    assert isinstance(decision, Decision)
    assert (decision.style, decision.max_tokens) == ("boxed", 91)  # 100 ms prefill + 90 steps
    same = choose(msgspec.structs.replace(request, style_prompt_tokens={"boxed": 10, "aav": 10}),
                  [fast], knobs_policy, 0)
    assert isinstance(same, Decision) and same.style == "aav"


def test_a_style_the_request_names_is_kept(knobs_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    decision = choose(RoutingRequest(prompt_tokens=50, deadline_ms=1000, style="boxed"), fast_slow, knobs_policy, 0)
    assert isinstance(decision, Decision) and decision.style == "boxed"
    assert "chosen by the curves" not in decision.reason


def test_forcing_left_to_the_router_goes_on_only_where_its_curve_is_higher(
        knobs_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    auto = RoutingRequest(prompt_tokens=50, deadline_ms=1000, style="boxed", forcing=None)
    decision = choose(auto, fast_slow, knobs_policy, 0)
    assert isinstance(decision, Decision)
    assert (decision.variant_name, decision.forcing) == ("fast", True)
    assert decision.expected_accuracy == pytest.approx(0.5)
    assert "answer forcing on" in decision.reason
    # slow has a forced curve for aav only, and a worse one: its aav answers stay unforced
    slow = RoutingRequest(prompt_tokens=50, deadline_ms=10_000, style="aav", forcing=None, pinned="fam:slow")
    unforced = choose(slow, fast_slow, knobs_policy, 0)
    assert isinstance(unforced, Decision) and unforced.forcing is False


def test_forcing_the_request_asks_for_is_kept_even_unmeasured(knobs_policy: PolicyFile,
                                                               fast_slow: list[VariantCandidate]) -> None:
    on = choose(RoutingRequest(prompt_tokens=50, deadline_ms=10_000, style="boxed", forcing=True,
                               pinned="fam:slow"), fast_slow, knobs_policy, 0)
    assert isinstance(on, Decision) and on.forcing is True
    assert on.expected_accuracy == pytest.approx(0.8)  # no forced curve: the plain one
    off = choose(RoutingRequest(prompt_tokens=50, deadline_ms=1000, style="boxed", forcing=False),
                 fast_slow, knobs_policy, 0)
    assert isinstance(off, Decision) and off.forcing is False


def speculative(ms_per_token: float) -> VariantCandidate:
    """The slow variant's speculative pair: the same curve (its text is the target's), its own cost."""
    return VariantCandidate(variant_id="fam:slow+fast", name="slow",
                            profile=flat_profile("fam:slow+fast", ms_per_token), n_ctx=4096)


@pytest.mark.parametrize("deadline", [4500.0, 6000.0, None])
def test_a_speculative_pair_is_chosen_only_when_it_is_cheaper_than_its_target(
        deadline: float | None, simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    request = RoutingRequest(prompt_tokens=50, deadline_ms=deadline)
    cheaper = choose(request, [*fast_slow, speculative(20.0)], simple_policy, 0.0)
    assert isinstance(cheaper, Decision) and cheaper.variant_id == "fam:slow+fast"
    dearer = choose(request, [*fast_slow, speculative(40.0)], simple_policy, 0.0)
    assert isinstance(dearer, Decision) and dearer.variant_id == "fam:slow"
