"""CPU slots, shared by all variants and handed out earliest-deadline-first.

One generation runs at a time by default: two at once on a 4-core board only make both late.
Requests without a deadline sort after every request with one. A request waits for its slot
instead of interrupting the running generation; the slot is released by the runner's thread
when the job really ends, so a client that goes away cannot leave a slot held.

Two rules keep the deadlines of admitted requests (issue 5: under overload, what is admitted
must finish in time): `slack_ms` tells admission how long a newcomer may run without pushing a
request already queued behind it past its predicted finish, and a queued request whose deadline
can no longer fit its shortest useful run when its turn comes is refused (429) instead of
started late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgeserve.errors import RefusedError
from edgeserve.routing import queue
from edgeserve.runtime.runner import Generation, GenerationJob, LlamaRunner


@dataclass(order=True)
class _Ticket:
    deadline_key: float
    seq: int
    predicted_ms: float = field(compare=False)
    min_run_ms: float = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class Scheduler:
    def __init__(self, slots: int = 1, max_queue: int = 64) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.max_queue = max_queue
        self._free = slots
        self._waiting: list[_Ticket] = []
        self._running: dict[int, tuple[float, float]] = {}  # seq -> (started, predicted_ms)
        self._seq = itertools.count()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def wait_estimate_ms(self, deadline_at: float | None) -> float:
        """Predicted wait for a request with this deadline: what runs now plus what would be
        served before it, spread over the slots (routing.queue, shared with the simulator)."""
        return queue.wait_estimate_ms(*self._model(deadline_at), self.slots, self._free)

    def slack_ms(self, deadline_at: float | None) -> float | None:
        """The longest a newcomer with this deadline may run without making a request already
        queued behind it (a later deadline) miss its predicted finish; None when nothing is
        (routing.queue, shared with the simulator)."""
        return queue.slack_ms(*self._model(deadline_at), self.slots)

    def _model(self, deadline_at: float | None
               ) -> tuple[float, float | None, list[tuple[float, float]], list[tuple[float, float]]]:
        """Now, the deadline, what runs and what waits (in EDF order), in ms of perf_counter."""
        running = [(started * 1000, predicted) for started, predicted in self._running.values()]
        waiting = [(t.deadline_key * 1000, t.predicted_ms) for t in sorted(self._waiting)]
        return (time.perf_counter() * 1000, None if deadline_at is None else deadline_at * 1000,
                running, waiting)

    async def start(self, runner: LlamaRunner, job: GenerationJob, predicted_ms: float = 0.0,
                    min_run_ms: float = 0.0,
                    prepare: Callable[[], Awaitable[None]] | None = None) -> tuple[Generation, float]:
        """Wait for a slot (earliest deadline first), then start the job on its runner.
        Returns the generation and the milliseconds spent waiting. ``min_run_ms`` is the job's
        shortest useful run (prefill and a few tokens): if its deadline cannot fit that by the
        time its turn comes, it is refused with 429 rather than started to miss. ``prepare``
        runs inside the slot before the job (loading a variant that is not resident), so the
        load competes for the CPU like a generation and `predicted_ms` (which includes it)
        keeps the wait estimates of later requests honest."""
        queued = time.perf_counter()
        seq = next(self._seq)
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            if len(self._waiting) >= self.max_queue:
                raise RefusedError(
                    f"The queue is full ({self.max_queue} requests waiting); retry shortly.",
                    code="queue_full", retry_after_s=math.ceil(self.wait_estimate_ms(None) / 1000))
            ticket = _Ticket(math.inf if job.deadline_at is None else job.deadline_at, seq,
                             predicted_ms, min_run_ms, asyncio.get_running_loop().create_future())
            heapq.heappush(self._waiting, ticket)
            try:
                await ticket.granted
            except asyncio.CancelledError:
                if ticket.granted.done() and not ticket.granted.cancelled():
                    self._release(None)  # the slot was handed over just as we left: pass it on
                else:
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                raise
        queue_ms = (time.perf_counter() - queued) * 1000
        self._running[seq] = (time.perf_counter(), predicted_ms)
        loop = asyncio.get_running_loop()
        try:
            if prepare is not None:
                await prepare()
            generation = runner.submit(job, on_done=lambda: loop.call_soon_threadsafe(self._release, seq))
        except BaseException:
            self._release(seq)
            raise
        return generation, queue_ms

    def refuse_waiting(self, error: Exception) -> None:
        """Every request still waiting for a slot gets this error instead (a stop)."""
        waiting, self._waiting = self._waiting, []
        for ticket in waiting:
            if not ticket.granted.done():
                ticket.granted.set_exception(error)

    def _release(self, seq: int | None) -> None:
        if seq is not None:
            self._running.pop(seq, None)
        now = time.perf_counter()
        while self._waiting:
            ticket = heapq.heappop(self._waiting)
            if ticket.granted.done():
                continue  # its client left
            late_ms = (now - ticket.deadline_key) * 1000 + ticket.min_run_ms
            if late_ms > 0:
                ticket.granted.set_exception(RefusedError(
                    f"Cannot answer within the deadline: after waiting in the queue, the "
                    f"{(ticket.deadline_key - now) * 1000:.0f} ms left are less than the "
                    f"{ticket.min_run_ms:.0f} ms the shortest useful answer needs; retry with a "
                    "longer deadline.",
                    code="deadline_infeasible", retry_after_s=1))
                continue
            ticket.granted.set_result(None)
            return
        self._free += 1
