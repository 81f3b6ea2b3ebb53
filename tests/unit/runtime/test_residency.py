"""The memory budget's rules (issue 7), without models: LRU eviction, busy variants kept, and the
minimum residency that stops alternating requests from thrashing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgeserve.config import VariantConfig
from edgeserve.runtime.loader import FALLBACK_LOAD_BYTES_PER_S, ResidencyManager
from edgeserve.runtime.residency import Residency, SwapPlan
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.stepper import Stepper

SIZES = {"a": 100, "b": 100, "c": 150}


def test_a_budget_that_holds_everything_fits_all() -> None:
    assert Residency(SIZES, 350).fits_all
    assert Residency(SIZES, None).fits_all
    assert not Residency(SIZES, 349).fits_all


def test_a_resident_variant_needs_nothing() -> None:
    residency = Residency(SIZES, 150)
    residency.loaded("a", now=0.0)
    plan = residency.plan("a", now=1.0)
    assert plan == SwapPlan("a", load=False) and plan.resident


def test_loading_into_free_room_evicts_nothing() -> None:
    residency = Residency(SIZES, 250)
    residency.loaded("a", now=0.0)
    assert residency.plan("b", now=1.0) == SwapPlan("b")


def test_the_least_recently_used_variant_goes_first() -> None:
    residency = Residency(SIZES, 200)
    residency.loaded("a", now=0.0)
    residency.loaded("b", now=1.0)
    assert residency.plan("c", now=10.0) == SwapPlan("c", ("a", "b"))
    residency.used("a", now=2.0)  # a is now the most recently used
    residency.unloaded("b")
    residency.loaded("b", now=3.0)
    residency.used("a", now=4.0)
    assert residency.resident_ids == ["b", "a"]
    assert residency.plan("c", now=10.0) == SwapPlan("c", ("b", "a"))
    small = Residency({"a": 100, "b": 100, "d": 50}, 200)
    small.loaded("a", now=0.0)
    small.loaded("b", now=1.0)
    assert small.plan("d", now=10.0) == SwapPlan("d", ("a",))  # only as many as needed


def test_a_generating_variant_is_never_evicted() -> None:
    residency = Residency(SIZES, 200)
    residency.loaded("a", now=0.0)
    residency.loaded("b", now=1.0)
    assert residency.plan("c", now=10.0, busy={"a"}) is None  # b alone does not make room
    small = Residency({"a": 100, "b": 100, "d": 100}, 200)
    small.loaded("a", now=0.0)
    small.loaded("b", now=1.0)
    assert small.plan("d", now=10.0, busy={"a"}) == SwapPlan("d", ("b",))


def test_a_variant_larger_than_the_budget_cannot_be_loaded() -> None:
    residency = Residency(SIZES, 120)
    assert not residency.fits_alone("c")
    assert residency.plan("c", now=0.0) is None


def test_a_just_loaded_victim_is_kept_for_the_minimum_residency() -> None:
    residency = Residency(SIZES, 150, min_residency_s=5.0)
    residency.loaded("a", now=100.0)
    waiting = residency.plan("b", now=101.0)
    assert waiting is not None and waiting.evict == ("a",) and waiting.wait_s == pytest.approx(4.0)
    assert residency.plan("b", now=106.0) == SwapPlan("b", ("a",), wait_s=0.0)
    assert residency.plan("b", now=101.0, min_residency=False) == SwapPlan("b", ("a",), wait_s=0.0)


def test_alternating_requests_swap_at_most_once_per_minimum_residency() -> None:
    """Requests for a and b every 0.5 s: each swap waits out the residency of the last load."""
    residency = Residency({"a": 100, "b": 100}, 150, min_residency_s=3.0)
    now, swaps = 0.0, []
    residency.loaded("a", now)
    for i in range(40):
        now = max(now, i * 0.5)
        wanted = "ab"[i % 2]
        plan = residency.plan(wanted, now)
        assert plan is not None
        if plan.resident:
            continue
        now += plan.wait_s  # the request waits, then swaps
        for victim in plan.evict:
            residency.unloaded(victim)
        residency.loaded(wanted, now)
        swaps.append(now)
    assert len(swaps) >= 2
    assert all(later - earlier >= 3.0 - 1e-9 for earlier, later in itertools.pairwise(swaps))


def test_bad_settings_are_errors() -> None:
    with pytest.raises(ValueError, match="budget"):
        Residency(SIZES, 0)
    with pytest.raises(ValueError, match="residency"):
        Residency(SIZES, 100, min_residency_s=-1)


def _runner(tmp_path: Path, name: str, size: int) -> LlamaRunner:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"\0" * size)
    return LlamaRunner(f"f:{name}", path, VariantConfig(name=name, path=str(path)), Stepper())


def test_the_load_estimate_includes_the_wait_and_the_unloads(tmp_path: Path) -> None:
    """No model is loaded here: the runners only give their files' sizes and measured times."""
    runners = {r.variant_id: r for r in (_runner(tmp_path, "a", 1000), _runner(tmp_path, "b", 1000))}
    clock = [50.0]
    manager = ResidencyManager(runners, budget_bytes=1500, min_residency_s=2.0, clock=lambda: clock[0])
    assert not manager.fits_all
    manager.residency.loaded("f:a", now=50.0)
    runners["f:a"].unload_ms = 10.0
    size_based = manager.residency.sizes["f:b"] / FALLBACK_LOAD_BYTES_PER_S * 1000
    assert manager.load_estimate_ms("f:a") == 0.0
    assert manager.load_estimate_ms("f:b") == pytest.approx(2000 + 10 + size_based)
    clock[0] = 60.0
    assert manager.load_estimate_ms("f:b", profile_load_ms=300.0) == pytest.approx(10 + 300.0)
    runners["f:b"].load_ms = 120.0  # measured at its last load: preferred over the profile's
    assert manager.load_estimate_ms("f:b", profile_load_ms=300.0) == pytest.approx(10 + 120.0)
    assert manager.unavailable_reason("f:b") is None


def test_a_variant_over_the_budget_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    runners = {r.variant_id: r for r in (_runner(tmp_path, "a", 1000), _runner(tmp_path, "big", 5000))}
    manager = ResidencyManager(runners, budget_bytes=2000)
    assert manager.load_estimate_ms("f:big") is None
    assert "more than the whole memory budget" in (manager.unavailable_reason("f:big") or "")
