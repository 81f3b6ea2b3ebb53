"""A small fake world for the pipeline: variants that follow the Variant contract without a
model, a fake stepping loop, a metrics sink, and a catalog over them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve.config import FamilyConfig, ModelsFile, VariantConfig
from edgeserve.errors import RemoteUnavailableError
from edgeserve.pipeline import CompletionRecord
from edgeserve.routing.costs import CostProfile, observe
from edgeserve.routing.policy import VariantCandidate
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.sequence import GenerationJob, GenerationResult
from edgeserve.runtime.stepper import Stepper
from edgeserve.runtime.variant import Prompt, VariantInfo
from edgeserve.variant_id import VariantId


def flat_profile(variant_id: VariantId, ms_per_token: float) -> CostProfile:
    """predict_ms(p, prompt, n) == n * ms_per_token exactly: the prefill costs one token."""
    return CostProfile(variant_id=str(variant_id), prefill_fixed_ms=ms_per_token,
                       prefill_ms_per_token=0.0, decode_ms_per_token=ms_per_token)


def words(text: str) -> list[int]:
    return [len(word) for word in text.split()]


@dataclass
class Script:
    """What a fake generation does: these pieces, then this finish (or it waits to be cancelled)."""

    pieces: tuple[str, ...] = ("The answer", " is 4.")
    finish: str = "stop"
    wait_for_cancel: bool = False
    fail: bool = False


class FakeVariant:
    """A local-like (or, with ``remote=True``, remote-like) variant. Its prompts are the message
    contents joined; a token is a word."""

    def __init__(self, vid: VariantId, ms_per_token: float, *, n_ctx: int = 4096, remote: bool = False,
                 counter: FakeVariant | None = None) -> None:
        self._id = vid
        self.n_ctx = n_ctx
        self.parallel = 1
        self.profile: CostProfile | None = flat_profile(vid, ms_per_token)
        self.remote = remote
        self.counter = counter
        self.available = True
        self.refuse_start: Exception | None = None  # raised by start()
        self.script = Script()
        self.started: list[GenerationJob] = []
        self.observed: list[GenerationResult] = []
        self.prompts: list[Prompt] = []
        self.stepper: Stepper | None = None  # the catalog's loop: a local one reserves its jobs there

    @property
    def id(self) -> VariantId:
        return self._id

    @property
    def ready(self) -> bool:
        return True

    @property
    def shaped_by(self) -> VariantId:
        return self.counter.id if self.counter is not None else self._id

    @property
    def answer_forcing(self) -> bool:
        return not self.remote

    @property
    def samples_here(self) -> bool:
        return not self.remote

    @property
    def starts_at_admission(self) -> bool:
        return self.remote

    def candidate(self) -> VariantCandidate:
        assert self.profile is not None
        return VariantCandidate(variant_id=str(self._id), name=self._id.name, profile=self.profile,
                                n_ctx=self.n_ctx, available=self.available,
                                unavailable_reason=None if self.available else "is down",
                                wait_ms=0.0 if self.remote else None)

    def prompt(self, messages: list[dict[str, str]] | None, text: str | None) -> Prompt:
        rendered = " ".join(m["content"] for m in messages) if messages is not None else text or ""
        prompt = Prompt(rendered, words(rendered), messages, self.shaped_by)
        self.prompts.append(prompt)
        return prompt

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        return words(text)

    def reserve(self, job: GenerationJob) -> int | None:
        return None if self.remote or self.stepper is None else self.stepper.reserve(str(self._id), job)

    def release(self, reservation: int | None) -> None:
        if self.stepper is not None:
            self.stepper.release(reservation)

    async def start(self, job: GenerationJob, prompt: Prompt, *, predicted_ms: float,
                    min_run_ms: float, reservation: int | None = None) -> tuple[Generation, float]:
        self.release(reservation)  # it runs its script, not the loop
        if self.refuse_start is not None:
            if self.remote and isinstance(self.refuse_start, RemoteUnavailableError):
                self.available = False  # its circuit opens
            raise self.refuse_start
        self.started.append(job)
        generation = Generation(asyncio.get_running_loop(), flush_interval_s=0.0)
        script = self.script

        async def run() -> None:
            for piece in script.pieces:
                generation._emit_text(piece)
                await asyncio.sleep(0)
            if script.fail:
                generation._emit_end(RuntimeError("the fake decoder broke"))
                return
            finish = script.finish
            if script.wait_for_cancel:
                while not generation.cancelled:
                    await asyncio.sleep(0.001)
                finish = "cancelled"
            n = len(script.pieces)
            generation._emit_end(GenerationResult(finish, len(job.prompt_tokens), 5.0, n,  # type: ignore[arg-type]
                                                  2.0 * max(n - 1, 0), [2.0] * max(n - 1, 0),
                                                  len(job.prompt_tokens)))

        _tasks.add(asyncio.create_task(run()))
        return generation, 1.5

    def observe(self, result: GenerationResult) -> None:
        self.observed.append(result)
        if self.profile is not None and result.finish != "cancelled":
            self.profile = observe(self.profile, result.prompt_evaluated, result.prompt_ms,
                                   len(result.token_ms), sum(result.token_ms))

    def info(self) -> VariantInfo:
        return VariantInfo(kind="remote" if self.remote else "variant", n_ctx=self.n_ctx, loaded=True)


_tasks: set[asyncio.Task[None]] = set()


@dataclass
class FakeLoop:
    """The stepping loop as the pipeline sees it (what a stop needs)."""

    queue_depth: int = 0
    running: int = 0
    refused: list[Exception] = field(default_factory=list)

    def refuse_waiting(self, error: Exception) -> int:
        self.refused.append(error)
        return 0


@dataclass
class Sink:
    records: list[CompletionRecord] = field(default_factory=list)

    def observe(self, record: CompletionRecord) -> None:
        self.records.append(record)


def models(*families: tuple[str, list[str], list[str]]) -> ModelsFile:
    """(family, local variant names, remote variant names) → a models file (paths unused)."""
    return ModelsFile(families=[
        FamilyConfig(name=name, variants=[VariantConfig(name=v, path=f"{v}.gguf") for v in local]
                     + [VariantConfig(name=v, kind="remote", base_url="http://127.0.0.1:9/v1") for v in remote])
        for name, local, remote in families])


def catalog(tmp_path: Path, models_file: ModelsFile,
            speeds: dict[str, float], make: Callable[..., Any] = FakeVariant) -> Catalog:
    """A real Catalog (and registry: its runners are never loaded) over fake variants;
    ``speeds`` maps "family:name" to ms per token. A remote counts with its family's default."""
    prepared = {str(VariantId(f.name, v.name)): PreparedVariant(str(VariantId(f.name, v.name)),
                                                                tmp_path / "unused.gguf", "explicit")
                for f in models_file.families for v in f.local_variants}
    registry = ModelRegistry(models_file, prepared)
    local: dict[VariantId, Any] = {}
    remote: dict[VariantId, Any] = {}
    for family in models_file.families:
        for variant in family.local_variants:
            vid = VariantId(family.name, variant.name)
            local[vid] = make(vid, speeds[str(vid)])
            local[vid].stepper = registry.stepper
        counter = local[VariantId(family.name, family.default.name)]
        for variant in family.variants:
            if variant.remote:
                vid = VariantId(family.name, variant.name)
                remote[vid] = make(vid, speeds[str(vid)], remote=True, counter=counter)
    return Catalog(registry, local, remote)
