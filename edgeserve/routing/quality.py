"""How good an answer is expected to be at a token budget: one measured curve per variant and style.

A model that runs out of tokens before it answers scores nothing, so accuracy rises with the
budget and then flattens once most answers fit. The curve is the measured points joined by
straight lines from (0, 0), flat after the last point.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Budget = Annotated[int, msgspec.Meta(ge=1)]


class QualityCurve(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Accuracy (0..1) measured at strictly increasing token budgets, and optionally with no budget
    limit at all (``unlimited``, reported by ``accuracy_unlimited``; routing always has a finite
    budget and uses the flat tail after the last point).

    Measured points that dip (noise: 0.31 at 256 tokens, 0.30 at 512) are read through their
    running maximum, because a larger budget never forces a longer answer: the curve used for
    routing is the best accuracy measured at any budget up to the one asked about.
    """

    budgets: list[Budget]
    accuracies: list[Fraction] = msgspec.field(name="accuracy")  # `accuracy = [...]` in TOML
    unlimited: Fraction | None = None

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("`budgets` needs at least one token budget")
        if len(self.budgets) != len(self.accuracies):
            raise ValueError(
                f"`budgets` has {len(self.budgets)} entries but `accuracy` has "
                f"{len(self.accuracies)}; give one accuracy per budget"
            )
        for before, after in zip(self.budgets, self.budgets[1:], strict=False):
            if after <= before:
                raise ValueError(f"`budgets` must increase strictly, got {before} then {after}")

    def accuracy(self, budget: float) -> float:
        """Expected accuracy at ``budget`` tokens: 0 at 0, piecewise linear, non-decreasing."""
        if budget <= 0:
            return 0.0
        prev_budget, prev_acc = 0.0, 0.0
        for b, acc in zip(self.budgets, self.accuracies, strict=True):
            acc = max(acc, prev_acc)
            if budget >= b:
                prev_budget, prev_acc = float(b), acc
                continue
            share = (budget - prev_budget) / (b - prev_budget)
            # clamped so float rounding cannot break monotonicity at the measured points
            return min(max(prev_acc + (acc - prev_acc) * share, prev_acc), acc)
        return prev_acc

    @property
    def accuracy_unlimited(self) -> float:
        """Accuracy with no budget limit: ``unlimited`` if measured, else the flat tail."""
        tail = self.accuracy(self.budgets[-1])
        return tail if self.unlimited is None else max(self.unlimited, tail)


def make_curve(
    budgets: list[int], accuracy: list[float], unlimited: float | None = None
) -> QualityCurve:
    """Build and validate a curve from plain values (ValueError on bad points)."""
    try:
        return msgspec.convert(
            {"budgets": budgets, "accuracy": accuracy, "unlimited": unlimited}, QualityCurve
        )
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc
