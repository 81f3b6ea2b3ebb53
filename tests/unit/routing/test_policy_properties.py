"""Properties of choose over random profiles, deadlines, queues and prompt sizes."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgeserve.routing.costs import CostProfile, predict_ms
from edgeserve.routing.policy import (
    Decision,
    Refusal,
    RoutingRequest,
    VariantCandidate,
    choose,
    safety_margin_ms,
)
from edgeserve.routing.policy_file import PolicyFile, parse_policy

POLICY = parse_policy(b"""
name = "prop"
[curves.a.boxed]
budgets = [32, 128, 512]
accuracy = [0.1, 0.3, 0.5]
[curves.b.boxed]
budgets = [32, 128, 512]
accuracy = [0.05, 0.4, 0.7]
[curves.c.boxed]
budgets = [64]
accuracy = [0.2]
""", "prop.toml")
NO_MARGIN = parse_policy(b'name = "bare"\n[routing]\nsafety_margin_ms = 0\n'
                         b"safety_margin_ratio = 0\nmin_useful_tokens = 1\n", "bare.toml")

profiles = st.builds(
    lambda fixed, rate, d0, growth: CostProfile(
        variant_id="v", prefill_fixed_ms=fixed, prefill_ms_per_token=rate,
        decode_ms_per_token=d0, decode_growth_ms_per_token_per_1k_ctx=growth),
    st.floats(0, 5e4), st.floats(0, 200), st.floats(0.05, 6e4), st.floats(0, 200),
)


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[VariantCandidate]:
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4,
                          unique=True))
    return [VariantCandidate(variant_id=f"f:{name}", name=name, profile=draw(profiles),
                             n_ctx=draw(st.integers(64, 8192)), available=draw(st.booleans()),
                             wait_ms=draw(st.none() | st.floats(0, 1e5)), load_ms=draw(st.floats(0, 1e5)))
            for name in names]


requests = st.builds(
    RoutingRequest,
    prompt_tokens=st.integers(0, 4000),
    requested_max_tokens=st.none() | st.integers(1, 4096),
    deadline_ms=st.floats(1, 3_600_000),
    pinned=st.none() | st.sampled_from(["f:a", "f:b", "f:c", "f:d"]),
    style=st.none() | st.sampled_from(["boxed", "aav"]),
    hint=st.none() | st.booleans(),
)


@settings(max_examples=600, deadline=None)
@given(requests, candidate_lists(), st.floats(0, 2e6), st.sampled_from([POLICY, NO_MARGIN]))
def test_a_decision_never_exceeds_its_deadline(request: RoutingRequest,
                                               candidates: list[VariantCandidate],
                                               queue: float, policy: PolicyFile) -> None:
    result = choose(request, candidates, policy, queue)
    if isinstance(result, Refusal):
        if result.code == "deadline_infeasible":
            assert result.retry_after_s is not None and result.retry_after_s >= 1
            assert result.min_deadline_ms is not None
            assert result.min_deadline_ms > (request.deadline_ms or 0) - 1
        return
    assert request.deadline_ms is not None
    chosen = next(c for c in candidates if c.variant_id == result.variant_id)
    wait = queue if chosen.wait_ms is None else chosen.wait_ms
    assert result.queue_wait_ms == wait
    assert result.predicted_ms + wait <= request.deadline_ms
    assert result.predicted_ms + wait + safety_margin_ms(request.deadline_ms, policy) \
        <= request.deadline_ms * (1 + 1e-9)
    assert chosen.available
    assert request.pinned in (None, chosen.variant_id)
    cap = min(request.requested_max_tokens or policy.routing.default_max_tokens,
              chosen.n_ctx - request.prompt_tokens)
    assert min(policy.routing.min_useful_tokens, cap) <= result.max_tokens <= cap
    assert result.predicted_ms == chosen.load_ms + predict_ms(chosen.profile, request.prompt_tokens,
                                                              result.max_tokens)


# Most random requests are served, so many examples are filtered out; Hypothesis still fails
# (Unsatisfiable) if none is a refusal.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(requests, candidate_lists(), st.floats(0, 2e6))
def test_refused_deadlines_become_feasible_at_min_deadline(
        request: RoutingRequest, candidates: list[VariantCandidate], queue: float) -> None:
    result = choose(request, candidates, POLICY, queue)
    assume(isinstance(result, Refusal) and result.code == "deadline_infeasible")
    assert isinstance(result, Refusal) and result.min_deadline_ms is not None
    retried = choose(RoutingRequest(prompt_tokens=request.prompt_tokens,
                                    requested_max_tokens=request.requested_max_tokens,
                                    deadline_ms=result.min_deadline_ms + 1, pinned=request.pinned,
                                    style=request.style, hint=request.hint),
                     candidates, POLICY, queue)
    assert isinstance(retried, Decision)


@settings(max_examples=300, deadline=None)
@given(requests, candidate_lists())
def test_more_time_never_lowers_the_expected_accuracy(request: RoutingRequest,
                                                      candidates: list[VariantCandidate]) -> None:
    assert request.deadline_ms is not None
    short = choose(request, candidates, POLICY, 0)
    longer = choose(RoutingRequest(prompt_tokens=request.prompt_tokens,
                                   requested_max_tokens=request.requested_max_tokens,
                                   deadline_ms=request.deadline_ms * 2, pinned=request.pinned,
                                   style=request.style, hint=request.hint),
                    candidates, POLICY, 0)
    if isinstance(short, Decision):
        assert isinstance(longer, Decision)
        assert longer.expected_accuracy >= short.expected_accuracy - 1e-12
