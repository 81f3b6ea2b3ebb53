"""Admission: from a domain request to a routing decision and a job ready to start.

`Admitter.admit`: resolve the model → count the prompt's tokens (style and budget hint applied)
→ `Admitter.decide` (THE routing decision: the family's policy, `routing.policy.choose`, pure)
→ shape the prompt for the chosen variant with the decided hint → check it fits → the job, with
its absolute deadline (``GenerationJob.deadline_at``) and answer forcing. No HTTP here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import msgspec

from edgeserve.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    NotReadyError,
    RefusedError,
)
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.routing.costs import predict_ms, prefill_ms
from edgeserve.routing.hints import apply_style_and_hint, hint_tokens_for
from edgeserve.routing.policy import Decision, Refusal, RoutingRequest, VariantCandidate, choose
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.registry import Target
from edgeserve.runtime.sequence import AnswerForcing, GenerationJob
from edgeserve.runtime.variant import Prompt, Variant
from edgeserve.variant_id import VariantId

AUTO = "auto"  # X-Prompt-Style / X-Answer-Forcing: the router chooses from the measured curves


@dataclass(frozen=True)
class Admission:
    """A request that passed every check and knows where and how long it will run."""

    variant: Variant
    prompt: Prompt
    job: GenerationJob
    decision: Decision
    load_ms: float = 0.0  # of decision.predicted_ms, the predicted time to load the variant first
    min_run_ms: float = 0.0  # prefill and the policy's minimum useful tokens (and the load)
    style: str | None = None  # the style instruction added to the prompt (None: none)
    reservation: int | None = None  # its place on the variant's board until it starts (Variant.reserve)

    @property
    def variant_id(self) -> VariantId:
        return self.variant.id

    @property
    def budget_tokens(self) -> int:
        return self.job.max_tokens


class Admitter:
    def __init__(self, catalog: Catalog, policies: Mapping[str, PolicyFile]) -> None:
        self.catalog = catalog
        self.policies = policies  # family name → its policy (quality curves of its variants)
        # One decision at a time, each ending with its job reserved on the board: two requests
        # that arrive together must not both be judged against the board without the other.
        self._deciding = asyncio.Lock()

    async def admit(self, request: InferenceRequest) -> Admission:
        target = self.catalog.resolve(request.model)
        policy = self.policies[target.family.name]
        self._check_style(request, policy)
        if not self.catalog.ready:
            raise NotReadyError(self.catalog.status())
        if request.messages is None and request.prompt is None:
            raise InvalidRequestError("give `messages` or `prompt`", param="messages")
        probe = self.catalog[target.tokenizer_id]
        hint_on = self._hint_on(request, policy)
        first_hint = hint_tokens_for(request.max_tokens or probe.n_ctx, policy) if hint_on else None
        styles = self._style_choices(request, policy, target)
        style = styles[0] if styles else request.style
        prompt = await asyncio.to_thread(_shape, probe, request, style, first_hint, policy)
        if not prompt.tokens:  # llama.cpp cannot decode zero tokens
            raise InvalidRequestError("The prompt is empty; send at least one character of text.",
                                      param="prompt")
        style_tokens = {style: len(prompt.tokens)} if style is not None else {}
        for other in styles[1:]:  # X-Prompt-Style: auto; each style's instruction has its own length
            style_tokens[other] = len((await asyncio.to_thread(_shape, probe, request, other, first_hint,
                                                               policy)).tokens)
        async with self._deciding:
            return await self._decide_and_reserve(request, target, policy, probe, prompt, style, styles,
                                                  style_tokens, hint_on)

    async def _decide_and_reserve(self, request: InferenceRequest, target: Target, policy: PolicyFile,
                                  probe: Variant, prompt: Prompt, style: str | None, styles: tuple[str, ...],
                                  style_tokens: dict[str, int], hint_on: bool) -> Admission:
        """The decision, the prompt shaped for it, and the job reserved on the chosen variant."""
        candidates = [_as_requested(self.catalog[vid], request) for vid in target.ids]
        decision = self.decide(request, target, len(prompt.tokens), probe.n_ctx, hint_on, candidates, policy,
                               styles, style_tokens)
        if isinstance(decision, Refusal):
            self.catalog.note_unserved(decision.crowded, request.deadline_at)
            raise _refusal_error(decision, len(prompt.tokens), probe, request.param)
        variant = self.catalog[VariantId.parse(decision.variant_id)]
        chosen_style = decision.style if styles else request.style
        if (variant.shaped_by != prompt.shaped_by or decision.hint_tokens != prompt.hint_tokens
                or chosen_style != style):
            prompt = await asyncio.to_thread(_shape, variant, request, chosen_style, decision.hint_tokens, policy)
        if len(prompt.tokens) + 1 > variant.n_ctx:
            raise ContextLengthExceededError(len(prompt.tokens), variant.n_ctx, str(variant.id), request.param)
        # chat only (_forcing_choice); never into a JSON answer
        forcing = _forcing(variant, policy) if decision.forcing and not request.structured else None
        job = GenerationJob(prompt.tokens, min(decision.max_tokens, variant.n_ctx - len(prompt.tokens)),
                            request.sampling, request.stop, deadline_at=request.deadline_at,
                            forcing=forcing, join_width=decision.join_width, structured=request.structured,
                            schema=request.schema)
        load_ms = next(c.load_ms for c in candidates if c.variant_id == decision.variant_id)
        return Admission(variant, prompt, job, decision, load_ms, _min_run_ms(variant, job, load_ms, policy),
                         chosen_style, variant.reserve(job))

    def decide(self, request: InferenceRequest, target: Target, prompt_tokens: int, probe_n_ctx: int,
               hint_on: bool, candidates: list[VariantCandidate], policy: PolicyFile,
               styles: tuple[str, ...] = (), style_tokens: Mapping[str, int] | None = None) -> Decision | Refusal:
        """THE routing decision: the family's candidates as they are now (profiles, availability,
        load times), the time left of the deadline and what the stepping loop runs and holds
        (the board: a local variant is judged by when the newcomer and everyone already admitted
        would finish), given to the pure policy (`edgeserve.routing.policy.choose`)."""
        spent_ms = (time.perf_counter() - request.arrived) * 1000
        routing = RoutingRequest(
            prompt_tokens=prompt_tokens,
            requested_max_tokens=request.max_tokens or max(1, probe_n_ctx - prompt_tokens),
            deadline_ms=None if request.deadline_ms is None else request.deadline_ms - spent_ms,
            pinned=None if target.pinned_id is None else str(target.pinned_id),
            style=None if styles else request.style,
            hint=hint_on,
            style_choices=styles,
            style_prompt_tokens=dict(style_tokens or {}),
            forcing=_forcing_choice(request, policy),
        )
        return choose(routing, candidates, policy, 0.0, self.catalog.board())

    @staticmethod
    def _style_choices(request: InferenceRequest, policy: PolicyFile, target: Target) -> tuple[str, ...]:
        """X-Prompt-Style: auto on a chat request: the styles the family's curves cover (the
        default first); otherwise none (the request's own style, or no instruction)."""
        if request.style != AUTO or request.messages is None:
            return ()
        names = [v.name for v in target.family.variants]
        return tuple(policy.measured_styles(names))

    @staticmethod
    def _check_style(request: InferenceRequest, policy: PolicyFile) -> None:
        """X-Prompt-Style names a style of the family's policy."""
        if request.style is not None and request.style != AUTO and request.style not in policy.styles:
            raise InvalidRequestError(
                f"Header X-Prompt-Style must be one of {', '.join(policy.styles)} or {AUTO}, "
                f"got {request.style[:40]!r}.", param="X-Prompt-Style")

    @staticmethod
    def _hint_on(request: InferenceRequest, policy: PolicyFile) -> bool:
        """By default the hint goes only into requests with a deadline: a deadline is edgeserve's
        own contract, while a plain OpenAI client that merely sets max_tokens expects its prompt
        untouched. X-Budget-Hint overrides either way."""
        if request.hint is not None:
            return request.hint
        return policy.hint.enabled and request.deadline_ms is not None and request.messages is not None


def _as_requested(variant: Variant, request: InferenceRequest) -> VariantCandidate:
    """The variant as routing sees it, unavailable when it cannot give what the request asks
    for (log-probabilities from a remote variant)."""
    candidate = variant.candidate()
    if not candidate.available:
        return candidate
    if request.sampling.logprobs is not None and not variant.samples_here:
        return msgspec.structs.replace(candidate, available=False,
                                       unavailable_reason=f"{variant.id} returns no log-probabilities")
    if request.structured and not variant.samples_here:
        return msgspec.structs.replace(candidate, available=False,
                                       unavailable_reason=f"{variant.id} cannot follow a JSON grammar here")
    return candidate


def _shape(variant: Variant, request: InferenceRequest, style: str | None, hint_tokens: int | None,
           policy: PolicyFile) -> Prompt:
    """The prompt with the style instruction and the budget hint, as ``variant`` sees it."""
    messages = None
    if request.messages is not None:
        messages = apply_style_and_hint(request.messages, style, hint_tokens, policy)
    return replace(variant.prompt(messages, request.prompt), hint_tokens=hint_tokens)


def _forcing_choice(request: InferenceRequest, policy: PolicyFile) -> bool | None:
    """Answer forcing for routing: as X-Answer-Forcing says; without it, the policy's `auto`
    (None: the router decides from the curves) or its `enabled`. Only chat requests are forced."""
    if request.messages is None:
        return False
    if request.answer_forcing is not None:
        return None if request.answer_forcing == AUTO else request.answer_forcing == "on"
    return None if policy.answer_forcing.auto else policy.answer_forcing.enabled


def _forcing(variant: Variant, policy: PolicyFile) -> AnswerForcing | None:
    config = policy.answer_forcing
    if not variant.answer_forcing:
        return None
    prefix = tuple(variant.tokenize(config.prefix, chat=True))
    profile = variant.profile
    prefix_ms = 0.0 if profile is None else prefill_ms(profile, len(prefix)) - profile.prefill_fixed_ms
    return AnswerForcing(prefix, config.prefix, config.reserve_tokens, prefix_s=prefix_ms / 1000)


def _min_run_ms(variant: Variant, job: GenerationJob, load_ms: float, policy: PolicyFile) -> float:
    """Predicted time of the prompt and the policy's minimum useful tokens (and the load)."""
    profile = variant.profile
    if profile is None:
        return 0.0
    tokens = min(policy.routing.min_useful_tokens, job.max_tokens)
    return load_ms + predict_ms(profile, len(job.prompt_tokens), tokens)


def _refusal_error(refusal: Refusal, prompt_tokens: int, probe: Variant, param: str) -> Exception:
    if refusal.code == "context_length_exceeded":
        return ContextLengthExceededError(prompt_tokens, probe.n_ctx, str(probe.id), param)
    return RefusedError(f"Cannot answer within the deadline: {refusal.reason}.",
                        code=refusal.code, retry_after_s=refusal.retry_after_s or 1,
                        min_deadline_ms=refusal.min_deadline_ms)

