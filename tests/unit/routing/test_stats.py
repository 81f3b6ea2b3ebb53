"""edgeserve/routing/stats.py: the one percentile."""

from __future__ import annotations

import pytest

from edgeserve.routing.stats import percentile


def test_percentile_interpolates_between_closest_ranks_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_one_value_and_no_values() -> None:
    assert percentile([5.0], 95) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_q_outside_0_to_100_is_clamped() -> None:
    assert percentile([1.0, 2.0], -5) == 1.0 and percentile([1.0, 2.0], 250) == 2.0
