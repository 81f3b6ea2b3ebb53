"""From a domain request to a running generation, and from its result back to the costs.

admit: resolve the model → count prompt tokens → policy.choose (pure) → shape the prompt with
the budget hint → check it fits. start: wait for a CPU slot (earliest deadline first). record:
fold the finished request's timings into the variant's cost profile (EWMA). No HTTP here.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeserve.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    NotReadyError,
    RefusedError,
    ShuttingDownError,
)
from edgeserve.routing.costs import CostProfile, observe, predict_ms
from edgeserve.routing.hints import apply_style_and_hint, hint_tokens_for
from edgeserve.routing.policy import Decision, Refusal, RoutingRequest, VariantCandidate, choose
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.registry import ModelRegistry, Target
from edgeserve.runtime.remote import RemoteRequest, RemoteVariant
from edgeserve.runtime.runner import (
    AnswerForcing,
    Generation,
    GenerationJob,
    GenerationResult,
    LlamaRunner,
    SamplingParams,
)
from edgeserve.runtime.scheduler import Scheduler


@dataclass(frozen=True)
class InferenceRequest:
    """One chat (`messages`) or text (`prompt`) completion, as the domain sees it."""

    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    deadline_ms: int | None = None
    hint: bool | None = None  # None: the policy's default, when the budget means something
    style: str | None = None  # a prompt style of the policy file (boxed, aav) or none
    answer_forcing: bool | None = None  # None: the policy's setting
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def deadline_at(self) -> float | None:
        return None if self.deadline_ms is None else self.arrived + self.deadline_ms / 1000


@dataclass(frozen=True)
class Admission:
    """A request that passed every check and knows where and how long it will run."""

    variant_id: str
    runner: LlamaRunner  # the local variant that runs it, or whose tokenizer counted it for a remote
    prompt_text: str
    job: GenerationJob
    decision: Decision
    remote: RemoteVariant | None = None  # set when a remote variant answers
    remote_request: RemoteRequest | None = None
    load_ms: float = 0.0  # of decision.predicted_ms, the predicted time to load the variant first

    @property
    def budget_tokens(self) -> int:
        return self.job.max_tokens


class Engine:
    def __init__(self, registry: ModelRegistry, scheduler: Scheduler, policy: PolicyFile,
                 profiles: dict[str, CostProfile] | None = None,
                 on_profiles_changed: Callable[[dict[str, CostProfile]], None] | None = None,
                 residency: ResidencyManager | None = None) -> None:
        self.registry = registry
        self.residency = residency  # None: every variant stays loaded (no memory budget)
        self.scheduler = scheduler
        self.policy = policy
        self.profiles: dict[str, CostProfile] = dict(profiles or {})
        self._on_profiles_changed = on_profiles_changed
        self._updates = 0
        self.draining = False  # set on the first SIGTERM: finish what is admitted, admit nothing
        self.in_flight = 0  # admitted requests whose response is not finished (see `finished`)
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()  # started, maybe running

    @property
    def ready(self) -> bool:
        return self.registry.ready and all(v in self.profiles for v in self.registry.runners)

    def status(self) -> str:
        calibrated = sum(v in self.profiles for v in self.registry.runners)
        return f"{self.registry.loading_status()}, {calibrated}/{len(self.registry.runners)} calibrated"

    async def admit(self, request: InferenceRequest) -> Admission:
        if self.draining:
            raise ShuttingDownError()
        target = self.registry.resolve(request.model)
        if not self.ready:
            raise NotReadyError(self.status())
        local_pin = target.pinned if target.pinned is not None and not target.pinned.remote else None
        probe = self.registry.runner(target.variant_id(local_pin or target.family.default))
        hint_on = self._hint_on(request)
        first_hint = hint_tokens_for(request.max_tokens or probe.n_ctx, self.policy) if hint_on else None
        prompt_text, tokens = await asyncio.to_thread(self._prompt, probe, request, first_hint)
        if not tokens:  # llama.cpp cannot decode zero tokens
            raise InvalidRequestError("The prompt is empty; send at least one character of text.",
                                      param="prompt")
        deadline_at = request.deadline_at
        spent_ms = (time.perf_counter() - request.arrived) * 1000
        routing = RoutingRequest(
            prompt_tokens=len(tokens),
            requested_max_tokens=request.max_tokens or max(1, probe.n_ctx - len(tokens)),
            deadline_ms=None if request.deadline_ms is None else request.deadline_ms - spent_ms,
            pinned=None if target.pinned is None else target.variant_id(target.pinned),
            style=request.style,
            hint=hint_on,
            run_limit_ms=self.scheduler.slack_ms(deadline_at),
        )
        candidates = self._candidates(target)
        decision = choose(routing, candidates, self.policy, self.scheduler.wait_estimate_ms(deadline_at))
        param = "messages" if request.messages is not None else "prompt"
        if isinstance(decision, Refusal):
            raise self._refusal_error(decision, len(tokens), probe, param)
        remote = self.registry.remotes.get(decision.variant_id)
        if remote is not None:
            if decision.hint_tokens != first_hint:
                prompt_text, tokens = await asyncio.to_thread(self._prompt, probe, request, decision.hint_tokens)
            return self._admit_remote(request, remote, probe, decision, deadline_at, param, prompt_text, tokens)
        runner = self.registry.runner(decision.variant_id)
        if runner is not probe or decision.hint_tokens != first_hint:
            prompt_text, tokens = await asyncio.to_thread(self._prompt, runner, request, decision.hint_tokens)
        runner.check_fits(len(tokens), param)
        max_tokens = min(decision.max_tokens, runner.n_ctx - len(tokens))
        job = GenerationJob(tokens, max_tokens, request.sampling, request.stop, deadline_at=deadline_at,
                            forcing=self._forcing(runner, request))
        self.in_flight += 1
        load_ms = next(c.load_ms for c in candidates if c.variant_id == decision.variant_id)
        return Admission(decision.variant_id, runner, prompt_text, job, decision, load_ms=load_ms)

    def _admit_remote(self, request: InferenceRequest, remote: RemoteVariant, probe: LlamaRunner,
                      decision: Decision, deadline_at: float | None, param: str, prompt_text: str,
                      tokens: list[int]) -> Admission:
        """The remote shapes its own prompt: it gets the styled (and hinted) messages, and the
        local tokenizer only counted them. Answer forcing needs token-level control: not remote."""
        messages = None
        if request.messages is not None:
            messages = apply_style_and_hint(request.messages, request.style, decision.hint_tokens, self.policy)
        if len(tokens) >= remote.n_ctx:
            raise ContextLengthExceededError(len(tokens), remote.n_ctx, remote.variant_id, param)
        max_tokens = min(decision.max_tokens, remote.n_ctx - len(tokens))
        job = GenerationJob(tokens, max_tokens, request.sampling, request.stop, deadline_at=deadline_at)
        self.in_flight += 1
        return Admission(decision.variant_id, probe, prompt_text, job, decision, remote,
                         RemoteRequest(messages, request.prompt, len(tokens)))

    def finished(self) -> None:
        """The response of an admitted request is complete (or abandoned): a graceful stop waits
        for this, not only for the generation, so the last bytes reach the client."""
        self.in_flight = max(0, self.in_flight - 1)

    def _forcing(self, runner: LlamaRunner, request: InferenceRequest) -> AnswerForcing | None:
        config = self.policy.answer_forcing
        enabled = config.enabled if request.answer_forcing is None else request.answer_forcing
        if not enabled or request.messages is None:
            return None
        prefix = tuple(runner.tokenize(config.prefix, chat=True))
        return AnswerForcing(prefix, config.prefix, config.reserve_tokens)

    def _hint_on(self, request: InferenceRequest) -> bool:
        """By default the hint goes only into requests with a deadline: a deadline is edgeserve's
        own contract, while a plain OpenAI client that merely sets max_tokens expects its prompt
        untouched. X-Budget-Hint overrides either way."""
        if request.hint is not None:
            return request.hint
        return self.policy.hint.enabled and request.deadline_ms is not None and request.messages is not None

    def _candidates(self, target: Target) -> list[VariantCandidate]:
        candidates = []
        for variant in target.family.variants:
            variant_id = target.variant_id(variant)
            remote = self.registry.remotes.get(variant_id)
            if remote is not None:
                candidates.append(VariantCandidate(
                    variant_id=variant_id, name=variant.name, n_ctx=remote.n_ctx,
                    profile=remote.profile or CostProfile(variant_id=variant_id, prefill_ms_per_token=0.0,
                                                          decode_ms_per_token=0.0),
                    available=remote.available, unavailable_reason=remote.unavailable_reason(),
                    wait_ms=0.0,  # it does not wait for a local CPU slot
                ))
                continue
            runner = self.registry.runners[variant_id]
            available, load_ms, why = self._residency_of(runner)
            candidates.append(VariantCandidate(
                variant_id=variant_id, name=variant.name, profile=self.profiles[variant_id],
                n_ctx=runner.n_ctx, available=available, load_ms=load_ms, unavailable_reason=why,
            ))
        return candidates

    def _residency_of(self, runner: LlamaRunner) -> tuple[bool, float, str | None]:
        """Under a memory budget (issue 7): can it be made resident now, and at what cost in ms
        (waiting out a victim's minimum residency, unloading it, loading this one)?"""
        if self.residency is None:
            return runner.loaded, 0.0, None
        profile = self.profiles.get(runner.variant_id)
        load_ms = self.residency.load_estimate_ms(runner.variant_id, profile.load_ms if profile else None)
        if load_ms is None:
            return False, 0.0, self.residency.unavailable_reason(runner.variant_id)
        return True, load_ms, None

    def _prompt(self, runner: LlamaRunner, request: InferenceRequest,
                hint_tokens: int | None) -> tuple[str, list[int]]:
        if request.messages is not None:
            messages = apply_style_and_hint(request.messages, request.style, hint_tokens, self.policy)
            text = runner.render_chat(messages)
            return text, runner.tokenize(text, chat=True)
        if request.prompt is None:
            raise InvalidRequestError("give `messages` or `prompt`", param="messages")
        return request.prompt, runner.tokenize(request.prompt, chat=False)

    @staticmethod
    def _refusal_error(refusal: Refusal, prompt_tokens: int, runner: LlamaRunner, param: str) -> Exception:
        if refusal.code == "context_length_exceeded":
            return ContextLengthExceededError(prompt_tokens, runner.n_ctx, runner.variant_id, param)
        return RefusedError(f"Cannot answer within the deadline: {refusal.reason}.",
                            code=refusal.code, retry_after_s=refusal.retry_after_s or 1,
                            min_deadline_ms=refusal.min_deadline_ms)

    async def start(self, admission: Admission) -> tuple[Generation, float]:
        """Wait for a CPU slot and start generating; returns the generation and queue ms.
        Raises RefusedError when the deadline can no longer fit the shortest useful answer, and
        RemoteUnavailableError when a remote variant does not take the request."""
        if admission.remote is not None:
            assert admission.remote_request is not None
            remote_generation = await admission.remote.start(admission.remote_request, admission.job)
            self._generations.add(remote_generation)
            return remote_generation, 0.0
        residency, runner = self.residency, admission.runner
        generation, queue_ms = await self.scheduler.start(
            runner, admission.job, admission.decision.predicted_ms, self._min_run_ms(admission),
            prepare=None if residency is None else lambda: residency.ensure(runner))
        self._generations.add(generation)
        return generation, queue_ms

    def cut_short(self) -> int:
        """The grace period of a stop is running out: refuse what still waits for a slot (503)
        and stop every running generation at its next token, so each response still ends
        properly (a final chunk and [DONE]) instead of being cut by the closing connection.
        Returns how many generations were told to stop."""
        self.scheduler.refuse_waiting(ShuttingDownError())
        running = [g for g in self._generations if g.result is None and not g.cancelled]
        for generation in running:
            generation.cancel()
        return len(running)

    def _min_run_ms(self, admission: Admission) -> float:
        """Predicted time of the prompt and the policy's minimum useful tokens."""
        profile = self.profiles.get(admission.variant_id)
        if profile is None:
            return 0.0
        tokens = min(self.policy.routing.min_useful_tokens, admission.job.max_tokens)
        return admission.load_ms + predict_ms(profile, len(admission.job.prompt_tokens), tokens)

    def record(self, admission: Admission, result: GenerationResult) -> None:
        """Fold a finished request into its variant's cost profile, so throttling or a busy CPU
        shows up in the next decision."""
        if admission.remote is not None:
            if admission.remote.profile is not None and result.finish != "cancelled" and result.predicted_n:
                admission.remote.profile = observe(admission.remote.profile, result.prompt_evaluated,
                                                   result.prompt_ms, len(result.token_ms), sum(result.token_ms))
            return
        profile = self.profiles.get(admission.variant_id)
        if profile is None or result.finish == "cancelled":
            return
        self.profiles[admission.variant_id] = observe(
            profile, result.prompt_evaluated, result.prompt_ms, len(result.token_ms), sum(result.token_ms)
        )
        self._updates += 1
        if self._on_profiles_changed is not None and self._updates % 20 == 0:
            self._on_profiles_changed(dict(self.profiles))
