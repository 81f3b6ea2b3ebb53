"""Earliest-deadline-first slots, the wait estimate and the bounded queue, on a real variant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from edgeserve.config import ModelsFile
from edgeserve.errors import RefusedError
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.runner import GenerationJob, LlamaRunner, SamplingParams
from edgeserve.runtime.scheduler import Scheduler

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
async def runner(models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> AsyncIterator[LlamaRunner]:
    registry = ModelRegistry(models_file, prepared)
    runner = registry.runners["smollm2-135m:q2_k"]
    await runner.load()
    yield runner
    registry.close()


def job(runner: LlamaRunner, tokens: int, deadline_in_s: float | None = None) -> GenerationJob:
    prompt = runner.tokenize(runner.render_chat([{"role": "user", "content": "Count to fifty."}]), chat=True)
    deadline = None if deadline_in_s is None else time.perf_counter() + deadline_in_s
    return GenerationJob(prompt, tokens, GREEDY, ignore_eos=True, deadline_at=deadline)


async def test_waiting_requests_start_earliest_deadline_first(runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1)
    first, _ = await scheduler.start(runner, job(runner, 24), predicted_ms=500)
    started: list[str] = []

    async def queued(name: str, deadline_in_s: float | None) -> None:
        generation, _ = await scheduler.start(runner, job(runner, 2, deadline_in_s), predicted_ms=50)
        started.append(name)
        await generation.text()

    # Arrival order: no deadline, loose, tight. Service order must be tight, loose, none.
    tasks = [asyncio.create_task(queued("none", None))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(queued("loose", 600)))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(queued("tight", 300)))
    await asyncio.sleep(0.01)
    assert scheduler.queue_depth == 3
    # A newcomer due before everyone queued waits only for what runs now (at most its 500 ms
    # prediction); one without a deadline also waits for the three queued (3 x 50 ms).
    urgent = scheduler.wait_estimate_ms(time.perf_counter() + 1)
    assert 0 < urgent <= 500
    assert scheduler.wait_estimate_ms(None) == pytest.approx(urgent + 150, abs=5)
    await first.text()
    await asyncio.gather(*tasks)
    assert started == ["tight", "loose", "none"]


async def test_a_full_queue_refuses_at_once(runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1, max_queue=1)
    running, _ = await scheduler.start(runner, job(runner, 16), predicted_ms=300)
    waiting = asyncio.create_task(scheduler.start(runner, job(runner, 2), predicted_ms=20))
    await asyncio.sleep(0.01)
    with pytest.raises(RefusedError) as refused:
        await scheduler.start(runner, job(runner, 2), predicted_ms=20)
    assert refused.value.code == "queue_full"
    await running.text()
    generation, queue_ms = await waiting
    await generation.text()
    assert queue_ms > 0


async def test_a_request_that_leaves_the_queue_frees_its_place(runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1)
    running, _ = await scheduler.start(runner, job(runner, 16), predicted_ms=300)
    leaving = asyncio.create_task(scheduler.start(runner, job(runner, 2), predicted_ms=20))
    await asyncio.sleep(0.01)
    assert scheduler.queue_depth == 1
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert scheduler.queue_depth == 0
    await running.text()
    generation, _ = await scheduler.start(runner, job(runner, 2), predicted_ms=20)
    await generation.text()


async def test_slack_is_what_a_newcomer_may_take_without_making_queued_requests_miss(
        runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1)
    running, _ = await scheduler.start(runner, job(runner, 24), predicted_ms=300)
    queued = asyncio.create_task(scheduler.start(runner, job(runner, 2, deadline_in_s=1.0), predicted_ms=200))
    await asyncio.sleep(0.01)
    now = time.perf_counter()
    # Due before the queued one (1 s): it may take what the queued one can spare, 1000 - 300 - 200.
    slack = scheduler.slack_ms(now + 0.5)
    assert slack is not None and 450 < slack <= 520  # less the ms that passed: the 300 shrink too
    assert scheduler.slack_ms(now + 2.0) is None  # it would queue behind: nobody to protect
    assert scheduler.slack_ms(None) is None
    await running.text()
    generation, _ = await queued
    await generation.text()


async def test_a_queued_request_whose_deadline_can_no_longer_be_met_is_refused_not_started(
        runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1)
    running, _ = await scheduler.start(runner, job(runner, 24), predicted_ms=300)
    doomed = asyncio.create_task(scheduler.start(runner, job(runner, 2, deadline_in_s=0.05), predicted_ms=20,
                                                 min_run_ms=20))
    patient = asyncio.create_task(scheduler.start(runner, job(runner, 2, deadline_in_s=30), predicted_ms=20,
                                                  min_run_ms=20))
    await running.text()  # 24 tokens take longer than the doomed request's 50 ms
    with pytest.raises(RefusedError) as refused:
        await doomed
    assert refused.value.code == "deadline_infeasible"
    assert "after waiting in the queue" in refused.value.message
    generation, _ = await patient  # the slot went on to the next one
    await generation.text()
    assert scheduler.queue_depth == 0


async def test_the_runner_stops_before_a_token_that_would_overrun_the_deadline(runner: LlamaRunner) -> None:
    scheduler = Scheduler(slots=1)
    generation, _ = await scheduler.start(runner, job(runner, 1000, deadline_in_s=0.3))
    await generation.text()
    assert generation.result is not None
    assert generation.result.finish == "deadline"
    assert generation.result.predicted_n < 1000
