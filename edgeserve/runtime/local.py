"""A local variant: one GGUF on this board, behind the Variant contract.

It wraps the variant's runner (its llama.cpp context, a lane of the stepping loop shared by
every local variant) and the memory budget (residency). `start` is the only place that hands a
job to the runtime.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from msgspec.structs import replace

from edgeserve.errors import NotReadyError
from edgeserve.routing.costs import CostProfile, observe, width_factor
from edgeserve.routing.policy import VariantCandidate
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, GenerationResult
from edgeserve.runtime.variant import Prompt, VariantInfo
from edgeserve.variant_id import VariantId


class LocalVariant:
    def __init__(self, variant_id: VariantId, runner: LlamaRunner,
                 residency: ResidencyManager | None = None, profile: CostProfile | None = None,
                 on_observed: Callable[[], None] | None = None, curve_name: str | None = None) -> None:
        self._id = variant_id
        # whose quality curves it has: its own, or its target's for a speculative pair (the
        # same text, token for token, at another cost)
        self.curve_name = curve_name or variant_id.name
        self.runner = runner
        self._residency = residency  # None: every variant stays loaded (no memory budget)
        self.profile = profile  # set by start-up (calibration or the stored one)
        self._on_observed = on_observed  # the profile changed: the saver writes it out later

    @property
    def profile(self) -> CostProfile | None:
        return self.runner.profile

    @profile.setter
    def profile(self, profile: CostProfile | None) -> None:
        """The runner keeps it too: its lane predicts the rest of a prefill from it."""
        self.runner.profile = profile

    @property
    def parallel(self) -> int:
        return self.runner.parallel

    @property
    def id(self) -> VariantId:
        return self._id

    @property
    def n_ctx(self) -> int:
        return self.runner.n_ctx

    @property
    def ready(self) -> bool:
        return self.runner.usable and self.profile is not None

    @property
    def shaped_by(self) -> VariantId:
        return self._id

    @property
    def answer_forcing(self) -> bool:
        return True

    @property
    def samples_here(self) -> bool:
        return True

    @property
    def starts_at_admission(self) -> bool:
        return False  # it waits for its CPU slot inside the response

    def _runner(self) -> LlamaRunner:
        if not self.runner.usable:  # usable: loaded, or parked by the memory budget (issue 7)
            raise NotReadyError(f"{self._id} is not loaded yet")
        return self.runner

    # ---- routing -------------------------------------------------------------------------------

    def candidate(self) -> VariantCandidate:
        if self.profile is None:
            raise NotReadyError(f"{self._id} is not calibrated yet")
        available, load_ms, why = self._residency_of()
        return VariantCandidate(variant_id=str(self._id), name=self.curve_name, profile=self.profile,
                                n_ctx=self.n_ctx, available=available, load_ms=load_ms,
                                unavailable_reason=why)

    def _residency_of(self) -> tuple[bool, float, str | None]:
        """Under a memory budget (issue 7): can it be made resident now, and at what cost in ms
        (waiting out a victim's minimum residency, unloading it, loading this one)?"""
        runner, residency = self.runner, self._residency
        if residency is None:
            return runner.loaded, 0.0, None
        profile_load_ms = self.profile.load_ms if self.profile is not None else None
        load_ms = residency.load_estimate_ms(runner.variant_id, profile_load_ms)
        if load_ms is None:
            return False, 0.0, residency.unavailable_reason(runner.variant_id)
        return True, load_ms, None

    # ---- prompts -------------------------------------------------------------------------------

    def prompt(self, messages: list[dict[str, str]] | None, text: str | None) -> Prompt:
        runner = self._runner()
        if messages is not None:
            rendered = runner.render_chat(messages)
            return Prompt(rendered, runner.tokenize(rendered, chat=True), messages, self._id)
        assert text is not None
        return Prompt(text, runner.tokenize(text, chat=False), None, self._id)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        return self._runner().tokenize(text, chat=chat)

    # ---- generation ----------------------------------------------------------------------------

    def reserve(self, job: GenerationJob) -> int | None:
        return self.runner.reserve(job)

    def release(self, reservation: int | None) -> None:
        self.runner.release(reservation)

    async def start(self, job: GenerationJob, prompt: Prompt, *, predicted_ms: float,
                    min_run_ms: float, reservation: int | None = None) -> tuple[Generation, float]:
        """Make the variant resident (under a memory budget), hand the job to the stepping loop
        and wait until it takes a place in the variant's batch (earliest deadline first); a
        request whose deadline can no longer fit its shortest useful run by then is refused."""
        try:
            runner, residency = self._runner(), self._residency
            if residency is not None:
                await residency.ensure(runner)
            generation = runner.submit(job, min_run_ms=min_run_ms, reservation=reservation)
        finally:
            self.release(reservation)  # submitted: already gone; turned away: off the board
        try:
            queue_ms = await generation.joined
        except asyncio.CancelledError:  # the client left while waiting for a place
            generation.cancel()
            raise
        return generation, queue_ms

    def observe(self, result: GenerationResult) -> None:
        """Fold a finished request into the profile. Its decode steps ran at a mean batch width:
        their time is brought back to one sequence's (the profile's width factors) before the
        EWMA, so the profile stays the cost of a step of one and the width factors its growth."""
        if self.profile is None or result.finish == "cancelled":
            return
        steps = len(result.token_ms)
        decode_ms = sum(result.token_ms)
        if result.step_ms > 0:
            decode_ms = result.step_ms / width_factor(self.profile, round(result.mean_batch))
        # the prompt's own chunks, not the steps of other sequences and variants between them
        prompt_ms = result.prefill_step_ms if result.prefill_step_ms > 0 else result.prompt_ms
        profile = observe(self.profile, result.prompt_evaluated, prompt_ms, steps, decode_ms)
        if result.drafted_n and steps:  # a speculative pair: how many tokens its steps yield now
            yielded = steps / max(steps - result.accepted_n, 1)
            profile = replace(profile, tokens_per_step=max(0.8 * profile.tokens_per_step + 0.2 * yielded, 1.0))
        self.profile = profile
        if self._on_observed is not None:
            self._on_observed()

    def info(self) -> VariantInfo:
        return VariantInfo(kind="variant", n_ctx=self.runner.config.n_ctx, loaded=self.runner.loaded,
                           quant=self.runner.config.quant, path=str(self.runner.path))
