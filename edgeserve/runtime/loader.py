"""Loading and evicting variants under the memory budget (issue 7).

`ResidencyManager` applies the pure rules of `runtime.residency.Residency` to the runners:
admission asks it what a variant would cost to make resident (`load_estimate_ms`, part of the
variant's predicted latency, so routing swaps only when it pays), and LocalVariant.start calls
`ensure` before it hands the request to the stepping loop; a variant with requests in the loop
is never evicted (a swap that needs its memory waits for them). With a budget that holds every
variant (the default on a machine with enough RAM) everything is loaded at start and `ensure`
returns at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from edgeserve.errors import GenerationFailedError, ModelPreparationError
from edgeserve.logging import get_logger
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.calibrate import CalibrationPlan, ensure_profiles
from edgeserve.runtime.memory import format_bytes, resident_bytes
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.residency import Residency, SwapPlan
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.variant_id import VariantId

log = get_logger("edgeserve.residency")

# A variant never loaded on this board and without a profile: assume weights come from storage
# at 100 MB/s (an SD card or eMMC of the boards this serves; an NVMe SSD is several times faster).
FALLBACK_LOAD_BYTES_PER_S = 100e6
BUSY_POLL_S = 0.05


class ResidencyManager:
    def __init__(self, runners: dict[str, LlamaRunner], budget_bytes: int | None,
                 min_residency_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.runners = runners
        self.residency = Residency({v: resident_bytes(r.path, r.config.n_ctx * (r.config.parallel + r.extra_sequences))
                                    for v, r in runners.items()},
                                   budget_bytes, min_residency_s)
        self._clock = clock
        self._lock = asyncio.Lock()  # one swap at a time: parallel loads only thrash storage
        # Victims of the swap under way. The stepping loop lets requests of other variants run
        # while a swap unloads one in a worker thread; a request for a victim must not take the
        # fast path of `ensure` (still loaded and resident on the books) and join its lane on the
        # way out: the unload would find the lane busy. It waits for the lock instead.
        self._leaving: set[str] = set()
        self.loads = 0
        self.evictions = 0

    @property
    def fits_all(self) -> bool:
        return self.residency.fits_all

    @property
    def budget_bytes(self) -> int | None:
        return self.residency.budget_bytes

    def adopt_loaded(self) -> None:
        """Record the runners loaded outside `ensure` (the start-up `load_all`) as resident."""
        now = self._clock()
        for variant_id, runner in self.runners.items():
            if runner.loaded and not self.residency.is_resident(variant_id):
                self.residency.loaded(variant_id, now)

    def _busy(self) -> set[str]:
        return {v for v, r in self.runners.items() if r.generating}

    def unavailable_reason(self, variant_id: str) -> str | None:
        """Why `variant_id` can never be made resident, for the decision's reason; None if it can."""
        if self.residency.fits_alone(variant_id):
            return None
        return f"needs {format_bytes(self.residency.sizes[variant_id])}, more than the whole memory budget"

    def load_estimate_ms(self, variant_id: str, profile_load_ms: float | None = None) -> float | None:
        """Time until `variant_id` can start: 0 when resident; else the wait for its victims'
        minimum residency, their unloads and its load (the last measured one, else the profile's,
        else from its size); None when it can never be (larger than the budget). Variants that
        are generating now are not held against it: that wait is the queue's, and `ensure`
        waits for them."""
        plan = self.residency.plan(variant_id, self._clock())
        if plan is None:
            return None
        if plan.resident:
            return 0.0
        runner = self.runners[variant_id]
        load_ms = runner.load_ms or profile_load_ms
        if not load_ms:
            load_ms = self.residency.sizes[variant_id] / FALLBACK_LOAD_BYTES_PER_S * 1000
        unload_ms = sum(self.runners[v].unload_ms or 0.0 for v in plan.evict)
        return plan.wait_s * 1000 + unload_ms + load_ms

    async def ensure(self, runner: LlamaRunner) -> None:
        """Make `runner` resident (called before its request joins the loop). The swap itself is
        shielded: a client leaving mid-load must not leave the books and the runners apart."""
        variant_id = runner.variant_id
        if runner.loaded and self.residency.is_resident(variant_id) and variant_id not in self._leaving:
            self.residency.used(variant_id, self._clock())
            return
        async with self._lock:
            while True:
                plan = self.residency.plan(variant_id, self._clock(), self._busy())
                if plan is None:
                    if not self.residency.fits_alone(variant_id):
                        raise GenerationFailedError(f"{variant_id}: {self.unavailable_reason(variant_id)}")
                    # The memory is held by variants with requests in the loop; wait them out.
                    await asyncio.sleep(BUSY_POLL_S)
                    continue
                if plan.wait_s > 0:
                    await asyncio.sleep(plan.wait_s)  # minimum residency of the victims
                    continue
                break
            self._leaving.update(plan.evict)  # now, before the swap task gets to run
            await asyncio.shield(self._swap(plan))
            self.residency.used(variant_id, self._clock())

    async def _swap(self, plan: SwapPlan) -> None:
        try:
            for victim in plan.evict:
                await self.runners[victim].unload()
                self.residency.unloaded(victim)
                self.evictions += 1
        finally:
            self._leaving.difference_update(plan.evict)
        if plan.resident:
            return
        runner = self.runners[plan.variant_id]
        await runner.load()
        self.residency.loaded(plan.variant_id, self._clock())
        self.loads += 1
        log.info("variant_swapped", variant=plan.variant_id, evicted=list(plan.evict),
                 load_ms=round(runner.load_ms or 0.0, 1),
                 resident=self.residency.resident_ids, used=format_bytes(self.residency.used_bytes),
                 budget=format_bytes(self.residency.budget_bytes or 0))

    async def load_one_by_one(self, order: Iterable[str], visit: Callable[[LlamaRunner], Awaitable[None]],
                              keep: Iterable[str]) -> None:
        """Start-up when not every variant fits: load each variant in turn (evicting the least
        recently used; minimum residency does not apply yet), `visit` it (calibration), and end
        with the `keep` variants (the families' defaults) resident."""
        for variant_id in order:
            await self._make_room_and_load(variant_id)
            await visit(self.runners[variant_id])
        for variant_id in keep:
            await self._make_room_and_load(variant_id)

    async def _make_room_and_load(self, variant_id: str) -> None:
        residency = self.residency
        plan = residency.plan(variant_id, self._clock(), self._busy(), min_residency=False)
        if plan is None:
            raise ModelPreparationError(
                f"{variant_id} needs {format_bytes(residency.sizes[variant_id])}, more than the memory "
                f"budget of {format_bytes(residency.budget_bytes or 0)}: raise --memory-budget or drop it")
        async with self._lock:
            self._leaving.update(plan.evict)
            await self._swap(plan)


async def load_and_cost(registry: ModelRegistry, residency: ResidencyManager | None, cache_dir: Path,
                        plan: CalibrationPlan, on_loaded: Callable[[LlamaRunner], None],
                        progress: Callable[[str], None]) -> dict[str, CostProfile]:
    """Start-up: load every local variant and find (or measure) its cost profile. When they all
    fit the budget, load them all and keep them; otherwise one after another (load, calibrate
    if needed, unload) ending with each family's default resident. The second way skips
    `ensure_profiles`' cross-check of siblings (it needs all of them at hand)."""
    runners = list(registry.runners.values())
    if residency is None or residency.fits_all:
        await registry.load_all(on_loaded)
        if residency is not None:
            residency.adopt_loaded()
        return await ensure_profiles(runners, cache_dir, plan, progress)
    profiles: dict[str, CostProfile] = {}

    async def visit(runner: LlamaRunner) -> None:
        on_loaded(runner)
        profiles.update(await ensure_profiles([runner], cache_dir, plan, progress))

    defaults = [str(VariantId(f.name, f.default.name)) for f in registry.models.families]
    await residency.load_one_by_one(registry.runners, visit, [d for d in defaults if d in registry.runners])
    return profiles
