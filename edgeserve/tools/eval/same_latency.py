"""The study's same-latency comparison: two variants given the same time, not the same tokens.

A slower variant (Q8_0) costs ``ratio`` times the decode time per token of a faster one (Q2_K),
so in the time the slow one writes ``b`` tokens the fast one writes ``b × ratio``. Each variant's
accuracy at a token budget comes from its measured sweep curve, read the way the router reads it
(piecewise linear from (0, 0) through the measured points, running maximum, flat after the last
point). Latency is decode time only (``tokens × ms/token``): prompt processing is the same for
both variants' prompts and small next to decoding at these budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeserve.routing.quality import QualityCurve


@dataclass(frozen=True)
class EqualLatencyRow:
    latency_ms: float  # decode time both variants are given
    fast_tokens: float
    fast_accuracy: float
    slow_tokens: float
    slow_accuracy: float
    extrapolated: bool  # a budget lies outside the measured points (flat tail or the (0, 0) ramp)

    @property
    def winner(self) -> str:
        if abs(self.fast_accuracy - self.slow_accuracy) < 1e-12:
            return "tie"
        return "fast" if self.fast_accuracy > self.slow_accuracy else "slow"


def equal_latency_rows(fast: QualityCurve, slow: QualityCurve, fast_ms_per_token: float,
                       ratio: float) -> list[EqualLatencyRow]:
    """Accuracy of both variants at equal decode time, at every budget either one measured
    (``ratio`` = slow ms/token ÷ fast ms/token), sorted by latency."""
    if ratio <= 0 or fast_ms_per_token <= 0:
        raise ValueError("ratio and fast_ms_per_token must be positive")
    slow_ms_per_token = fast_ms_per_token * ratio
    lows = (fast.budgets[0], slow.budgets[0])
    highs = (fast.budgets[-1], slow.budgets[-1])
    points: dict[float, tuple[float, float]] = {}
    for b in fast.budgets:
        points[b * fast_ms_per_token] = (float(b), b / ratio)
    for b in slow.budgets:
        points.setdefault(b * slow_ms_per_token, (b * ratio, float(b)))
    rows = []
    for latency, (fast_tokens, slow_tokens) in sorted(points.items()):
        outside = (not lows[0] <= fast_tokens <= highs[0]) or (not lows[1] <= slow_tokens <= highs[1])
        rows.append(EqualLatencyRow(latency, fast_tokens, fast.accuracy(fast_tokens), slow_tokens,
                                    slow.accuracy(slow_tokens), outside))
    return rows


def crossover_ms(rows: Sequence[EqualLatencyRow]) -> float | None:
    """The first latency from which the slow variant is at least as accurate as the fast one at
    every later measured latency (and strictly better at one), or None if it never overtakes."""
    for i, row in enumerate(rows):
        tail = rows[i:]
        if all(r.slow_accuracy >= r.fast_accuracy for r in tail) and any(
                r.slow_accuracy > r.fast_accuracy for r in tail):
            return row.latency_ms
    return None
