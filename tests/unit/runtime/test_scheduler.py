"""edgeserve/runtime/scheduler.py with a fake runner: slots, earliest deadline first, the queue's
limits, refusal at dispatch, and the wait and slack estimates admission reads."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from edgeserve.errors import RefusedError, ShuttingDownError
from edgeserve.runtime.runner import Generation, GenerationJob
from edgeserve.runtime.scheduler import Scheduler


class FakeRunner:
    """Jobs 'run' until the test ends them with `finish`."""

    def __init__(self) -> None:
        self.submitted: list[GenerationJob] = []
        self._done: dict[int, Callable[[], object]] = {}

    def submit(self, job: GenerationJob, on_done: Callable[[], object] | None = None) -> Generation:
        self.submitted.append(job)
        if on_done is not None:
            self._done[id(job)] = on_done
        return Generation(asyncio.get_running_loop())

    def finish(self, job: GenerationJob) -> None:
        self._done.pop(id(job))()


def job(deadline_in_s: float | None = None, tokens: int = 8) -> GenerationJob:
    deadline_at = None if deadline_in_s is None else time.perf_counter() + deadline_in_s
    return GenerationJob([1, 2, 3], tokens, deadline_at=deadline_at)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def start(scheduler: Scheduler, runner: FakeRunner, work: GenerationJob, predicted_ms: float = 100.0,
          min_run_ms: float = 0.0, **kwargs: Any) -> asyncio.Task[tuple[Generation, float]]:
    return asyncio.create_task(scheduler.start(runner, work, predicted_ms, min_run_ms, **kwargs))  # type: ignore[arg-type]


async def test_the_first_request_starts_at_once_and_the_next_waits_for_the_slot() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    first, second = job(), job()
    one = start(scheduler, runner, first)
    await settle()
    assert one.done() and runner.submitted == [first] and scheduler.running == 1
    two = start(scheduler, runner, second)
    await settle()
    assert not two.done() and scheduler.queue_depth == 1
    runner.finish(first)
    _, queue_ms = await two
    assert runner.submitted == [first, second] and queue_ms >= 0 and scheduler.queue_depth == 0


async def test_waiting_requests_are_served_earliest_deadline_first_and_those_without_one_last() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    running = job()
    start(scheduler, runner, running)
    await settle()
    late, none, soon = job(60.0), job(None), job(10.0)
    tasks = [start(scheduler, runner, j) for j in (late, none, soon)]
    await settle()
    for expected in (soon, late, none):
        runner.finish(runner.submitted[-1])
        await settle()
        assert runner.submitted[-1] is expected
    runner.finish(none)
    await asyncio.gather(*tasks)
    assert scheduler.running == 0


async def test_a_full_queue_refuses_with_queue_full() -> None:
    scheduler, runner = Scheduler(1, max_queue=1), FakeRunner()
    start(scheduler, runner, job())
    waiting = start(scheduler, runner, job())
    await settle()
    with pytest.raises(RefusedError) as refused:
        await scheduler.start(runner, job(), 100.0)  # type: ignore[arg-type]
    assert refused.value.code == "queue_full"
    waiting.cancel()


async def test_a_queued_request_whose_deadline_can_no_longer_fit_is_refused_at_dispatch() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    first = job()
    start(scheduler, runner, first)
    doomed = start(scheduler, runner, job(0.05), min_run_ms=40.0)
    await asyncio.sleep(0.03)  # 20 ms left, 40 needed
    runner.finish(first)
    with pytest.raises(RefusedError) as refused:
        await doomed
    assert refused.value.code == "deadline_infeasible"
    assert scheduler.running == 0 and scheduler.queue_depth == 0


async def test_a_client_that_leaves_while_queued_leaves_the_queue() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    first = job()
    start(scheduler, runner, first)
    waiting = start(scheduler, runner, job())
    await settle()
    waiting.cancel()
    await settle()
    assert scheduler.queue_depth == 0
    runner.finish(first)
    await settle()
    assert scheduler.running == 0 and len(runner.submitted) == 1


async def test_a_stop_refuses_what_still_waits() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    start(scheduler, runner, job())
    waiting = start(scheduler, runner, job())
    await settle()
    scheduler.refuse_waiting(ShuttingDownError())
    with pytest.raises(ShuttingDownError):
        await waiting


async def test_prepare_runs_inside_the_slot_and_a_failure_gives_the_slot_back() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    order: list[str] = []

    async def prepare() -> None:
        order.append("prepare")

    async def broken() -> None:
        raise OSError("the disk went away")

    await scheduler.start(runner, job(), 100.0, prepare=prepare)  # type: ignore[arg-type]
    assert order == ["prepare"] and scheduler.running == 1
    runner.finish(runner.submitted[0])
    await settle()
    with pytest.raises(OSError):
        await scheduler.start(runner, job(), 100.0, prepare=broken)  # type: ignore[arg-type]
    assert scheduler.running == 0
    await scheduler.start(runner, job(), 100.0)  # type: ignore[arg-type]  # the slot is free again


async def test_two_slots_run_two_at_once() -> None:
    scheduler, runner = Scheduler(2), FakeRunner()
    a, b = start(scheduler, runner, job()), start(scheduler, runner, job())
    await settle()
    assert a.done() and b.done() and scheduler.running == 2


async def test_the_wait_estimate_counts_what_runs_and_what_is_served_first() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    assert scheduler.wait_estimate_ms(None) == 0.0
    start(scheduler, runner, job(), predicted_ms=1000.0)
    start(scheduler, runner, job(5.0), predicted_ms=300.0)
    start(scheduler, runner, job(None), predicted_ms=500.0)
    await settle()
    soon = time.perf_counter() + 1.0  # served before both queued requests
    assert scheduler.wait_estimate_ms(soon) == pytest.approx(1000.0, abs=20)
    assert scheduler.wait_estimate_ms(time.perf_counter() + 10.0) == pytest.approx(1300.0, abs=20)
    assert scheduler.wait_estimate_ms(None) == pytest.approx(1800.0, abs=20)


async def test_slack_is_what_a_newcomer_may_take_without_making_a_queued_request_miss() -> None:
    scheduler, runner = Scheduler(1), FakeRunner()
    assert scheduler.slack_ms(time.perf_counter() + 1.0) is None  # nothing queued behind it
    start(scheduler, runner, job(), predicted_ms=1000.0)
    start(scheduler, runner, job(3.0), predicted_ms=500.0)  # must finish within 3 s: 1.5 s to spare
    await settle()
    assert scheduler.slack_ms(None) is None  # no deadline: it queues behind everything
    slack = scheduler.slack_ms(time.perf_counter() + 1.0)
    assert slack is not None and slack == pytest.approx(1500.0, abs=20)
    assert scheduler.slack_ms(time.perf_counter() + 5.0) is None  # it would be served after it
    assert math.isfinite(slack)
