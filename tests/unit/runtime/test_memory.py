"""The start-up memory check."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from edgeserve.runtime.memory import (
    OVERHEAD_BYTES,
    OVERHEAD_RATIO,
    MemoryCheck,
    available_from_meminfo,
    check_memory,
    default_budget,
    parse_size,
    resident_bytes,
)


def write_gguf(path: Path, metadata: dict[str, str | int]) -> None:
    """A GGUF header with these metadata (strings and u32s) and no tensors."""
    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    body = b"".join(string(key) + (struct.pack("<I", 8) + string(value) if isinstance(value, str)
                                   else struct.pack("<II", 4, value)) for key, value in metadata.items())
    path.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 0, len(metadata)) + body)


MEMINFO = "MemTotal:        2000000 kB\nMemFree:          100000 kB\nMemAvailable:    1500000 kB\n"


def test_mem_available_is_read_in_bytes() -> None:
    assert available_from_meminfo(MEMINFO) == 1_500_000 * 1024
    assert available_from_meminfo("MemTotal: 1 kB\n") is None


def test_variants_that_fit(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"\0" * 1000)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    check = check_memory([(model, 4096), (model, 4096)], meminfo)
    assert check.needed_bytes == int(1000 * 1.1) + OVERHEAD_BYTES  # one file, mapped once; no header: no KV
    assert check.fits
    assert "fit in" in check.message()


def test_variants_that_do_not_fit_say_what_to_do() -> None:
    check = MemoryCheck(needed_bytes=8 * 2**30, available_bytes=2 * 2**30)
    assert not check.fits
    assert "do NOT fit" in check.message() and "--memory-check warn" in check.message()


def test_unknown_available_memory_is_not_a_failure(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"\0")
    check = check_memory([(model, 0)], tmp_path / "no-meminfo")
    assert check.available_bytes is None and check.fits


@pytest.mark.parametrize(("text", "expected"), [
    ("600MiB", 600 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("800MB", 800 * 10**6), ("123456", 123456),
    ("2G", 2 * 2**30), (" 64 kib ", 64 * 1024), ("1_000_000", 1_000_000),
])
def test_memory_budget_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-5MiB", "0", "1.2.3GiB"])
def test_bad_memory_budget_sizes_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|unit|positive"):
        parse_size(text)


def test_a_variant_takes_its_weights_and_their_buffers_from_the_budget(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"\0" * 1000)
    assert resident_bytes(model, 2048) == int(1000 * (1 + OVERHEAD_RATIO))


def test_each_variant_has_its_own_kv_cache_sized_from_the_gguf_header(tmp_path: Path) -> None:
    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 → 30 × 3 × 128 × 2 bytes = 23,040 per token
    model = tmp_path / "smol.gguf"
    write_gguf(model, {"general.architecture": "llama", "llama.block_count": 30,
                       "llama.embedding_length": 576, "llama.attention.head_count": 9,
                       "llama.attention.head_count_kv": 3})
    weights = int(model.stat().st_size * (1 + OVERHEAD_RATIO))
    assert resident_bytes(model, 2048 * 4) == weights + 23_040 * 2048 * 4
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    check = check_memory([(model, 2048), (model, 8192)], meminfo)
    assert check.needed_bytes == weights + 23_040 * (2048 + 8192) + OVERHEAD_BYTES


def test_the_default_budget_is_available_memory_minus_the_margin(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    assert default_budget(meminfo) == 1_500_000 * 1024 - OVERHEAD_BYTES
    assert default_budget(tmp_path / "missing") is None
