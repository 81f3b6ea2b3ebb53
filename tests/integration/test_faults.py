"""Faults in-process on the real models (issue 8, part 3): a sequence that raises mid-generation
gives back its place in the batch and the next job runs; a missing, stale, copied or corrupt cost profile is
calibrated again; a GGUF llama.cpp cannot read is named with what is wrong with it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgeserve.config import VariantConfig
from edgeserve.errors import GenerationFailedError, ModelPreparationError
from edgeserve.runtime.calibrate import CalibrationPlan, ensure_profiles, host_name, profile_path
from edgeserve.runtime.faults import FAULT_MARKER_ENV
from edgeserve.runtime.prepare import PreparedVariant, sha256_of
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.runtime.stepper import Stepper

pytestmark = pytest.mark.integration

FAMILY = "smollm2-135m"
MARKER = "FAULT-9c1e"
CONFIG = VariantConfig(name="v", n_ctx=256, n_threads=1)  # parallel = 1: one place, a second job waits
TINY = CalibrationPlan(prefill_lengths=(16, 48), decode_contexts=(16, 48), decode_tokens=4, repeats=1)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def stepper() -> Iterator[Stepper]:
    stepper = Stepper()
    yield stepper
    stepper.close()


@pytest.fixture(scope="module")
async def faulty(prepared: dict[str, PreparedVariant]) -> AsyncIterator[LlamaRunner]:
    """A runner created while EDGESERVE_FAULT_MARKER is set (it is read once, at creation)."""
    stepper = Stepper()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_MARKER_ENV, MARKER)
        runner = LlamaRunner("test:faulty", prepared[f"{FAMILY}:q2_k"].path, CONFIG, stepper)
    await runner.load()
    yield runner
    stepper.close()
    runner.close()


def job(runner: LlamaRunner, content: str, max_tokens: int = 8) -> GenerationJob:
    prompt = runner.render_chat([{"role": "user", "content": content}])
    return GenerationJob(runner.tokenize(prompt, chat=True), max_tokens, GREEDY)


async def settled(stepper: Stepper) -> None:
    for _ in range(400):
        if stepper.running == 0 and stepper.queue_depth == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{stepper.running} running, {stepper.queue_depth} queued")


async def test_a_sequence_exception_fails_its_generation_frees_the_place_and_the_next_job_runs(
        faulty: LlamaRunner) -> None:
    generation = faulty.submit(job(faulty, f"Say hello. {MARKER}"))
    await generation.joined
    waiting = faulty.submit(job(faulty, "Say hello."))  # queued behind it: one place
    assert faulty.stepper.queue_depth == 1
    pieces: list[str] = []
    with pytest.raises(GenerationFailedError, match="injected fault after the first token"):
        async for piece in generation:
            pieces.append(piece)
    assert generation.result is None
    await asyncio.wait_for(waiting.joined, timeout=30)  # the place was handed on
    assert (await waiting.text()).strip()
    assert waiting.result is not None and waiting.result.finish in ("stop", "length")
    await settled(faulty.stepper)
    assert not faulty.generating


async def test_without_the_marker_nothing_is_injected(faulty: LlamaRunner) -> None:
    generation = faulty.submit(job(faulty, "Say hello.", max_tokens=4))
    assert await generation.text()
    assert generation.result is not None


async def test_a_missing_stale_copied_or_corrupt_profile_is_calibrated_again(
        prepared: dict[str, PreparedVariant], tmp_path: Path, stepper: Stepper) -> None:
    model = tmp_path / "model.gguf"
    shutil.copyfile(prepared[f"{FAMILY}:q2_k"].path, model)
    cache = tmp_path / "cache"

    async def profiles_of_current_file() -> list[str]:
        said: list[str] = []
        runner = LlamaRunner("test:v", model, CONFIG, stepper)
        try:
            await runner.load()
            profile = (await ensure_profiles([runner], cache, TINY, said.append))["test:v"]
        finally:
            runner.close()
        assert profile.gguf_sha256 == sha256_of(model)
        return said

    def calibrated(said: list[str]) -> bool:
        return any("calibrating" in line for line in said)

    assert calibrated(await profiles_of_current_file())  # missing
    assert not calibrated(await profiles_of_current_file())  # reused
    first = profile_path(cache, sha256_of(model), 1, host_name())

    shutil.copyfile(prepared[f"{FAMILY}:q4_1"].path, model)  # the same path, another file: stale
    assert calibrated(await profiles_of_current_file())
    second = profile_path(cache, sha256_of(model), 1, host_name())
    assert first.is_file() and second.is_file() and first != second

    second.write_bytes(first.read_bytes())  # a copied profile that describes the other file
    said = await profiles_of_current_file()
    assert any("measured for another file" in line for line in said) and calibrated(said)

    second.write_bytes(second.read_bytes()[:40])  # cut short by a crash or a full disk
    assert calibrated(await profiles_of_current_file())
    assert not calibrated(await profiles_of_current_file())


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "not a GGUF file"),
    (b"GGUF\x03\x00", "truncated GGUF file"),
    (None, "truncated or corrupt"),
])
async def test_a_gguf_llama_cpp_cannot_read_is_named_with_what_is_wrong(
        content: bytes | None, expected: str, prepared: dict[str, PreparedVariant], tmp_path: Path,
        stepper: Stepper) -> None:
    bad = tmp_path / "bad.gguf"
    if content is None:  # the first megabyte of a real file: header and metadata, no tensor data
        with prepared[f"{FAMILY}:q2_k"].path.open("rb") as source:
            bad.write_bytes(source.read(1 << 20))
    else:
        bad.write_bytes(content)
    runner = LlamaRunner("test:bad", bad, CONFIG, stepper)
    try:
        with pytest.raises(ModelPreparationError) as raised:
            await runner.load()
    finally:
        runner.close()
    assert f"cannot load {bad}" in raised.value.message
    assert expected in raised.value.message
    assert not runner.loaded
