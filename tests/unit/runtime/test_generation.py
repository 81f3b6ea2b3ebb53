"""edgeserve/runtime/generation.py: the hand-off from the stepping loop's thread to the event loop."""

from __future__ import annotations

import asyncio
import threading

from edgeserve.runtime.generation import Generation, batched_handoffs
from edgeserve.runtime.sequence import GenerationResult


def produce(generations: list[Generation], wakeups: list[int], loop: asyncio.AbstractEventLoop) -> None:
    """On another thread, as the stepping loop does: text for every generation, then the ends,
    all within one batched hand-off; counts how often the event loop is woken."""
    original = loop.call_soon_threadsafe

    def counting(*args: object) -> object:
        wakeups.append(1)
        return original(*args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    try:
        with batched_handoffs():
            for i, generation in enumerate(generations):
                generation._emit_joined(0.5)
                generation._emit_text(f"a{i}")
                generation._emit_text(f"b{i}")
                generation._emit_end(GenerationResult("stop", 3, 1.0, 2, 2.0))
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]


async def test_a_batched_hand_off_wakes_the_event_loop_once_and_keeps_every_generations_order() -> None:
    loop = asyncio.get_running_loop()
    generations = [Generation(loop, flush_interval_s=0.0) for _ in range(4)]
    wakeups: list[int] = []
    thread = threading.Thread(target=produce, args=(generations, wakeups, loop))
    thread.start()
    thread.join()
    texts = await asyncio.gather(*(g.text() for g in generations))
    assert texts == [f"a{i}b{i}" for i in range(4)]
    assert all(g.joined.done() and g.joined.result() == 0.5 for g in generations)
    assert all(g.result is not None and g.result.finish == "stop" for g in generations)
    assert len(wakeups) == 1


async def test_without_a_batch_each_hand_off_goes_at_once() -> None:
    loop = asyncio.get_running_loop()
    generation = Generation(loop, flush_interval_s=0.0)

    def produce_one() -> None:
        generation._emit_text("x")
        generation._emit_end(GenerationResult("stop", 1, 1.0, 1, 1.0))

    thread = threading.Thread(target=produce_one)
    thread.start()
    thread.join()
    assert await generation.text() == "x"
