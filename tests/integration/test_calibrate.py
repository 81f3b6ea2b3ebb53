"""Calibration on a real variant: samples, the fitted profile, storage keyed by file and host."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeserve.config import ModelsFile
from edgeserve.routing.costs import CostProfile, predict_ms
from edgeserve.runtime.calibrate import (
    CalibrationPlan,
    HashIndex,
    ensure_profiles,
    implausible,
    load_profile,
    measure,
    profile_path,
)
from edgeserve.runtime.prepare import PreparedVariant, sha256_of
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.runner import LlamaRunner

pytestmark = pytest.mark.integration

VARIANT = "smollm2-135m:q4_1"
SMALL = CalibrationPlan(prefill_lengths=(16, 96), decode_contexts=(16, 128), decode_tokens=6, repeats=2)


@pytest.fixture(scope="module")
async def runner(models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> AsyncIterator[LlamaRunner]:
    registry = ModelRegistry(models_file, prepared)
    runner = registry.runners[VARIANT]
    await runner.load()
    yield runner
    registry.close()


async def test_measure_collects_one_sample_per_prompt_length_and_per_context(runner: LlamaRunner) -> None:
    samples = await measure(runner, SMALL)
    assert [n for n, _ in samples.prefill] == [16, 96]
    assert all(ms > 0 for _, ms in samples.prefill)
    # decode_tokens new tokens = 1 prefill + (decode_tokens - 1) decode steps; the sample sits
    # at the middle step
    middle = (SMALL.decode_tokens - 1 + 1) // 2
    assert [position for position, _ in samples.decode] == [16 + middle, 128 + middle]
    assert all(ms > 0 for _, ms in samples.decode)


async def test_profiles_are_stored_by_file_threads_and_host_and_reused(runner: LlamaRunner,
                                                                         tmp_path: Path) -> None:
    said: list[str] = []
    first = await ensure_profiles([runner], tmp_path, SMALL, said.append)
    profile = first[VARIANT]
    assert any("calibrating" in line for line in said)
    assert profile.gguf_sha256 == sha256_of(runner.path)
    assert profile.n_threads == runner.config.threads
    assert profile.decode_ms_per_token > 0  # a decode step is never free, whatever the noise
    assert profile.n_prefill_samples == 2
    assert predict_ms(profile, 100, 10) > predict_ms(profile, 100, 1) > 0
    stored = profile_path(tmp_path, profile.gguf_sha256, profile.n_threads, profile.host)
    assert load_profile(stored) == profile

    said.clear()
    again = await ensure_profiles([runner], tmp_path, SMALL, said.append)
    assert again[VARIANT] == profile
    assert not any("calibrating" in line for line in said)

    forced = await ensure_profiles([runner], tmp_path, SMALL, said.append, force=True)
    assert any("calibrating" in line for line in said)
    assert forced[VARIANT].gguf_sha256 == profile.gguf_sha256


def test_the_hash_index_remembers_a_file_until_it_changes(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    index = HashIndex(tmp_path / "hashes.json")
    assert index.sha256(model) == sha256_of(model)
    assert HashIndex(tmp_path / "hashes.json").sha256(model) == sha256_of(model)
    model.write_bytes(b"GGUF" + b"\1" * 100)
    assert HashIndex(tmp_path / "hashes.json").sha256(model) == sha256_of(model)


def test_a_profile_far_costlier_per_byte_than_its_siblings_is_implausible(
        models_file: ModelsFile, prepared: dict[str, PreparedVariant]) -> None:
    runners = list(ModelRegistry(models_file, prepared).runners.values())  # not loaded: sizes only

    def profiles(slow: str | None) -> dict[str, CostProfile]:
        return {r.variant_id: CostProfile(variant_id=r.variant_id, prefill_ms_per_token=1.0,
                                          decode_ms_per_token=(500.0 if r.variant_id == slow else 15.0))
                for r in runners}

    assert not any(implausible(r, runners, profiles(None)) for r in runners)
    flagged = [r.variant_id for r in runners if implausible(r, runners, profiles("smollm2-135m:q2_k"))]
    assert flagged == ["smollm2-135m:q2_k"]
