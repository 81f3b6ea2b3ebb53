from __future__ import annotations

import itertools
import math

import pytest

from edgeserve.routing.costs import CostProfile, predict_ms, prefill_ms
from edgeserve.routing.policy import VariantCandidate
from edgeserve.routing.policy_file import parse_policy
from edgeserve.routing.simulator import Arrival, simulate
from edgeserve.routing.speculation import expected_tokens_per_step, speculative_profile

TARGET = CostProfile(variant_id="fam:q8_0", n_threads=4, host="board", prefill_fixed_ms=100.0,
                     prefill_ms_per_token=5.0, prefill_growth_ms_per_token_per_1k_ctx=1.0,
                     decode_ms_per_token=100.0, decode_growth_ms_per_token_per_1k_ctx=2.0,
                     batch_step_factors={2: 1.1, 4: 1.3}, gguf_sha256="abc", load_ms=50.0)
DRAFT = CostProfile(variant_id="fam:q2_k", prefill_fixed_ms=100 / 2.73, prefill_ms_per_token=2.0,
                    decode_ms_per_token=100 / 2.73, decode_growth_ms_per_token_per_1k_ctx=0.5)


def pair(acceptance: float = 0.8, draft_len: int = 4, verify_factor: float = 1.1) -> CostProfile:
    return speculative_profile(TARGET, DRAFT, acceptance=acceptance, draft_len=draft_len,
                               verify_factor=verify_factor, variant_id="fam:q8_0+q2_k")


@pytest.mark.parametrize("acceptance,draft_len,expected", [
    (0.5, 1, 1.5),          # 1 + a
    (0.5, 2, 1.75),         # 1 + a + a^2
    (0.8, 4, 3.3616),       # (1 - 0.8^5) / 0.2
    (0.0, 4, 1.0),          # every draft rejected: the target's own token only
    (1.0, 4, 5.0),          # every draft accepted: k + 1
    (1.0, 1, 2.0),
])
def test_expected_tokens_per_step(acceptance: float, draft_len: int, expected: float) -> None:
    assert expected_tokens_per_step(acceptance, draft_len) == pytest.approx(expected, rel=1e-12)


def test_expected_tokens_grow_with_acceptance_and_approach_k_plus_1() -> None:
    for k in (1, 2, 4, 6):
        values = [expected_tokens_per_step(a / 100, k) for a in range(101)]
        assert all(x < y for x, y in itertools.pairwise(values))
        assert values[0] == 1.0 and values[-1] == k + 1
        assert expected_tokens_per_step(0.999999, k) == pytest.approx(k + 1, rel=1e-5)


def test_the_pair_beats_its_target_with_the_studys_cost_ratio() -> None:
    """Draft at 1/2.73 of the target (Q2_K vs Q8_0 on the RK3568), a = 0.8, k = 4, verify 1.1:
    a step costs 4/2.73 + 1.1 = 2.565 target steps and yields 3.3616 tokens."""
    profile = pair()
    ratio = profile.decode_ms_per_token / TARGET.decode_ms_per_token
    assert ratio == pytest.approx((4 / 2.73 + 1.1) / 3.3616, rel=1e-12)
    assert ratio == pytest.approx(0.7631, abs=1e-4)
    assert profile.tokens_per_step == pytest.approx(3.3616)
    assert predict_ms(profile, 150, 1024) < predict_ms(TARGET, 150, 1024)


def test_with_no_acceptance_the_pair_is_slower_than_its_target() -> None:
    profile = pair(acceptance=0.0)
    assert profile.tokens_per_step == 1.0
    assert profile.decode_ms_per_token == pytest.approx(4 * 100 / 2.73 + 1.1 * 100)
    assert profile.decode_ms_per_token > TARGET.decode_ms_per_token


def test_full_acceptance_yields_k_plus_1_tokens_per_step() -> None:
    profile = pair(acceptance=1.0, draft_len=3, verify_factor=1.0)
    assert profile.tokens_per_step == 4.0
    assert profile.decode_ms_per_token == pytest.approx((3 * 100 / 2.73 + 100) / 4)


def test_the_pair_gets_cheaper_as_acceptance_rises() -> None:
    costs = [pair(acceptance=a / 10).decode_ms_per_token for a in range(11)]
    assert all(x > y for x, y in itertools.pairwise(costs))


def test_growth_prefill_batching_and_identity() -> None:
    profile = pair()
    tokens = expected_tokens_per_step(0.8, 4)
    assert profile.decode_growth_ms_per_token_per_1k_ctx == pytest.approx((4 * 0.5 + 1.1 * 2.0) / tokens)
    # the target's prefill, plus the draft reading the prompt (its per-token terms, no fixed part)
    assert profile.prefill_fixed_ms == TARGET.prefill_fixed_ms
    assert profile.prefill_ms_per_token == 7.0
    assert profile.prefill_growth_ms_per_token_per_1k_ctx == 1.0
    assert prefill_ms(profile, 200) == pytest.approx(prefill_ms(TARGET, 200) + 2.0 * 200)
    assert profile.batch_step_factors == TARGET.batch_step_factors
    assert profile.batch_step_factors is not TARGET.batch_step_factors
    assert (profile.variant_id, profile.n_threads, profile.host) == ("fam:q8_0+q2_k", 4, "board")
    assert (profile.gguf_sha256, profile.load_ms) == ("", 0.0)


@pytest.mark.parametrize("acceptance", [-0.1, 1.01, 80.0, math.nan])
def test_acceptance_must_be_a_probability(acceptance: float) -> None:
    with pytest.raises(ValueError, match="acceptance must be a probability between 0 and 1"):
        expected_tokens_per_step(acceptance, 4)
    with pytest.raises(ValueError, match="acceptance must be a probability"):
        pair(acceptance=acceptance)


@pytest.mark.parametrize("draft_len", [0, -2, 2.5, True])
def test_draft_len_must_be_a_positive_whole_number(draft_len: int) -> None:
    with pytest.raises(ValueError, match="draft_len must be a whole number of at least 1"):
        expected_tokens_per_step(0.8, draft_len)


@pytest.mark.parametrize("verify_factor", [0.9, 0.0, -1.0, math.nan, math.inf])
def test_verify_factor_must_be_at_least_one(verify_factor: float) -> None:
    with pytest.raises(ValueError, match="verify_factor must be a finite number of at least 1"):
        pair(verify_factor=verify_factor)


def test_the_simulated_board_charges_a_pair_its_effective_cost_per_token() -> None:
    """routing.batching's Timeline steps one token at a time at the profile's per-token cost; for
    a pair that is the effective cost, so a request's total is the pair's prediction (a real step
    yields ~tokens_per_step tokens at once, which changes only where a deadline cut falls)."""
    flat = speculative_profile(
        CostProfile(variant_id="fam:q8_0", prefill_fixed_ms=100.0, prefill_ms_per_token=5.0,
                         decode_ms_per_token=100.0),
        CostProfile(variant_id="fam:q2_k", prefill_ms_per_token=2.0, decode_ms_per_token=30.0),
        acceptance=0.8, draft_len=4, verify_factor=1.1, variant_id="fam:q8_0+q2_k")
    candidate = VariantCandidate(variant_id="fam:q8_0+q2_k", name="q8_0", profile=flat, n_ctx=4096)
    policy = parse_policy(b'name = "p"\n[routing]\ndefault_max_tokens = 300\n', "p.toml")
    result = simulate([Arrival(arrival_ms=0, prompt_tokens=150)], [candidate], policy)
    assert result.outcomes[0].budget_tokens == 300
    assert result.outcomes[0].finish_ms == pytest.approx(predict_ms(flat, 150, 300), rel=1e-12)
