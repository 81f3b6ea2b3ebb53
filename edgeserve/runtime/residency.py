"""Which variants are resident under a memory budget, and what a swap would evict (issue 7).

Pure bookkeeping: no models, no I/O, no clock — every method that needs the time takes `now`
(seconds, any monotonic origin), so the rules are unit-tested without loading anything:

- the variants that do not all fit are loaded on demand, evicting the least recently used ones;
- a variant that is generating (`busy`) is never evicted;
- a variant stays at least `min_residency_s` after its load, so alternating requests cannot
  make two variants evict each other at every request (thrashing); a swap that needs such a
  victim waits until its residency is over, and that wait is part of the swap's cost.

The async side (loading, unloading, the CPU slot) is `runtime.loader.ResidencyManager`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class SwapPlan:
    """How to make `variant_id` resident: unload `evict` (least recently used first), after
    waiting `wait_s` for their minimum residency. An empty plan means it is resident already."""

    variant_id: str
    evict: tuple[str, ...] = ()
    wait_s: float = 0.0
    load: bool = True

    @property
    def resident(self) -> bool:
        return not self.load


@dataclass
class _Resident:
    loaded_at: float
    last_used: float


class Residency:
    """The budget, each variant's size in it, and which variants are resident since when."""

    def __init__(self, sizes: dict[str, int], budget_bytes: int | None, min_residency_s: float = 0.0) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError("the memory budget must be positive")
        if min_residency_s < 0:
            raise ValueError("the minimum residency must not be negative")
        self.sizes = dict(sizes)
        self.budget_bytes = budget_bytes
        self.min_residency_s = min_residency_s
        self._resident: dict[str, _Resident] = {}

    @property
    def fits_all(self) -> bool:
        return self.budget_bytes is None or sum(self.sizes.values()) <= self.budget_bytes

    @property
    def used_bytes(self) -> int:
        return sum(self.sizes[v] for v in self._resident)

    @property
    def resident_ids(self) -> list[str]:
        """Resident variants, least recently used first."""
        return sorted(self._resident, key=lambda v: self._resident[v].last_used)

    def is_resident(self, variant_id: str) -> bool:
        return variant_id in self._resident

    def fits_alone(self, variant_id: str) -> bool:
        return self.budget_bytes is None or self.sizes[variant_id] <= self.budget_bytes

    def plan(self, variant_id: str, now: float, busy: Collection[str] = (), *,
             min_residency: bool = True) -> SwapPlan | None:
        """What loading `variant_id` now takes; None when no room can be made (it is larger
        than the whole budget, or the variants that would have to go are generating).
        `min_residency=False` ignores the minimum residency (start-up, before any traffic)."""
        if variant_id in self._resident:
            return SwapPlan(variant_id, load=False)
        if not self.fits_alone(variant_id):
            return None
        free = None if self.budget_bytes is None else self.budget_bytes - self.used_bytes
        need = self.sizes[variant_id]
        victims: list[str] = []
        for candidate in self.resident_ids:
            if free is None or free >= need:
                break
            if candidate in busy:
                continue
            victims.append(candidate)
            free += self.sizes[candidate]
        if free is not None and free < need:
            return None
        keep_s = self.min_residency_s if min_residency else 0.0
        wait_s = max((self._resident[v].loaded_at + keep_s - now for v in victims), default=0.0)
        return SwapPlan(variant_id, tuple(victims), max(0.0, wait_s))

    def loaded(self, variant_id: str, now: float) -> None:
        self._resident[variant_id] = _Resident(loaded_at=now, last_used=now)

    def unloaded(self, variant_id: str) -> None:
        self._resident.pop(variant_id, None)

    def used(self, variant_id: str, now: float) -> None:
        """A generation starts on it: it becomes the most recently used."""
        if variant_id in self._resident:
            self._resident[variant_id].last_used = now
