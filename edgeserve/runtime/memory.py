"""Do the configured variants fit in RAM? If not, llama.cpp reads weights from storage at every
token: the study's RK3568 decoded at ~0.17 GB/s that way, several times slower than from RAM."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from edgeserve.runtime.gguf_meta import GGUFError, kv_bytes_per_token, read_metadata

# Beyond the weights and the KV caches (sized from each file's header): compute buffers, Python
# and the server (measured RSS of the default family was ~150 MiB above its weights).
OVERHEAD_RATIO = 0.10
OVERHEAD_BYTES = 192 * 2**20


@dataclass(frozen=True)
class MemoryCheck:
    needed_bytes: int
    available_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def message(self) -> str:
        gib = 2**30
        if self.available_bytes is None:
            return f"the variants need about {self.needed_bytes / gib:.2f} GiB; available memory is unknown"
        verdict = "fit in" if self.fits else "do NOT fit in"
        advice = "" if self.fits else (
            ": they are loaded on demand within --memory-budget (least recently used evicted; a "
            "request that needs a swap waits for the load, and its prediction says so). Serve fewer "
            "or smaller variants to keep them all resident; --memory-check refuse makes this an error, "
            "--memory-check warn (or off) starts anyway")
        return (f"the variants need about {self.needed_bytes / gib:.2f} GiB and {verdict} the "
                f"{self.available_bytes / gib:.2f} GiB available{advice}")


def needed_bytes(variants: list[tuple[Path, int]]) -> int:
    """(model file, KV cache tokens) per variant: a file two variants share is mapped once,
    but each variant has its own KV cache."""
    weights = sum(weight_bytes(path) for path in {path for path, _ in variants})
    return weights + sum(kv_cache_bytes(path, tokens) for path, tokens in variants) + OVERHEAD_BYTES


def available_from_meminfo(text: str) -> int | None:
    """MemAvailable from /proc/meminfo's text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_memory(variants: list[tuple[Path, int]], meminfo: Path = Path("/proc/meminfo")) -> MemoryCheck:
    """Whether the variants ((model file, KV cache tokens) each) fit in the available RAM."""
    try:
        available = available_from_meminfo(meminfo.read_text())
    except OSError:
        available = None
    return MemoryCheck(needed_bytes(variants), available)


# ---- the memory budget of on-demand residency (issue 7) ---------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `600MiB`, `1.5GiB`, `800MB` or a plain byte count. KB/MB/GB are decimal,
    KiB/MiB/GiB (and bare K/M/G) binary, as in `ls -h` vs the SI prefixes."""
    value = text.strip().replace("_", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = value[len(number):].strip().lower()
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {unit!r}; use bytes, KiB, MiB, GiB (or KB, MB, GB)")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 600MiB, 1.5GiB or 123456789") from None
    if not amount > 0 or amount == float("inf"):
        raise ValueError(f"{text!r}: a memory budget must be a positive size")
    return int(amount * _UNITS[unit])


def resident_bytes(model_file: Path, kv_tokens: int) -> int:
    """What one loaded variant takes from the budget: its weights with their share of compute
    buffers, and its KV cache of `kv_tokens` tokens (n_ctx × parallel); the per-process overhead
    is the budget's margin, not a variant's."""
    return weight_bytes(model_file) + kv_cache_bytes(model_file, kv_tokens)


def weight_bytes(model_file: Path) -> int:
    return int(model_file.stat().st_size * (1 + OVERHEAD_RATIO))


def kv_cache_bytes(model_file: Path, tokens: int) -> int:
    """The f16 KV cache of `tokens` tokens, from the model's attention shape in its GGUF header
    (0 when the header does not give it: a file llama.cpp will then name as unreadable)."""
    per_token = _kv_bytes_per_token(model_file)
    return 0 if per_token is None else per_token * max(tokens, 0)


@functools.cache
def _kv_bytes_per_token(model_file: Path) -> int | None:
    """Read once per file: start-up asks for every variant twice (the memory check, residency)."""
    try:
        return kv_bytes_per_token(read_metadata(model_file))
    except GGUFError:
        return None


def default_budget(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Available RAM at start-up minus the server's own overhead; None when unknown (no limit)."""
    try:
        available = available_from_meminfo(meminfo.read_text())
    except OSError:
        return None
    return None if available is None else max(0, available - OVERHEAD_BYTES)


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
