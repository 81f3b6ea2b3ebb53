"""edgeserve/runtime/prepare.py with llama.cpp's real quantizer on the packaged SmolLM2 Q4_1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeserve.config import ModelsFile
from edgeserve.errors import ModelPreparationError
from edgeserve.runtime.prepare import (
    PreparedVariant,
    ftype_of,
    locate_source,
    prepare_from_file,
    prepare_models,
    sha256_of,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAMILY = "smollm2-135m"


def file_type(path: Path) -> int:
    """The GGUF's own `general.file_type` (llama.cpp's ftype), read without loading weights."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return int(llm.metadata["general.file_type"])
    finally:
        llm.close()


def assert_gguf(path: Path) -> None:
    assert path.is_file(), path
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF", f"{path} is not a GGUF file"


class Run:
    def __init__(self, prepared: dict[str, PreparedVariant], log: list[str]) -> None:
        self.prepared = prepared
        self.log = log


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fresh-cache")


@pytest.fixture(scope="module")
def first_run(models_file: ModelsFile, fresh_cache: Path) -> Run:
    log: list[str] = []
    return Run(prepare_models(models_file, ROOT, fresh_cache, log.append), log)


def test_first_run_derives_q2_k_and_q8_0(first_run: Run, fresh_cache: Path) -> None:
    out_dir = fresh_cache / "models" / FAMILY
    prepared = first_run.prepared
    assert set(prepared) == {f"{FAMILY}:q2_k", f"{FAMILY}:q4_1", f"{FAMILY}:q8_0"}
    for name, quant in [("q2_k", "Q2_K"), ("q8_0", "Q8_0")]:
        variant = prepared[f"{FAMILY}:{name}"]
        assert variant.variant_id == f"{FAMILY}:{name}"
        assert variant.action == "derived"
        assert variant.path == out_dir / f"{quant}.gguf"
        assert_gguf(variant.path)
        assert file_type(variant.path) == ftype_of(quant)
    assert not list(out_dir.glob("*.partial")), "no temporary files are left behind"


def test_q4_1_is_the_packaged_source_itself(first_run: Run, models_file: ModelsFile) -> None:
    variant = first_run.prepared[f"{FAMILY}:q4_1"]
    assert variant.action == "source"
    assert variant.path == locate_source(models_file.families[0].source or "", ROOT)
    assert_gguf(variant.path)
    assert file_type(variant.path) == ftype_of("Q4_1")


def test_derived_sizes_follow_bits_per_weight(first_run: Run) -> None:
    size = {name: first_run.prepared[f"{FAMILY}:{name}"].path.stat().st_size
            for name in ("q2_k", "q4_1", "q8_0")}
    assert size["q2_k"] < size["q4_1"] < size["q8_0"]


def test_first_run_log_explains_what_was_derived(first_run: Run) -> None:
    derived = [line for line in first_run.log if line.startswith("derived ")]
    assert len(derived) == 2
    assert any("Q2_K" in line for line in derived)
    assert any("Q8_0" in line for line in derived)
    notes = [line for line in first_run.log if line.startswith("note:")]
    assert len(notes) == 1, "only the Q8_0 (more bits than its Q4_1 source) gets the note"
    assert "Q8_0" in notes[0] and "Q4_1" in notes[0]
    assert "no more information" in notes[0]


def test_manifest_records_source_hash_and_outputs(
    first_run: Run, fresh_cache: Path, models_file: ModelsFile
) -> None:
    manifest = json.loads((fresh_cache / "models" / FAMILY / "manifest.json").read_text())
    assert manifest["source_sha256"] == models_file.families[0].source_sha256
    assert manifest["source_sha256"] == sha256_of(first_run.prepared[f"{FAMILY}:q4_1"].path)
    assert manifest["outputs"] == {"Q2_K": "Q2_K.gguf", "Q8_0": "Q8_0.gguf"}


def test_second_run_is_cached_and_rewrites_nothing(
    first_run: Run, fresh_cache: Path, models_file: ModelsFile
) -> None:
    out_dir = fresh_cache / "models" / FAMILY
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    log: list[str] = []
    second = prepare_models(models_file, ROOT, fresh_cache, log.append)
    after = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert after == before  # outputs and manifest untouched, nothing new created
    assert second[f"{FAMILY}:q2_k"].action == "cached"
    assert second[f"{FAMILY}:q8_0"].action == "cached"
    assert second[f"{FAMILY}:q4_1"].action == "source"
    assert {k: v.path for k, v in second.items()} == {
        k: v.path for k, v in first_run.prepared.items()
    }
    assert log == []


def test_lost_output_is_derived_again(
    first_run: Run, fresh_cache: Path, models_file: ModelsFile
) -> None:
    target = fresh_cache / "models" / FAMILY / "Q2_K.gguf"
    q8_mtime = (target.parent / "Q8_0.gguf").stat().st_mtime_ns
    target.unlink()
    prepared = prepare_models(models_file, ROOT, fresh_cache, lambda _line: None)
    assert prepared[f"{FAMILY}:q2_k"].action == "derived"
    assert prepared[f"{FAMILY}:q8_0"].action == "cached"
    assert_gguf(target)
    assert (target.parent / "Q8_0.gguf").stat().st_mtime_ns == q8_mtime


def test_prepare_from_file_derives_q8_0_from_the_packaged_q4_1(
    tmp_path: Path, models_file: ModelsFile
) -> None:
    source = locate_source(models_file.families[0].source or "", ROOT)
    log: list[str] = []
    quants = prepare_from_file(source, "mine", ["q8_0"], tmp_path, log.append)
    assert quants == ["Q8_0"]
    target = tmp_path / "models" / "mine" / "Q8_0.gguf"
    assert_gguf(target)
    assert file_type(target) == ftype_of("Q8_0")
    assert any(line.startswith("hashing ") for line in log)
    assert any("derived" in line and "Q8_0" in line for line in log)
    # a user's own file has no declared quant: no claim about information content
    assert not any(line.startswith("note:") for line in log)
    # run again: cached, not rewritten
    mtime = target.stat().st_mtime_ns
    log.clear()
    assert prepare_from_file(source, "mine", ["Q8_0"], tmp_path, log.append) == ["Q8_0"]
    assert target.stat().st_mtime_ns == mtime
    assert any("cached" in line for line in log)


def test_prepare_from_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="no such file"):
        prepare_from_file(tmp_path / "absent.gguf", "mine", ["Q8_0"], tmp_path, print)


def test_quantizing_a_file_that_is_not_gguf_fails_cleanly(tmp_path: Path) -> None:
    source = tmp_path / "junk.gguf"
    source.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelPreparationError, match="could not quantize"):
        prepare_from_file(source, "junk", ["Q8_0"], tmp_path / "cache", lambda _line: None)
    assert not list((tmp_path / "cache" / "models" / "junk").glob("*.gguf"))
