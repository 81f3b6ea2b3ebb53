"""What the soak watches in the server process: resident memory and open file descriptors."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from edgeserve.tools.processes import vm_rss_mib


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the start of the load
    phase: str  # warmup, baseline (idle after warm-up), load, final (idle after the load)
    rss_mib: float
    anon_mib: float  # the heap and other private memory: where a leak would show
    fds: int


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def anon_mib(pid: int) -> float:
    """RssAnon: resident memory that is not a file mapping. The GGUF weights are mapped files,
    whose resident share moves with the page cache; a leak grows this part."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


def sample(pid: int, t_s: float, phase: str) -> Sample:
    rss = vm_rss_mib(pid)
    if rss is None:
        raise RuntimeError(f"cannot read /proc/{pid}/status: did the server exit?")
    return Sample(t_s, phase, rss, anon_mib(pid), open_fds(pid))


@dataclass(frozen=True)
class Growth:
    baseline_rss_mib: float  # idle, after the warm-up
    final_rss_mib: float  # idle, after the load
    baseline_anon_mib: float
    final_anon_mib: float
    peak_rss_mib: float  # highest under load after the warm-up
    baseline_fds: int
    final_fds: int
    fds_min: int  # after the warm-up, under load included
    fds_max: int
    trend_mib_per_min: float  # least-squares slope of RSS under load after the warm-up

    @property
    def rss_growth(self) -> float:
        return (self.final_rss_mib - self.baseline_rss_mib) / self.baseline_rss_mib

    @property
    def anon_growth(self) -> float:
        return (self.final_anon_mib - self.baseline_anon_mib) / self.baseline_anon_mib


def growth(samples: list[Sample]) -> Growth:
    """Idle against idle (the same conditions) for the growth, and the slope under load, which
    a slow leak shows even when the idle figures happen to agree."""
    baseline = next(s for s in samples if s.phase == "baseline")
    final = next(s for s in reversed(samples) if s.phase == "final")
    after = [s for s in samples if s.phase in ("baseline", "load", "final")]
    load = [s for s in samples if s.phase == "load"]
    slope = 0.0
    if len(load) >= 2:
        slope = statistics.linear_regression([s.t_s for s in load], [s.rss_mib for s in load]).slope * 60
    return Growth(
        baseline_rss_mib=baseline.rss_mib, final_rss_mib=final.rss_mib,
        baseline_anon_mib=baseline.anon_mib, final_anon_mib=final.anon_mib,
        peak_rss_mib=max(s.rss_mib for s in after), baseline_fds=baseline.fds, final_fds=final.fds,
        fds_min=min(s.fds for s in after), fds_max=max(s.fds for s in after), trend_mib_per_min=slope,
    )
