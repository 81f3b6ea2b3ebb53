"""CPU slots: how many generations run at once across all variants (one by default).

A request waits for a slot in arrival order instead of interrupting the running generation;
two generations at once on a 4-core board only make both late.
"""

from __future__ import annotations

import asyncio
import time

from edgeserve.runtime.runner import Generation, GenerationJob, LlamaRunner


class Scheduler:
    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._free = asyncio.Semaphore(slots)
        self._waiting = 0
        self._running = 0

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    async def start(self, runner: LlamaRunner, job: GenerationJob) -> tuple[Generation, float]:
        """Wait for a slot, then start the job; returns the generation and the ms spent waiting.

        The slot is released by the runner's thread when the job really ends, so a client that
        goes away cannot leave a slot held or a second generation running beside the first.
        """
        queued = time.perf_counter()
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1
        queue_ms = (time.perf_counter() - queued) * 1000
        loop = asyncio.get_running_loop()
        self._running += 1
        try:
            generation = runner.submit(job, on_done=lambda: loop.call_soon_threadsafe(self._release))
        except BaseException:
            self._release()
            raise
        return generation, queue_ms

    def _release(self) -> None:
        self._running -= 1
        self._free.release()
