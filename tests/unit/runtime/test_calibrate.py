"""The pure parts of calibration that speculative pairs add: what their profile is keyed by and
how many tokens their steps yield."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgeserve.config import VariantConfig
from edgeserve.runtime.calibrate import CalibrationSamples, HashIndex, profile_key


def runner(files: list[Path], **config: Any) -> Any:
    return SimpleNamespace(files=files, config=VariantConfig(name="v", path="x.gguf", **config))


def test_a_pair_is_keyed_by_both_files_and_its_drafting(tmp_path: Path) -> None:
    target, draft = tmp_path / "q8.gguf", tmp_path / "q2.gguf"
    target.write_bytes(b"target weights")
    draft.write_bytes(b"draft weights")
    hashes = HashIndex(tmp_path / "hashes.json")
    alone = profile_key(runner([target]), hashes)
    assert alone == hashes.sha256(target)
    pair = profile_key(runner([target, draft], draft_max=4), hashes)
    assert pair not in (alone, hashes.sha256(draft))
    assert profile_key(runner([target, draft], draft_max=3), hashes) != pair
    assert profile_key(runner([target, draft], draft_max=4, draft_adaptive=True), hashes) != pair
    assert profile_key(runner([target, draft], draft_max=4), hashes) == pair


def test_tokens_per_step_counts_the_steps_not_the_tokens() -> None:
    samples = CalibrationSamples()
    assert samples.tokens_per_step == 1.0
    samples.tokens, samples.steps = 30, 10
    assert samples.tokens_per_step == 3.0
