from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.routing.costs import (
    CostProfile,
    decode_steps_ms,
    fit_profile,
    max_new_tokens_within,
    observe,
    predict_ms,
)


def profile(**overrides: float) -> CostProfile:
    base = CostProfile(variant_id="fam:q4_1", prefill_fixed_ms=40.0, prefill_ms_per_token=0.8,
                       decode_ms_per_token=25.0, decode_growth_ms_per_token_per_1k_ctx=3.0)
    return msgspec.structs.replace(base, **overrides)


def brute_force(p: CostProfile, prompt: int, n: int) -> float:
    if n == 0:
        return 0.0
    total = p.prefill_fixed_ms + p.prefill_ms_per_token * prompt
    for j in range(1, n):
        total += p.decode_ms_per_token + p.decode_growth_ms_per_token_per_1k_ctx * (prompt + j) / 1000
    return total


@pytest.mark.parametrize("prompt,n", [(0, 0), (0, 1), (10, 1), (10, 2), (100, 37), (1500, 500)])
def test_predict_matches_the_step_by_step_sum(prompt: int, n: int) -> None:
    p = profile()
    assert predict_ms(p, prompt, n) == pytest.approx(brute_force(p, prompt, n), rel=1e-12)


def test_one_token_costs_exactly_the_prefill() -> None:
    assert predict_ms(profile(), 100, 1) == pytest.approx(40.0 + 80.0)


profiles = st.builds(
    lambda fixed, rate, d0, growth: CostProfile(
        variant_id="v", prefill_fixed_ms=fixed, prefill_ms_per_token=rate,
        decode_ms_per_token=d0, decode_growth_ms_per_token_per_1k_ctx=growth),
    st.floats(0, 1e5), st.floats(0, 1e3), st.floats(0.01, 1e5), st.floats(0, 500),
)


@settings(max_examples=400, deadline=None)
@given(profiles, st.integers(0, 8000), st.floats(-10, 1e8, allow_nan=False),
       st.none() | st.integers(1, 100_000))
def test_max_new_tokens_within_is_the_largest_that_fits(
        p: CostProfile, prompt: int, budget: float, limit: int | None) -> None:
    n = max_new_tokens_within(p, prompt, budget, limit=limit)
    assert n >= 0
    if limit is not None:
        assert n <= limit
    if n > 0:
        assert predict_ms(p, prompt, n) <= budget
    if limit is None or n < limit:
        assert predict_ms(p, prompt, n + 1) > budget


@pytest.mark.parametrize("budget,expected", [(-1.0, 0), (0.0, 0), (119.9, 0), (120.0, 1),
                                             (float("nan"), 0)])
def test_max_new_tokens_edges(budget: float, expected: int) -> None:
    assert max_new_tokens_within(profile(), 100, budget) == expected


def test_max_new_tokens_with_infinite_budget_needs_a_limit() -> None:
    assert max_new_tokens_within(profile(), 10, float("inf"), limit=300) == 300
    with pytest.raises(ValueError):
        max_new_tokens_within(profile(), 10, float("inf"))


def synthetic(fixed: float, rate: float, d0: float, growth: float, noise: float = 0.0,
              seed: int = 7) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    rng = random.Random(seed)

    def jitter() -> float:
        return 1 + rng.uniform(-noise, noise) if noise else 1.0

    prefill = [(p, (fixed + rate * p) * jitter()) for p in (16, 64, 256, 512)]
    decode = [(c + j, (d0 + growth * (c + j) / 1000) * jitter())
              for c in (16, 512, 1024, 1536) for j in range(1, 25)]
    return prefill, decode


def test_fit_recovers_known_coefficients() -> None:
    prefill, decode = synthetic(40.0, 0.8, 25.0, 3.0)
    fitted = fit_profile(prefill, decode, variant_id="fam:q8_0", gguf_sha256="ab" * 32,
                         n_threads=4, host="board", load_ms=900.0)
    assert fitted.prefill_fixed_ms == pytest.approx(40.0)
    assert fitted.prefill_ms_per_token == pytest.approx(0.8)
    assert fitted.decode_ms_per_token == pytest.approx(25.0)
    assert fitted.decode_growth_ms_per_token_per_1k_ctx == pytest.approx(3.0)
    assert fitted.prefill_mape == pytest.approx(0.0, abs=1e-9)
    assert fitted.decode_mape == pytest.approx(0.0, abs=1e-9)
    assert (fitted.n_prefill_samples, fitted.n_decode_samples) == (4, 96)
    assert (fitted.n_threads, fitted.host, fitted.load_ms) == (4, "board", 900.0)
    assert fitted.updated_count == 0


def test_fit_with_noise_stays_close_and_reports_residuals() -> None:
    prefill, decode = synthetic(40.0, 0.8, 25.0, 3.0, noise=0.03)
    fitted = fit_profile(prefill, decode, variant_id="v")
    assert fitted.prefill_ms_per_token == pytest.approx(0.8, rel=0.05)
    assert fitted.decode_ms_per_token == pytest.approx(25.0, rel=0.05)
    assert fitted.decode_mape is not None and 0 < fitted.decode_mape < 0.03
    assert fitted.prefill_mape is not None and 0 < fitted.prefill_mape < 0.03


def test_fit_never_returns_negative_costs() -> None:
    # decode getting *faster* with context (noise) → flat; prefill with a negative intercept →
    # through the origin
    fitted = fit_profile([(10, 5.0), (100, 100.0)], [(10, 30.0), (2000, 20.0)], variant_id="v")
    assert fitted.decode_growth_ms_per_token_per_1k_ctx == 0.0
    assert fitted.decode_ms_per_token == pytest.approx(25.0)
    assert fitted.prefill_fixed_ms == 0.0
    assert fitted.prefill_ms_per_token > 0


def test_fit_single_samples() -> None:
    fitted = fit_profile([(100, 50.0)], [(120, 20.0)], variant_id="v")
    assert (fitted.prefill_fixed_ms, fitted.prefill_ms_per_token) == (0.0, 0.5)
    assert (fitted.decode_ms_per_token, fitted.decode_growth_ms_per_token_per_1k_ctx) == (20.0, 0.0)


@pytest.mark.parametrize("prefill,decode", [([], [(1, 1.0)]), ([(1, 1.0)], []),
                                            ([(0, 5.0)], [(1, 1.0)]), ([(5, 1.0)], [(1, 0.0)])])
def test_fit_rejects_unusable_samples(prefill: list[tuple[int, float]],
                                      decode: list[tuple[int, float]]) -> None:
    with pytest.raises(ValueError, match="v"):
        fit_profile(prefill, decode, variant_id="v")


def test_profile_round_trips_through_json() -> None:
    p = profile()
    assert msgspec.json.decode(msgspec.json.encode(p), type=CostProfile) == p


def test_profile_rejects_free_tokens_and_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError, match="positive"):
        msgspec.json.decode(b'{"variant_id":"v","prefill_ms_per_token":1,"decode_ms_per_token":0}',
                            type=CostProfile)
    with pytest.raises(msgspec.ValidationError, match="colour"):
        msgspec.json.decode(b'{"variant_id":"v","prefill_ms_per_token":1,'
                            b'"decode_ms_per_token":1,"colour":1}', type=CostProfile)


def test_observe_moves_rates_toward_observation() -> None:
    p = profile(prefill_fixed_ms=0.0, prefill_ms_per_token=1.0, decode_ms_per_token=10.0,
                decode_growth_ms_per_token_per_1k_ctx=0.0)
    # prefill predicted 100 ms, observed 200; decode 10 steps predicted 100 ms, observed 50
    updated = observe(p, 100, 200.0, 10, 50.0, alpha=0.2)
    assert updated.prefill_ms_per_token == pytest.approx(1.2)
    assert updated.decode_ms_per_token == pytest.approx(9.0)
    assert updated.updated_count == 1
    assert updated.recent_ape == pytest.approx(abs(200 - 250) / 250)
    assert p.decode_ms_per_token == 10.0  # the input is not modified


def test_observe_repeatedly_converges() -> None:
    p = profile(decode_growth_ms_per_token_per_1k_ctx=0.0)
    for _ in range(60):
        p = observe(p, 50, 0.0, 20, 20 * 50.0)
    assert p.decode_ms_per_token == pytest.approx(50.0, rel=1e-3)
    assert p.prefill_ms_per_token == 0.8  # prompt_ms 0 → prefill untouched
    assert p.updated_count == 60


def test_observe_scales_growth_with_the_base() -> None:
    updated = observe(profile(), 100, 0.0, 10, 2 * decode_steps_ms(profile(), 100, 10))
    assert updated.decode_ms_per_token == pytest.approx(25.0 * 1.2)
    assert updated.decode_growth_ms_per_token_per_1k_ctx == pytest.approx(3.0 * 1.2)


@pytest.mark.parametrize("args", [(0, 0.0, 0, 0.0), (100, 0.0, 0, 100.0), (0, 100.0, 0, 0.0),
                                  (-5, 10.0, -1, 10.0)])
def test_observe_ignores_degenerate_samples(args: tuple[int, float, int, float]) -> None:
    p = profile()
    assert observe(p, *args) is p


def test_observe_clamps_outliers() -> None:
    p = profile(decode_growth_ms_per_token_per_1k_ctx=0.0)
    updated = observe(p, 10, 0.0, 10, 1e9, alpha=0.2)  # e.g. the board was suspended
    assert updated.decode_ms_per_token == pytest.approx(25.0 * (0.8 + 0.2 * 4))


def test_observe_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError):
        observe(profile(), 10, 10.0, 10, 10.0, alpha=0.0)
