from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeserve.routing.quality import QualityCurve, make_curve


def test_interpolates_from_zero_and_is_flat_after_the_last_point() -> None:
    curve = make_curve([100, 200], [0.3, 0.5], unlimited=0.6)
    assert curve.accuracy(0) == 0.0
    assert curve.accuracy(-5) == 0.0
    assert curve.accuracy(50) == pytest.approx(0.15)
    assert curve.accuracy(100) == pytest.approx(0.3)
    assert curve.accuracy(150) == pytest.approx(0.4)
    assert curve.accuracy(200) == pytest.approx(0.5)
    assert curve.accuracy(10_000) == pytest.approx(0.5)
    assert curve.accuracy_unlimited == 0.6


def test_dips_are_read_through_the_running_maximum() -> None:
    curve = make_curve([64, 128, 256], [0.4, 0.3, 0.5])
    assert curve.accuracy(128) == pytest.approx(0.4)
    assert curve.accuracy(192) == pytest.approx(0.45)
    assert curve.accuracy_unlimited == pytest.approx(0.5)


@pytest.mark.parametrize("budgets,accuracy,unlimited,message", [
    ([], [], None, "at least one"),
    ([64, 64], [0.1, 0.2], None, "increase strictly"),
    ([128, 64], [0.1, 0.2], None, "increase strictly"),
    ([64, 128], [0.1], None, "one accuracy per budget"),
    ([64], [1.5], None, "accuracy"),
    ([64], [-0.1], None, "accuracy"),
    ([0], [0.1], None, "budgets"),
    ([64], [0.1], 1.2, "unlimited"),
])
def test_invalid_points_are_rejected(budgets: list[int], accuracy: list[float],
                                     unlimited: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_curve(budgets, accuracy, unlimited)


curves = st.lists(st.tuples(st.integers(1, 5000), st.floats(0, 1)), min_size=1, max_size=8,
                  unique_by=lambda point: point[0]).map(
    lambda points: make_curve([b for b, _ in sorted(points)], [a for _, a in sorted(points)]))


@given(curves, st.floats(-10, 10_000), st.floats(0, 10_000))
def test_curve_is_monotone_and_bounded(curve: QualityCurve, budget: float, more: float) -> None:
    low, high = curve.accuracy(budget), curve.accuracy(budget + more)
    assert 0.0 <= low <= high <= 1.0
    assert curve.accuracy(0) == 0.0
    assert high <= curve.accuracy_unlimited
