"""Do the configured variants fit in RAM? If not, llama.cpp reads weights from storage at every
token: the study's RK3568 decoded at ~0.17 GB/s that way, several times slower than from RAM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Beyond the weights: KV caches, compute buffers, Python and the server (measured RSS of the
# default family was ~150 MiB above its weights).
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
            ": llama.cpp would read weights from storage at every token, many times slower. "
            "Serve fewer or smaller variants, or pass --memory-check warn to start anyway")
        return (f"the variants need about {self.needed_bytes / gib:.2f} GiB and {verdict} the "
                f"{self.available_bytes / gib:.2f} GiB available{advice}")


def needed_bytes(model_files: list[Path]) -> int:
    weights = sum(path.stat().st_size for path in model_files)
    return int(weights * (1 + OVERHEAD_RATIO)) + OVERHEAD_BYTES


def available_from_meminfo(text: str) -> int | None:
    """MemAvailable from /proc/meminfo's text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_memory(model_files: list[Path], meminfo: Path = Path("/proc/meminfo")) -> MemoryCheck:
    try:
        available = available_from_meminfo(meminfo.read_text())
    except OSError:
        available = None
    return MemoryCheck(needed_bytes(model_files), available)
