"""The study's comparison: two variants given equal decode time."""

from __future__ import annotations

import pytest

from edgeserve.routing.quality import make_curve
from edgeserve.tools.eval.same_latency import crossover_ms, equal_latency_rows


def test_equal_latency_gives_the_fast_variant_ratio_times_the_tokens() -> None:
    fast = make_curve([100, 200], [0.4, 0.5])  # e.g. Q2_K
    slow = make_curve([100, 200], [0.3, 0.7])  # e.g. Q8_0, 2x the time per token
    rows = equal_latency_rows(fast, slow, fast_ms_per_token=10.0, ratio=2.0)
    assert [r.latency_ms for r in rows] == [1000.0, 2000.0, 4000.0]
    first, second, third = rows
    assert (first.fast_tokens, first.slow_tokens) == (100, 50)
    assert first.fast_accuracy == 0.4 and first.slow_accuracy == pytest.approx(0.15)  # ramp from (0, 0)
    assert first.extrapolated and first.winner == "fast"
    assert (second.fast_tokens, second.slow_tokens) == (200, 100)
    assert (second.fast_accuracy, second.slow_accuracy) == (0.5, 0.3)
    assert not second.extrapolated
    assert (third.fast_tokens, third.slow_tokens) == (400, 200)
    assert (third.fast_accuracy, third.slow_accuracy, third.winner) == (0.5, 0.7, "slow")
    assert third.extrapolated  # the fast curve's flat tail
    assert crossover_ms(rows) == 4000.0


def test_no_crossover_when_the_slow_variant_never_catches_up() -> None:
    fast = make_curve([100], [0.5])
    slow = make_curve([100], [0.4])
    assert crossover_ms(equal_latency_rows(fast, slow, 5.0, 1.5)) is None


def test_bad_ratio() -> None:
    curve = make_curve([10], [0.1])
    with pytest.raises(ValueError):
        equal_latency_rows(curve, curve, 1.0, 0.0)
