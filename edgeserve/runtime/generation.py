"""The streaming contract between a runtime and the pipeline: a `Generation`.

Iterate it for text pieces; `result` is set once iteration ends. `joined` resolves (with the ms
spent waiting) when the request's sequence takes its place in a batch, or fails with the
RefusedError of a request whose deadline can no longer fit by then. A producer on another thread
(the stepping loop) reports through the `_emit_*` methods, which hop onto the event loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

from edgeserve.errors import GenerationFailedError
from edgeserve.runtime.sequence import GenerationResult, TokenLogprob

_handoffs = threading.local()


@contextmanager
def batched_handoffs() -> Iterator[None]:
    """Within it, this thread's hand-offs to event loops are held and go out together at the
    end, in order: the stepping loop wakes the event loop once per step, not once per sequence
    (each wake-up is a write to the loop's self-pipe, and a GIL hand-over on the board's few
    cores)."""
    held: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., object], tuple[object, ...]]]] = {}
    _handoffs.held = held
    try:
        yield
    finally:
        _handoffs.held = None
        for loop, calls in held.items():
            loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
    for function, args in calls:
        function(*args)


def _hand_off(loop: asyncio.AbstractEventLoop, function: Callable[..., object], *args: object) -> None:
    held = getattr(_handoffs, "held", None)
    if held is None:
        loop.call_soon_threadsafe(function, *args)
    else:
        held.setdefault(loop, []).append((function, args))


def _resolve(future: asyncio.Future[float], value: float | BaseException) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Generation:
    """A running generation.

    Pieces are handed to the event loop at most once per `flush_interval_s` (the first one at
    once): each hand-off wakes the loop, whose thread then competes with llama.cpp's for the
    board's few cores. 25 ms of batching is invisible to a reader and cuts wake-ups several-fold.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, flush_interval_s: float = 0.025) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | list[TokenLogprob] | GenerationResult | BaseException] = asyncio.Queue()
        self._cancel = threading.Event()
        self._pending: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self.logprobs: list[TokenLogprob] = []  # every one received (the request asked for them)
        self._unread_logprobs = 0  # of which `take_logprobs` has not returned yet
        self._flush_interval_s = flush_interval_s
        self._last_flush = -math.inf
        self.joined: asyncio.Future[float] = loop.create_future()
        self.on_cancel: Callable[[], None] | None = None  # the producer's wake-up (set by it)
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        """Stop at the next step (or leave the queue); safe from any thread, any number of times."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ---- the producer's side (any thread) -----------------------------------------------------

    def _emit_joined(self, queue_ms: float | BaseException) -> None:
        _hand_off(self._loop, _resolve, self.joined, queue_ms)

    def _emit_logprobs(self, logprobs: list[TokenLogprob]) -> None:
        """Sampled tokens' log-probabilities: they go out with the next text (or at the end)."""
        self._pending_logprobs.extend(logprobs)

    def _emit_text(self, piece: str) -> None:
        self._pending.append(piece)
        now = time.perf_counter()
        if now - self._last_flush >= self._flush_interval_s:
            self._flush(now)

    def _emit_end(self, item: GenerationResult | BaseException) -> None:
        """Once: the text still pending, then the outcome."""
        self._flush(time.perf_counter())
        _hand_off(self._loop, self._queue.put_nowait, item)

    def _flush(self, now: float) -> None:
        if self._pending_logprobs:  # before the text they belong to
            logprobs, self._pending_logprobs = self._pending_logprobs, []
            _hand_off(self._loop, self._queue.put_nowait, logprobs)
        if self._pending:
            text, self._pending = "".join(self._pending), []
            _hand_off(self._loop, self._queue.put_nowait, text)
        self._last_flush = now

    # ---- the consumer's side (the event loop) -------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, list):
                self.logprobs.extend(item)
            elif isinstance(item, GenerationResult):
                self.result = item
                return
            else:
                raise GenerationFailedError(f"generation failed: {item}") from item

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities received since the last call (those of the text so far)."""
        new = self.logprobs[self._unread_logprobs:]
        self._unread_logprobs = len(self.logprobs)
        return new
