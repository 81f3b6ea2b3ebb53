"""Statistics shared by the server and the tools (one definition each)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in 0..100, clamped), linearly interpolated between the
    closest ranks (numpy's default method). At least one value (ValueError otherwise)."""
    if not values:
        raise ValueError("the percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
