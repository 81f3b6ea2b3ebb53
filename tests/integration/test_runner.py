"""edgeserve/runtime/runner.py, registry.py and scheduler.py on the real SmolLM2 variants."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from edgeserve.runtime.scheduler import Scheduler

from edgeserve.config import ModelsFile
from edgeserve.errors import ContextLengthExceededError, ModelNotFoundError, NotReadyError
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, GenerationResult, SamplingParams

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
def scheduler() -> Scheduler:
    return Scheduler(slots=1)


def chat_job(runner: LlamaRunner, content: str, max_tokens: int,
             sampling: SamplingParams = GREEDY, stop: tuple[str, ...] = ()) -> GenerationJob:
    prompt = runner.render_chat([{"role": "user", "content": content}])
    return GenerationJob(runner.tokenize(prompt, chat=True), max_tokens, sampling, stop)


@dataclass
class Outcome:
    text: str
    result: GenerationResult
    queue_ms: float
    started: float  # perf_counter when the slot was granted
    ended: float  # perf_counter when the last piece and the result had arrived


async def run(scheduler: Scheduler, runner: LlamaRunner, job: GenerationJob) -> Outcome:
    generation, queue_ms = await scheduler.start(runner, job)
    started = time.perf_counter()
    text = await generation.text()
    ended = time.perf_counter()
    assert generation.result is not None
    return Outcome(text, generation.result, queue_ms, started, ended)


async def run_again(scheduler: Scheduler, runner: LlamaRunner, job: GenerationJob) -> Outcome:
    """Run `job` twice and return the second outcome, to compare with later runs of `job`.

    llama-cpp-python reuses the KV cache of a matching prompt prefix: a prompt that was the
    previous one is not prefilled again, only its last token is decoded again, alone. With
    the Q2_K file that single-token path gives logits up to ~0.6 apart from the batched
    prefill (its q4_0 fallback tensors use different CPU kernels), so greedy text can differ
    between a first and a repeated request. Every run after the first takes the same path.
    """
    await run(scheduler, runner, job)
    return await run(scheduler, runner, job)


async def settled(scheduler: Scheduler) -> None:
    """Wait until the runner threads have handed back every slot.

    A generation's result reaches its reader just before the thread's done-callback releases
    the slot, so `running` can still count a generation whose text is complete.
    """
    for _ in range(200):
        if scheduler.running == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{scheduler.running} slot(s) still held")


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
    registry: ModelRegistry, scheduler: Scheduler, variant_id: str
) -> None:
    runner = registry.runner(variant_id)
    job = chat_job(runner, QUESTION, max_tokens=8)
    outcome = await run(scheduler, runner, job)
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
    registry: ModelRegistry, scheduler: Scheduler, variant_id: str
) -> None:
    runner = registry.runner(variant_id)
    job = chat_job(runner, STORY, max_tokens=12)
    first = await run_again(scheduler, runner, job)
    again = await run(scheduler, runner, job)
    assert again.text == first.text
    assert again.result.predicted_n == first.result.predicted_n


async def test_same_seed_same_text(registry: ModelRegistry, scheduler: Scheduler) -> None:
    runner = registry.runner(f"{FAMILY}:q4_1")

    async def sample(seed: int) -> str:
        sampling = SamplingParams(temperature=0.8, seed=seed)
        return (await run(scheduler, runner, chat_job(runner, STORY, 12, sampling))).text

    await sample(99)  # the prompt is now cached: every later run takes the same path
    first = await sample(1234)
    assert first
    assert await sample(1234) == first
    # and the seed is really used: other seeds do not all give the same text
    others = {await sample(seed) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


async def test_stop_string_stops_and_never_appears(
    registry: ModelRegistry, scheduler: Scheduler
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    free = await run_again(scheduler, runner, chat_job(runner, STORY, 24))
    assert free.result.predicted_n > 8, f"need a longer reference text, got {free.text!r}"
    # a stop that starts mid-text and most likely spans token boundaries
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 5]
    expected = free.text[: free.text.index(stop)]
    stopped = await run(scheduler, runner, chat_job(runner, STORY, 24, stop=(stop,)))
    assert stopped.result.finish == "stop", (free.text, stop, stopped.text)
    assert stopped.text == expected
    assert stop not in stopped.text
    assert stopped.result.predicted_n < free.result.predicted_n


async def test_stop_string_that_never_occurs_changes_nothing(
    registry: ModelRegistry, scheduler: Scheduler
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    free = await run_again(scheduler, runner, chat_job(runner, QUESTION, 8))
    held = await run(scheduler, runner, chat_job(runner, QUESTION, 8, stop=("@@@never@@@",)))
    assert held.text == free.text
    assert held.result.finish == free.result.finish


async def test_nothing_after_a_stop_even_half_a_character(
    registry: ModelRegistry, scheduler: Scheduler
) -> None:
    """SmolLM2's byte-level vocabulary has tokens such as b" \\xf0\\x9f" (a space and the
    first half of an emoji). A stop on " " ends the text there: the unfinished character
    after it must not come out as U+FFFD."""
    runner = registry.runner(f"{FAMILY}:q4_1")
    tokens = runner.tokenize(" ".join(["🐉"] * 10), chat=False)
    free = await run_again(scheduler, runner, GenerationJob(tokens, 4, GREEDY))
    assert free.text.startswith(" 🐉"), free.text
    stopped = await run(scheduler, runner, GenerationJob(tokens, 4, GREEDY, stop=(" ",)))
    assert stopped.result.finish == "stop"
    assert stopped.text == ""


async def test_cancel_ends_within_one_token_and_runner_recovers(
    registry: ModelRegistry, scheduler: Scheduler
) -> None:
    runner = registry.runner(f"{FAMILY}:q2_k")
    generation, _ = await scheduler.start(runner, chat_job(runner, STORY, 200))
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
    # the slot is released by the runner's thread once the job has really ended
    await settled(scheduler)
    after = await run(scheduler, runner, chat_job(runner, QUESTION, 8))
    assert after.result.finish in ("length", "stop")
    assert after.text.strip()
    assert after.queue_ms < 100


async def test_cancel_before_start_generates_nothing(registry: ModelRegistry) -> None:
    """A job cancelled while queued behind another on the same runner never decodes."""
    runner = registry.runner(f"{FAMILY}:q2_k")
    first = runner.submit(chat_job(runner, STORY, 4))
    second = runner.submit(chat_job(runner, STORY, 50))
    second.cancel()
    assert await first.text()
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


# ---- scheduler ---------------------------------------------------------------------------------


async def test_one_slot_serializes_generations_on_different_variants(
    registry: ModelRegistry, scheduler: Scheduler
) -> None:
    q2, q8 = registry.runner(f"{FAMILY}:q2_k"), registry.runner(f"{FAMILY}:q8_0")
    q2_job = chat_job(q2, QUESTION, 8)
    q8_job = chat_job(q8, "Name three colors.", 8)
    alone_q2 = await run_again(scheduler, q2, q2_job)
    alone_q8 = await run_again(scheduler, q8, q8_job)
    assert alone_q2.text != alone_q8.text
    await settled(scheduler)

    first = asyncio.create_task(run(scheduler, q2, q2_job))
    second = asyncio.create_task(run(scheduler, q8, q8_job))
    await asyncio.sleep(0)  # both tasks run until they block: one on the model, one on the slot
    assert scheduler.running == 1
    assert scheduler.queue_depth == 1
    a, b = await asyncio.gather(first, second)

    assert a.ended <= b.started or b.ended <= a.started, "the two generations overlapped"
    waited = b if b.started >= a.ended else a
    assert waited.queue_ms > 0
    assert a.text == alone_q2.text
    assert b.text == alone_q8.text
    await settled(scheduler)
    assert scheduler.queue_depth == 0


async def test_two_slots_let_two_variants_run_together(registry: ModelRegistry) -> None:
    two = Scheduler(slots=2)
    q2, q8 = registry.runner(f"{FAMILY}:q2_k"), registry.runner(f"{FAMILY}:q8_0")
    tasks = [asyncio.create_task(run(two, q2, chat_job(q2, QUESTION, 4))),
             asyncio.create_task(run(two, q8, chat_job(q8, QUESTION, 4)))]
    await asyncio.sleep(0)
    assert two.running == 2
    assert two.queue_depth == 0
    outcomes = await asyncio.gather(*tasks)
    assert all(o.text for o in outcomes)


def test_scheduler_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(slots=0)
