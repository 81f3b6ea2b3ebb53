"""edgeserve/runtime/loader.py and the runner's unload on the real SmolLM2 variants: a budget
that holds one variant swaps them before a request joins the stepping loop (as
LocalVariant.start does), never evicts one that is generating, and a variant that is not
resident still tokenizes (its vocabulary stays loaded)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edgeserve.config import ModelsFile
from edgeserve.errors import NotReadyError
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.memory import resident_bytes
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.sequence import GenerationJob, SamplingParams

pytestmark = pytest.mark.integration

FAMILY = "smollm2-135m"
Q2, Q4, Q8 = f"{FAMILY}:q2_k", f"{FAMILY}:q4_1", f"{FAMILY}:q8_0"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
async def registry(models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry(models_file, prepared)
    yield registry
    registry.close()


def one_variant_budget(registry: ModelRegistry) -> int:
    """Holds the largest variant alone and no two of them."""
    sizes = sorted(resident_bytes(r.path, r.config.n_ctx * r.config.parallel) for r in registry.runners.values())
    assert sizes[-1] < sizes[0] + sizes[1]
    return sizes[-1] + 1


def job(registry: ModelRegistry, variant_id: str, max_tokens: int = 4) -> GenerationJob:
    runner = registry.runners[variant_id]
    prompt = runner.render_chat([{"role": "user", "content": "Say hi."}])
    return GenerationJob(runner.tokenize(prompt, chat=True), max_tokens, GREEDY, ignore_eos=True)


async def test_an_unloaded_variant_still_tokenizes_and_loads_again(registry: ModelRegistry) -> None:
    runner = registry.runners[Q2]
    await runner.load()
    loaded_tokens = runner.tokenize("<|im_start|>user\nHello<|im_end|>", chat=True)
    await runner.unload()
    assert not runner.loaded and runner.usable
    assert runner.tokenize("<|im_start|>user\nHello<|im_end|>", chat=True) == loaded_tokens
    assert "Say hi." in runner.render_chat([{"role": "user", "content": "Say hi."}])
    with pytest.raises(NotReadyError, match="not loaded"):  # at once: no lane to queue in
        runner.submit(job(registry, Q2))
    await runner.load()
    generation = runner.submit(job(registry, Q2))
    await generation.text()
    assert generation.result is not None and generation.result.predicted_n == 4


async def test_a_budget_for_one_swaps_variants_before_each_request(registry: ModelRegistry) -> None:
    manager = ResidencyManager(registry.runners, one_variant_budget(registry))
    assert not manager.fits_all
    await manager.load_one_by_one(registry.runners, lambda _runner: _noop(), keep=[Q4])
    assert [v for v, r in registry.runners.items() if r.loaded] == [Q4]
    assert manager.residency.resident_ids == [Q4]
    for variant_id in (Q2, Q8, Q2):
        estimate = manager.load_estimate_ms(variant_id)
        assert estimate is not None and estimate > 0  # measured at its start-up load
        runner = registry.runners[variant_id]
        await manager.ensure(runner)  # what LocalVariant.start does before it submits
        generation = runner.submit(job(registry, variant_id))
        await generation.joined
        await generation.text()
        assert generation.result is not None and generation.result.predicted_n == 4
        assert [v for v, r in registry.runners.items() if r.loaded] == [variant_id]
        assert manager.load_estimate_ms(variant_id) == 0.0


async def test_a_generating_variant_is_not_evicted(registry: ModelRegistry) -> None:
    """A swap that needs the memory of a variant with a sequence in the loop waits for its end."""
    manager = ResidencyManager(registry.runners, one_variant_budget(registry))
    await manager.load_one_by_one([Q2], lambda _runner: _noop(), keep=[])
    running = registry.runners[Q2].submit(job(registry, Q2, max_tokens=200))
    swap = asyncio.create_task(manager.ensure(registry.runners[Q8]))
    await asyncio.sleep(0.3)
    assert not swap.done() and registry.runners[Q2].loaded and running.result is None
    await running.text()
    assert running.result is not None and running.result.predicted_n == 200  # ran to its end
    await asyncio.wait_for(swap, timeout=30)
    assert registry.runners[Q8].loaded and not registry.runners[Q2].loaded


def test_a_variant_larger_than_the_budget_is_never_available(registry: ModelRegistry) -> None:
    q4 = registry.runners[Q4]
    manager = ResidencyManager(registry.runners, resident_bytes(q4.path, q4.config.n_ctx * q4.config.parallel))
    assert manager.load_estimate_ms(Q8) is None
    assert "more than the whole memory budget" in (manager.unavailable_reason(Q8) or "")
    assert manager.unavailable_reason(Q2) is None


async def _noop() -> None:
    return None


async def test_a_request_for_a_variant_being_evicted_waits_for_it_to_load_again(
        registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a swap unloads q2_k (in a worker thread) to make room for q8_0, a request for q2_k
    must not slip into q2_k's lane on its way out: it waits for the swap, then q2_k comes back
    once q8_0's request is done. Both requests are served."""
    manager = ResidencyManager(registry.runners, one_variant_budget(registry))
    await manager.load_one_by_one([Q2], lambda _runner: _noop(), keep=[])
    q2, q8 = registry.runners[Q2], registry.runners[Q8]
    unloading = asyncio.Event()
    real_unload = q2.unload

    async def slow_unload() -> None:  # a slow storage: the window in which the race happens
        unloading.set()
        await asyncio.sleep(0.3)
        await real_unload()

    monkeypatch.setattr(q2, "unload", slow_unload)

    async def serve(variant_id: str) -> int:  # what LocalVariant.start does, then the text
        runner = registry.runners[variant_id]
        await manager.ensure(runner)
        generation = runner.submit(job(registry, variant_id))
        await generation.joined
        await generation.text()
        assert generation.result is not None
        return generation.result.predicted_n

    for_q8 = asyncio.create_task(serve(Q8))
    await unloading.wait()
    assert q2.loaded  # still: the unload has not begun yet
    for_q2 = asyncio.create_task(serve(Q2))
    assert list(await asyncio.wait_for(asyncio.gather(for_q8, for_q2), timeout=60)) == [4, 4]
    assert q2.loaded and not q8.loaded
    assert manager.residency.resident_ids == [Q2]
