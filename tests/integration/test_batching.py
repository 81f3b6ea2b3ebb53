"""The batched runtime on the real SmolLM2 variants: runners in one stepping loop.

Concurrent greedy requests of one variant are decoded in one batch and give exactly the text each
gives alone; a cancelled sequence leaves while the others go on; a long prompt is prefilled in
chunks while a stream keeps receiving tokens; a second request with the same system prompt reuses
its prefix's KV and says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from edgeserve.config import ModelsFile
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.runtime.stepper import Stepper

pytestmark = pytest.mark.integration

VARIANT = "smollm2-135m:q8_0"
GREEDY = SamplingParams(temperature=0.0)
SYSTEM = "You are a careful assistant. Think step by step, then give the final answer in \\boxed{}."
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer briefly.",
]


@pytest.fixture(scope="module")
async def runner(models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> AsyncIterator[LlamaRunner]:
    family = models_file.families[0]
    config = msgspec.structs.replace(family.variant("q8_0"), parallel=4, n_ctx=1024)  # type: ignore[type-var]
    stepper = Stepper(chunk_tokens=16)
    runner = LlamaRunner(VARIANT, prepared[VARIANT].path, config, stepper)
    await runner.load()
    yield runner
    stepper.close()
    runner.close()


def chat(runner: LlamaRunner, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return runner.tokenize(runner.render_chat(messages), chat=True)


async def test_concurrent_requests_give_the_text_each_gives_alone(runner: LlamaRunner) -> None:
    jobs = [GenerationJob(chat(runner, q), 48, GREEDY) for q in QUESTIONS]
    alone = [await runner.submit(job).text() for job in jobs]
    generations = [runner.submit(job) for job in jobs]
    together = await asyncio.gather(*(g.text() for g in generations))
    assert together == alone
    assert all(g.result is not None and g.result.mean_batch > 1.5 for g in generations)
    stats = runner.stepper.stats(VARIANT)
    assert stats is not None and max(stats.widths) == 4


async def test_a_cancelled_sequence_leaves_and_the_others_go_on(runner: LlamaRunner) -> None:
    jobs = [GenerationJob(chat(runner, q), 40, GREEDY, ignore_eos=True) for q in QUESTIONS[:3]]
    alone = [await runner.submit(job).text() for job in jobs[:2]]
    leaving = runner.submit(GenerationJob(chat(runner, QUESTIONS[3]), 1000, GREEDY, ignore_eos=True))
    staying = [runner.submit(job) for job in jobs[:2]]
    await leaving.joined
    pieces = leaving.__aiter__()
    await pieces.__anext__()  # it is decoding
    leaving.cancel()
    assert await asyncio.gather(*(g.text() for g in staying)) == alone
    async for _ in pieces:
        pass
    assert leaving.result is not None and leaving.result.finish == "cancelled"
    assert leaving.result.predicted_n < 1000
    assert not runner.stepper.busy(VARIANT)
    assert runner.stepper.running_in(VARIANT) == 0


async def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_goes_on(runner: LlamaRunner) -> None:
    stream = runner.submit(GenerationJob(chat(runner, "Count from one to fifty in words."), 120, GREEDY,
                                         ignore_eos=True))
    await stream.joined
    got = stream.__aiter__()
    await got.__anext__()
    stats = runner.stepper.stats(VARIANT)
    assert stats is not None
    chunks_before = stats.prefill_chunks
    long_question = "Summarise this. " + " ".join(["The harbour committee met on Tuesday."] * 40)
    newcomer = runner.submit(GenerationJob(chat(runner, long_question), 4, GREEDY))
    await asyncio.gather(_drain(got), newcomer.text())
    assert newcomer.result is not None and newcomer.result.prompt_n > 200
    assert stats.prefill_chunks - chunks_before >= newcomer.result.prompt_n // 16
    # the stream kept its pace: no gap between its tokens held a whole prompt's evaluation
    assert stream.result is not None
    assert max(stream.result.token_ms) < newcomer.result.prompt_ms


async def _drain(pieces: AsyncIterator[str]) -> str:
    return "".join([p async for p in pieces])


async def test_the_same_system_prompt_is_reused(runner: LlamaRunner) -> None:
    first = runner.submit(GenerationJob(chat(runner, QUESTIONS[0], SYSTEM), 8, GREEDY))
    await first.text()
    second = runner.submit(GenerationJob(chat(runner, QUESTIONS[1], SYSTEM), 8, GREEDY))
    await second.text()
    assert second.result is not None
    assert second.result.cache_n >= len(runner.tokenize(SYSTEM, chat=True))
    assert second.result.prompt_evaluated == second.result.prompt_n - second.result.cache_n
    # that the reused KV gives the same tokens as a full evaluation: tests/integration/test_decoder.py
