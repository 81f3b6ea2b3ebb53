"""edgeserve/runtime/runner.py, registry.py and the stepping loop (stepper.py) on the real SmolLM2
variants. Concurrent requests in one batch, chunked prefill and prefix reuse: test_batching.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest

from edgeserve.config import ModelsFile
from edgeserve.errors import ContextLengthExceededError, ModelNotFoundError, NotReadyError, RefusedError
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, GenerationResult, SamplingParams
from edgeserve.runtime.stepper import Stepper, StepStats

pytestmark = pytest.mark.integration

FAMILY = "smollm2-135m"
VARIANTS = [f"{FAMILY}:q2_k", f"{FAMILY}:q4_1", f"{FAMILY}:q8_0"]
GREEDY = SamplingParams(temperature=0.0)
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a dragon who lives in a library."


@pytest.fixture(scope="module")
async def registry(
    models_file: ModelsFile, prepared: dict[str, PreparedVariant]
) -> AsyncIterator[ModelRegistry]:
    """Every variant loaded once for this module."""
    registry = ModelRegistry(models_file, prepared)
    await registry.load_all()
    yield registry
    registry.close()


@pytest.fixture(scope="module")
async def one_place(models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> AsyncIterator[LlamaRunner]:
    """q2_k alone in a loop of its own with one place (`parallel = 1`): requests wait their turn."""
    configured = models_file.families[0].variant("q2_k")
    assert configured is not None
    config = msgspec.structs.replace(configured, parallel=1)
    stepper = Stepper()
    runner = LlamaRunner(f"{FAMILY}:q2_k", prepared[f"{FAMILY}:q2_k"].path, config, stepper)
    await runner.load()
    yield runner
    stepper.close()
    runner.close()


def chat_job(runner: LlamaRunner, content: str, max_tokens: int,
             sampling: SamplingParams = GREEDY, stop: tuple[str, ...] = ()) -> GenerationJob:
    prompt = runner.render_chat([{"role": "user", "content": content}])
    return GenerationJob(runner.tokenize(prompt, chat=True), max_tokens, sampling, stop)


@dataclass
class Outcome:
    text: str
    result: GenerationResult
    queue_ms: float
    started: float  # perf_counter when it had taken its place in the variant's batch
    ended: float  # perf_counter when the last piece and the result had arrived


async def run(runner: LlamaRunner, job: GenerationJob) -> Outcome:
    generation = runner.submit(job)
    queue_ms = await generation.joined
    started = time.perf_counter()
    text = await generation.text()
    ended = time.perf_counter()
    assert generation.result is not None
    return Outcome(text, generation.result, queue_ms, started, ended)


async def run_again(runner: LlamaRunner, job: GenerationJob) -> Outcome:
    """Run `job` twice and return the second outcome, to compare with later runs of `job`.

    A place of the loop keeps its KV after its sequence leaves, and a newcomer whose prompt
    starts like it keeps that prefix: a prompt that was run before is not prefilled again, only
    its last token is decoded again, alone. With the Q2_K file that single-token path gives
    logits up to ~0.6 apart from the batched prefill (its q4_0 fallback tensors use different
    CPU kernels), so greedy text can differ between a first and a repeated request. Every run
    after the first takes the same path.
    """
    await run(runner, job)
    return await run(runner, job)


async def settled(runner: LlamaRunner) -> None:
    """Wait until the loop has nothing of `runner`'s left, running or waiting (a sequence leaves
    its place before its result is handed out; a waiting request whose client left is dropped
    at the loop's next iteration)."""
    for _ in range(400):
        if not runner.stepper.busy(runner.variant_id):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{runner.variant_id} still has requests in the loop")


# ---- loading and prompts -----------------------------------------------------------------------


def test_all_variants_loaded(registry: ModelRegistry) -> None:
    assert registry.ready
    assert registry.loading_status() == "3/3 variants loaded"
    assert sorted(registry.runners) == VARIANTS
    for variant_id in VARIANTS:
        runner = registry.runner(variant_id)
        assert runner.loaded
        assert runner.load_ms is not None and runner.load_ms > 0
        assert runner.n_ctx == 2048
    sizes = [registry.runner(v).file_bytes for v in VARIANTS]
    assert sizes == sorted(sizes)


def test_render_chat_uses_the_chat_template(registry: ModelRegistry) -> None:
    runner = registry.runner(f"{FAMILY}:q4_1")
    text = runner.render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_render_chat_without_system_message(registry: ModelRegistry) -> None:
    text = registry.runner(f"{FAMILY}:q2_k").render_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.index("<|im_start|>user") > 0  # SmolLM2's template adds its default system turn


def test_special_tokens_only_in_chat_prompts(registry: ModelRegistry) -> None:
    """A chat prompt's <|im_start|> is one special token; in a raw prompt it is plain text."""
    runner = registry.runner(f"{FAMILY}:q4_1")
    assert len(runner.tokenize("<|im_start|>", chat=True)) == 1
    assert len(runner.tokenize("<|im_start|>", chat=False)) > 1


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant_id", VARIANTS)
async def test_each_variant_generates(
    registry: ModelRegistry, variant_id: str
) -> None:
    runner = registry.runner(variant_id)
    job = chat_job(runner, QUESTION, max_tokens=8)
    outcome = await run(runner, job)
    result = outcome.result
    assert outcome.text.strip(), "some text came out"
    assert result.finish in ("length", "stop")
    assert 1 <= result.predicted_n <= 8
    if result.finish == "length":
        assert result.predicted_n == 8
    assert result.prompt_n == len(job.prompt_tokens)
    assert result.prompt_ms > 0
    assert result.predicted_ms > 0
    assert all(ms > 0 for ms in result.token_ms)
    assert result.predicted_ms == pytest.approx(sum(result.token_ms))


@pytest.mark.parametrize("variant_id", VARIANTS)
async def test_greedy_is_repeatable(
    registry: ModelRegistry, variant_id: str
) -> None:
    runner = registry.runner(variant_id)
    job = chat_job(runner, STORY, max_tokens=12)
    first = await run_again(runner, job)
    again = await run(runner, job)
    assert again.text == first.text
    assert again.result.predicted_n == first.result.predicted_n


async def test_same_seed_same_text(registry: ModelRegistry) -> None:
    runner = registry.runner(f"{FAMILY}:q4_1")

    async def sample(seed: int) -> str:
        sampling = SamplingParams(temperature=0.8, seed=seed)
        return (await run(runner, chat_job(runner, STORY, 12, sampling))).text

    await sample(99)  # the prompt is now cached: every later run takes the same path
    first = await sample(1234)
    assert first
    assert await sample(1234) == first
    # and the seed is really used: other seeds do not all give the same text
    others = {await sample(seed) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


async def test_stop_string_stops_and_never_appears(
    registry: ModelRegistry
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    free = await run_again(runner, chat_job(runner, STORY, 24))
    assert free.result.predicted_n > 8, f"need a longer reference text, got {free.text!r}"
    # a stop that starts mid-text and most likely spans token boundaries
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 5]
    expected = free.text[: free.text.index(stop)]
    stopped = await run(runner, chat_job(runner, STORY, 24, stop=(stop,)))
    assert stopped.result.finish == "stop", (free.text, stop, stopped.text)
    assert stopped.text == expected
    assert stop not in stopped.text
    assert stopped.result.predicted_n < free.result.predicted_n


async def test_stop_string_that_never_occurs_changes_nothing(
    registry: ModelRegistry
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    free = await run_again(runner, chat_job(runner, QUESTION, 8))
    held = await run(runner, chat_job(runner, QUESTION, 8, stop=("@@@never@@@",)))
    assert held.text == free.text
    assert held.result.finish == free.result.finish


async def test_nothing_after_a_stop_even_half_a_character(
    registry: ModelRegistry
) -> None:
    """SmolLM2's byte-level vocabulary has tokens such as b" \\xf0\\x9f" (a space and the
    first half of an emoji). A stop on " " ends the text there: the unfinished character
    after it must not come out as U+FFFD."""
    runner = registry.runner(f"{FAMILY}:q4_1")
    tokens = runner.tokenize(" ".join(["🐉"] * 10), chat=False)
    free = await run_again(runner, GenerationJob(tokens, 4, GREEDY))
    assert free.text.startswith(" 🐉"), free.text
    stopped = await run(runner, GenerationJob(tokens, 4, GREEDY, stop=(" ",)))
    assert stopped.result.finish == "stop"
    assert stopped.text == ""


async def test_cancel_ends_within_one_token_and_runner_recovers(
    registry: ModelRegistry
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    generation = runner.submit(chat_job(runner, STORY, 200))
    await generation.joined
    received_at_cancel = 0
    pieces: list[str] = []
    async for piece in generation:
        pieces.append(piece)
        if received_at_cancel == 0:
            received_at_cancel = len(pieces)
            generation.cancel()
    result = generation.result
    assert result is not None
    assert result.finish == "cancelled"
    # at most the token being decoded when cancel() was called, plus one already queued
    assert result.predicted_n <= received_at_cancel + 2, (result.predicted_n, pieces)
    assert generation.cancelled
    # its place in the batch is free again
    await settled(runner)
    assert runner.stepper.running_in(runner.variant_id) == 0
    after = await run(runner, chat_job(runner, QUESTION, 8))
    assert after.result.finish in ("length", "stop")
    assert after.text.strip()
    assert after.queue_ms < 100


async def test_cancel_before_start_generates_nothing(registry: ModelRegistry) -> None:
    """A job cancelled while it waits for a place (every place of the variant is taken) never
    decodes."""
    runner = registry.runner(f"{FAMILY}:q2_k")
    taking = [runner.submit(chat_job(runner, STORY, 4)) for _ in range(runner.parallel)]
    second = runner.submit(chat_job(runner, STORY, 50))
    second.cancel()
    assert all(await asyncio.gather(*(g.text() for g in taking)))
    assert await second.text() == ""
    assert second.result is not None
    assert second.result.finish == "cancelled"
    assert second.result.predicted_n == 0


# ---- context length ----------------------------------------------------------------------------


def test_check_fits(registry: ModelRegistry) -> None:
    runner = registry.runner(f"{FAMILY}:q8_0")
    runner.check_fits(runner.n_ctx - 1)  # room for exactly one new token
    with pytest.raises(ContextLengthExceededError) as info:
        runner.check_fits(runner.n_ctx)
    assert info.value.n_ctx == runner.n_ctx


def test_prompt_longer_than_n_ctx(registry: ModelRegistry) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    prompt = runner.render_chat([{"role": "user", "content": "hello " * 2100}])
    tokens = runner.tokenize(prompt, chat=True)
    assert len(tokens) > runner.n_ctx
    with pytest.raises(ContextLengthExceededError) as info:
        runner.check_fits(len(tokens))
    error = info.value
    assert (error.prompt_tokens, error.n_ctx) == (len(tokens), 2048)
    assert str(len(tokens)) in error.message
    assert "2048" in error.message
    assert f"{FAMILY}:q2_k" in error.message
    assert error.param == "messages"
    assert error.code == "context_length_exceeded"


# ---- registry ----------------------------------------------------------------------------------


def test_resolve(registry: ModelRegistry) -> None:
    target = registry.resolve(FAMILY)
    assert target.family.name == FAMILY and target.pinned is None
    pinned = registry.resolve(f"{FAMILY}:q2_k")
    assert pinned.pinned is not None and pinned.pinned.name == "q2_k"
    assert str(pinned.variant_id(pinned.pinned)) == f"{FAMILY}:q2_k" and str(pinned.pinned_id) == f"{FAMILY}:q2_k"


@pytest.mark.parametrize("name", ["gpt-4o", f"{FAMILY}:q5_k", "auto2", ":q2_k", f"{FAMILY}:", f"{FAMILY}:q2_k:x"])
def test_unknown_model_is_an_error_not_a_fallback(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(name)
    assert f"'{name}'" in info.value.message
    assert f"{FAMILY}:q8_0" in info.value.message


def test_not_ready_before_loading(
    models_file: ModelsFile, prepared: dict[str, PreparedVariant]
) -> None:
    cold = ModelRegistry(models_file, prepared)
    try:
        assert not cold.ready
        assert cold.loading_status() == "0/3 variants loaded"
        with pytest.raises(NotReadyError):
            cold.runner(f"{FAMILY}:q2_k")
    finally:
        cold.close()


# ---- the stepping loop ------------------------------------------------------------------------


async def test_the_loop_runs_one_variants_batch_per_step(registry: ModelRegistry) -> None:
    """Each variant has places of its own in the one loop: a request of q8_0 takes its place
    while one of q2_k runs (no slot to wait for), every step decodes one variant's batch, and
    both complete, each with its own text."""
    q2, q8 = registry.runner(f"{FAMILY}:q2_k"), registry.runner(f"{FAMILY}:q8_0")
    q2_job = GenerationJob(chat_job(q2, STORY, 1).prompt_tokens, 48, GREEDY, ignore_eos=True)
    q8_job = chat_job(q8, "Name three colors.", 8)
    alone_q2 = await run_again(q2, q2_job)
    alone_q8 = await run_again(q8, q8_job)
    assert alone_q2.text != alone_q8.text
    await settled(q2)
    await settled(q8)
    stepper = registry.stepper
    steps_before = {r.variant_id: _stats(stepper, r.variant_id).steps for r in (q2, q8)}

    first = q2.submit(q2_job)
    await first.joined
    second = q8.submit(q8_job)
    await second.joined  # within a step: q2_k's 48 tokens are far from done
    assert stepper.running_in(q2.variant_id) == 1 and stepper.running_in(q8.variant_id) == 1
    assert stepper.running == 2 and stepper.queue_depth == 0
    a, b = await asyncio.gather(first.text(), second.text())

    assert a == alone_q2.text
    assert b == alone_q8.text
    assert first.result is not None and second.result is not None
    # neither request ever shared a step with the other: each step was one variant's batch
    assert first.result.mean_batch == 1.0 and second.result.mean_batch == 1.0
    for runner, generation in ((q2, first), (q8, second)):
        stepped = _stats(stepper, runner.variant_id).steps - steps_before[runner.variant_id]
        assert generation.result is not None and stepped >= generation.result.predicted_n
    await settled(q2)
    await settled(q8)
    assert stepper.running == 0 and stepper.queue_depth == 0


def _stats(stepper: Stepper, variant_id: str) -> StepStats:
    stats = stepper.stats(variant_id)
    assert stats is not None
    return stats


def counting_job(runner: LlamaRunner, tokens: int, deadline_in_s: float | None = None) -> GenerationJob:
    prompt = runner.tokenize(runner.render_chat([{"role": "user", "content": "Count to fifty."}]), chat=True)
    deadline = None if deadline_in_s is None else time.perf_counter() + deadline_in_s
    return GenerationJob(prompt, tokens, GREEDY, ignore_eos=True, deadline_at=deadline)


async def test_waiting_requests_take_the_place_earliest_deadline_first(one_place: LlamaRunner) -> None:
    runner = one_place
    first = runner.submit(counting_job(runner, 24))
    await first.joined
    started: list[str] = []

    async def queued(name: str, deadline_in_s: float | None) -> None:
        generation = runner.submit(counting_job(runner, 2, deadline_in_s))
        await generation.joined
        started.append(name)
        await generation.text()

    # Arrival order: no deadline, loose, tight. Service order must be tight, loose, none.
    tasks = [asyncio.create_task(queued("none", None))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(queued("loose", 120)))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(queued("tight", 60)))
    await asyncio.sleep(0.01)
    assert runner.stepper.queue_depth == 3
    await first.text()
    await asyncio.gather(*tasks)
    assert started == ["tight", "loose", "none"]


async def test_a_full_queue_refuses_at_once(one_place: LlamaRunner) -> None:
    runner = one_place
    runner.stepper.max_queue = 1
    try:
        running = runner.submit(counting_job(runner, 16))
        await running.joined
        waiting = runner.submit(counting_job(runner, 2))
        with pytest.raises(RefusedError) as refused:
            runner.submit(counting_job(runner, 2))
        assert refused.value.code == "queue_full"
        await running.text()
        assert await waiting.joined > 0
        await waiting.text()
    finally:
        runner.stepper.max_queue = 64


async def test_a_request_that_leaves_the_queue_frees_its_place(one_place: LlamaRunner) -> None:
    runner = one_place
    running = runner.submit(counting_job(runner, 16))
    await running.joined
    leaving = runner.submit(counting_job(runner, 2))
    assert runner.stepper.queue_depth == 1
    leaving.cancel()
    assert await leaving.text() == ""  # dropped at the loop's next iteration, never started
    assert leaving.result is not None and leaving.result.finish == "cancelled"
    assert runner.stepper.queue_depth == 0
    await running.text()
    generation = runner.submit(counting_job(runner, 2))
    await generation.joined
    await generation.text()
    assert generation.result is not None and generation.result.predicted_n == 2


async def test_a_waiting_request_whose_deadline_can_no_longer_be_met_is_refused_not_started(
        one_place: LlamaRunner) -> None:
    runner = one_place
    running = runner.submit(counting_job(runner, 64))
    await running.joined
    doomed = runner.submit(counting_job(runner, 2, deadline_in_s=0.05), min_run_ms=20)
    patient = runner.submit(counting_job(runner, 2, deadline_in_s=30), min_run_ms=20)
    await running.text()  # 64 tokens take longer than the doomed request's 50 ms
    with pytest.raises(RefusedError) as refused:
        await doomed.joined
    assert refused.value.code == "deadline_infeasible"
    assert "after waiting for a place" in refused.value.message
    await patient.joined  # the place went on to the next one
    await patient.text()
    assert runner.stepper.queue_depth == 0


async def test_the_loop_stops_before_a_token_that_would_overrun_the_deadline(one_place: LlamaRunner) -> None:
    runner = one_place
    generation = runner.submit(counting_job(runner, 1000, deadline_in_s=0.3))
    await generation.joined
    await generation.text()
    assert generation.result is not None
    assert generation.result.finish == "deadline"
    assert generation.result.predicted_n < 1000


def test_the_loop_needs_a_chunk_of_at_least_one_token() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Stepper(chunk_tokens=0)
