"""Measure what a variant costs on this board: load, prefill and decode times.

The samples go to routing.costs.fit_profile (pure); the profile is stored as JSON keyed by the
GGUF's sha256, the thread count and the host, so a copied cache never lends one board's costs
to another.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from edgeserve.jsonfiles import read_json, write_json
from edgeserve.routing.costs import CostProfile, fit_profile
from edgeserve.runtime.prepare import sha256_of
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.variant_id import VariantId

FILLER = (
    "The committee met on Tuesday to review the harbour accounts, the new ferry timetable, "
    "the repairs to the north pier and the budget for the winter lights festival. "
)


@dataclass(frozen=True)
class CalibrationPlan:
    """Each prefill point is measured `repeats` times and the fastest kept: a busy neighbour only
    ever adds time, and one slow outlier would otherwise make a variant look unusable until
    traffic corrects it (which never comes if the router therefore refuses it)."""

    prefill_lengths: tuple[int, ...] = (16, 64, 256, 512)
    decode_contexts: tuple[int, ...] = (16, 512, 1024, 1536)
    decode_tokens: int = 24
    repeats: int = 3

    @staticmethod
    def quick() -> CalibrationPlan:
        # three prompt lengths: enough to tell prefill's growth with the context from a line
        return CalibrationPlan(prefill_lengths=(32, 160, 480), decode_contexts=(16, 768), decode_tokens=16,
                               repeats=2)


@dataclass
class CalibrationSamples:
    prefill: list[tuple[int, float]] = field(default_factory=list)  # (prompt tokens, ms)
    decode: list[tuple[int, float]] = field(default_factory=list)  # (context position, ms/token)
    tokens: int = 0  # decoded tokens (after the first of each request)
    steps: int = 0  # decode steps they took (fewer than tokens for a speculative pair)

    @property
    def tokens_per_step(self) -> float:
        return max(self.tokens / self.steps, 1.0) if self.steps else 1.0


def host_name() -> str:
    return socket.gethostname()


def profile_path(cache_dir: Path, sha256: str, n_threads: int, host: str) -> Path:
    safe_host = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
    return cache_dir / "profiles" / f"{sha256[:16]}-t{n_threads}-{safe_host}.json"


def load_profile(path: Path) -> CostProfile | None:
    return read_json(path, CostProfile)


def save_profile(path: Path, profile: CostProfile) -> None:
    write_json(path, profile)


class HashIndex:
    """sha256 of model files, remembered by (path, size, mtime): hashing 8 GB on a board is slow."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, str] = read_json(path, dict[str, str]) or {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = hashlib.sha1(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        if key not in self._known:
            self._known[key] = sha256_of(file)
            write_json(self.path, self._known)
        return self._known[key]


def _filler_tokens(runner: LlamaRunner, n: int, salt: int) -> list[int]:
    """n prompt tokens that start differently each time, so no prefix is reused from a cache."""
    text = f"Record {salt}. " + FILLER * (n // 20 + 2)
    return runner.tokenize(text, chat=False)[:n]


async def measure(runner: LlamaRunner, plan: CalibrationPlan,
                  progress: Callable[[str], None] | None = None) -> CalibrationSamples:
    samples = CalibrationSamples()
    greedy = SamplingParams(temperature=0.0)
    # Warm-up: the first decode after loading pages the mmapped weights in from storage.
    await runner.submit(GenerationJob(_filler_tokens(runner, 16, 0), 4, greedy, ignore_eos=True)).text()
    salt = 0
    for length in plan.prefill_lengths:
        if length + 2 > runner.n_ctx:
            continue
        fastest: float | None = None
        for _ in range(max(1, plan.repeats)):
            salt += 1
            generation = runner.submit(GenerationJob(_filler_tokens(runner, length, salt), 1, greedy,
                                                     ignore_eos=True))
            await generation.text()
            assert generation.result is not None
            ms = generation.result.prompt_ms
            fastest = ms if fastest is None else min(fastest, ms)
        assert fastest is not None
        samples.prefill.append((length, fastest))
        if progress:
            progress(f"{runner.variant_id}: prefill {length} tokens in {fastest:.0f} ms")
    for context in plan.decode_contexts:
        if context + plan.decode_tokens + 1 > runner.n_ctx:
            continue
        salt += 1
        job = GenerationJob(_filler_tokens(runner, context, salt), plan.decode_tokens, greedy,
                            ignore_eos=True)
        generation = runner.submit(job)
        await generation.text()
        result = generation.result
        assert result is not None
        # One sample per context: the median step at the middle position. Single steps jitter
        # (a preempted thread), and a least-squares line through raw steps chases the jitter.
        # A speculative pair's steps yield several tokens (the others take 0 ms): its sample is
        # the mean, the effective cost of a token at the acceptance this text had.
        if result.token_ms:
            middle = result.prompt_n + (len(result.token_ms) + 1) // 2
            per_token = (sum(result.token_ms) / len(result.token_ms) if result.drafted_n
                         else statistics.median(result.token_ms))
            samples.decode.append((middle, per_token))
            samples.tokens += len(result.token_ms)
            samples.steps += len(result.token_ms) - result.accepted_n
        if progress and result.token_ms:
            mean = sum(result.token_ms) / len(result.token_ms)
            progress(f"{runner.variant_id}: decode at context {context}: {mean:.1f} ms/token")
    return samples


def batch_widths(parallel: int) -> list[int]:
    """The widths calibration measures: 2, 4, 8, … up to `parallel`, and `parallel` itself."""
    widths = [w for w in (2, 4, 8, 16, 32, 64) if w < parallel]
    return [*widths, parallel] if parallel > 1 else []


async def measure_batching(runner: LlamaRunner, decode_tokens: int = 32,
                           progress: Callable[[str], None] | None = None) -> dict[int, float]:
    """How much a decode step of `w` sequences costs relative to one sequence, for each width
    of `batch_widths`: `w` requests of a short prompt run together, and the lane's median pure
    decode step (no prompt chunk in it) at width `w` is divided by the median one alone."""
    greedy = SamplingParams(temperature=0.0)
    stats = runner.stepper.stats(runner.variant_id)
    if stats is None or runner.parallel < 2:
        return {}

    async def together(width: int, salt: int) -> float | None:
        stats.recent_decode_ms.pop(width, None)
        jobs = [GenerationJob(_filler_tokens(runner, 16, salt * 100 + i), decode_tokens, greedy, ignore_eos=True)
                for i in range(width)]
        await asyncio.gather(*(runner.submit(job).text() for job in jobs))
        return stats.decode_ms(width)

    alone = await together(1, 9000)
    factors: dict[int, float] = {}
    for width in batch_widths(runner.parallel):
        step = await together(width, 9000 + width)
        if alone and step:
            # a wider batch never costs less per step than a narrower one measured before it
            factors[width] = max(step / alone, *factors.values(), 1.0)
            if progress:
                progress(f"{runner.variant_id}: a step of {width} sequences costs {factors[width]:.2f}× one "
                         f"({step:.1f} ms vs {alone:.1f} ms)")
    return factors


async def calibrate(runner: LlamaRunner, sha256: str, plan: CalibrationPlan,
                    progress: Callable[[str], None] | None = None) -> CostProfile:
    samples = await measure(runner, plan, progress)
    factors = await measure_batching(runner, progress=progress)
    profile = fit_profile(
        samples.prefill,
        samples.decode,
        variant_id=runner.variant_id,
        gguf_sha256=sha256,
        n_threads=runner.config.threads,
        host=host_name(),
        load_ms=runner.load_ms or 0.0,
        batch_step_factors=factors,
    )
    return msgspec.structs.replace(profile, tokens_per_step=samples.tokens_per_step)


async def ensure_profiles(
    runners: list[LlamaRunner],
    cache_dir: Path,
    plan: CalibrationPlan,
    progress: Callable[[str], None] | None = None,
    *,
    force: bool = False,
) -> dict[str, CostProfile]:
    """The stored profile of every runner, calibrating (and storing) the ones that have none
    for this file, thread count and host, and once more the ones that look wrong (see
    `implausible`): a refused variant never gets the traffic that would correct its profile."""
    hashes = HashIndex(cache_dir / "profiles" / "hashes.json")
    profiles: dict[str, CostProfile] = {}
    host = host_name()

    async def measure_and_store(runner: LlamaRunner, sha256: str, path: Path) -> CostProfile:
        profile = await calibrate(runner, sha256, plan, progress)
        await asyncio.to_thread(save_profile, path, profile)
        return profile

    paths: dict[str, tuple[str, Path]] = {}
    for runner in runners:
        sha256 = await asyncio.to_thread(profile_key, runner, hashes)
        path = profile_path(cache_dir, sha256, runner.config.threads, host)
        paths[runner.variant_id] = (sha256, path)
        profile = None if force else load_profile(path)
        if profile is not None and not describes(profile, sha256, runner.config.threads, host):
            if progress:
                progress(f"{runner.variant_id}: the stored cost profile {path.name} was measured for another "
                         "file, thread count or host (a copied cache?); calibrating")
            profile = None
        if profile is None:
            if progress:
                progress(f"{runner.variant_id}: no cost profile for this board; calibrating")
            profile = await measure_and_store(runner, sha256, path)
        elif not covers_batching(profile, runner.parallel):
            if progress:
                progress(f"{runner.variant_id}: the stored cost profile has no batching factors up to "
                         f"parallel = {runner.parallel}; measuring them")
            factors = await measure_batching(runner, progress=progress)
            profile = msgspec.structs.replace(profile, batch_step_factors=factors)
            await asyncio.to_thread(save_profile, path, profile)
        profiles[runner.variant_id] = profile
    for runner in runners:
        if implausible(runner, runners, profiles):
            if progress:
                progress(f"{runner.variant_id}: its decode cost per byte of weights is far above its "
                         "siblings' (measured while the machine was busy?); calibrating again")
            profiles[runner.variant_id] = await measure_and_store(runner, *paths[runner.variant_id])
    return profiles


def profile_key(runner: LlamaRunner, hashes: HashIndex) -> str:
    """What a profile is keyed by: the GGUF's sha256; for a speculative pair, a hash of both
    files' and the draft length (its costs depend on all three)."""
    shas = [hashes.sha256(file) for file in runner.files]
    if len(shas) == 1:
        return shas[0]
    config = runner.config
    return hashlib.sha256(f"{'+'.join(shas)}|draft_max={config.draft_max}|adaptive={config.draft_adaptive}"
                          .encode()).hexdigest()


def covers_batching(profile: CostProfile, parallel: int) -> bool:
    """The profile knows what a step of every width up to `parallel` costs (measured up to it)."""
    return parallel < 2 or max(profile.batch_step_factors, default=1) >= parallel


def describes(profile: CostProfile, sha256: str, n_threads: int, host: str) -> bool:
    """The profile was measured on this very file, thread count and host. Its file name says
    so already; a copied or hand-edited file may not."""
    return profile.gguf_sha256 == sha256 and profile.n_threads == n_threads and profile.host == host


def implausible(runner: LlamaRunner, runners: list[LlamaRunner], profiles: dict[str, CostProfile],
                factor: float = 3.0) -> bool:
    """Decoding is bound by the bytes of weights read per token, so variants of one family cost
    about the same per byte. A profile more than `factor` times its siblings' median per byte
    was almost surely measured under load."""
    family = VariantId.parse(runner.variant_id).family
    if len(runner.files) > 1:  # a speculative pair: its cost is not one file's read per token
        return False
    siblings = [r for r in runners if VariantId.parse(r.variant_id).family == family and len(r.files) == 1]
    if len(siblings) < 3:  # with two, which one is wrong cannot be told
        return False

    def per_byte(r: LlamaRunner) -> float:
        return profiles[r.variant_id].decode_ms_per_token / max(r.file_bytes, 1)

    typical = statistics.median(per_byte(r) for r in siblings)
    return typical > 0 and per_byte(runner) > factor * typical


def store_profiles(profiles: dict[str, CostProfile], cache_dir: Path) -> None:
    """Persist online-updated profiles (EWMA) so a restart starts from what was last seen."""
    for profile in profiles.values():
        if profile.gguf_sha256:
            save_profile(profile_path(cache_dir, profile.gguf_sha256, profile.n_threads, profile.host), profile)
