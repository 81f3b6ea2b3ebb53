"""The start-up memory check."""

from __future__ import annotations

from pathlib import Path

from edgeserve.runtime.memory import OVERHEAD_BYTES, MemoryCheck, available_from_meminfo, check_memory

MEMINFO = "MemTotal:        2000000 kB\nMemFree:          100000 kB\nMemAvailable:    1500000 kB\n"


def test_mem_available_is_read_in_bytes() -> None:
    assert available_from_meminfo(MEMINFO) == 1_500_000 * 1024
    assert available_from_meminfo("MemTotal: 1 kB\n") is None


def test_variants_that_fit(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"\0" * 1000)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    check = check_memory([model, model], meminfo)
    assert check.needed_bytes == int(2000 * 1.1) + OVERHEAD_BYTES
    assert check.fits
    assert "fit in" in check.message()


def test_variants_that_do_not_fit_say_what_to_do() -> None:
    check = MemoryCheck(needed_bytes=8 * 2**30, available_bytes=2 * 2**30)
    assert not check.fits
    assert "do NOT fit" in check.message() and "--memory-check warn" in check.message()


def test_unknown_available_memory_is_not_a_failure(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"\0")
    check = check_memory([model], tmp_path / "no-meminfo")
    assert check.available_bytes is None and check.fits
