"""From a domain request to a running generation: resolve the model, build the prompt,
check it fits, wait for a slot. No HTTP here, so the same path serves tests and the bench."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from edgeserve.errors import InvalidRequestError, NotReadyError
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.runner import Generation, GenerationJob, LlamaRunner, SamplingParams
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


@dataclass(frozen=True)
class Admission:
    """A request that passed every check and knows where it will run."""

    variant_id: str
    runner: LlamaRunner
    prompt_text: str
    job: GenerationJob

    @property
    def budget_tokens(self) -> int:
        return self.job.max_tokens


class Engine:
    def __init__(self, registry: ModelRegistry, scheduler: Scheduler) -> None:
        self.registry = registry
        self.scheduler = scheduler

    async def admit(self, request: InferenceRequest) -> Admission:
        target = self.registry.resolve(request.model)
        if not self.registry.ready:
            raise NotReadyError(self.registry.loading_status())
        variant = target.pinned or target.family.default
        variant_id = target.variant_id(variant)
        runner = self.registry.runner(variant_id)
        prompt_text, tokens = await asyncio.to_thread(self._prompt, runner, request)
        if not tokens:  # llama.cpp cannot decode zero tokens
            raise InvalidRequestError("The prompt is empty; send at least one character of text.",
                                      param="prompt")
        runner.check_fits(len(tokens))
        room = runner.n_ctx - len(tokens)
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        job = GenerationJob(tokens, max_tokens, request.sampling, request.stop)
        return Admission(variant_id, runner, prompt_text, job)

    @staticmethod
    def _prompt(runner: LlamaRunner, request: InferenceRequest) -> tuple[str, list[int]]:
        if request.messages is not None:
            text = runner.render_chat(request.messages)
            return text, runner.tokenize(text, chat=True)
        if request.prompt is None:
            raise InvalidRequestError("give `messages` or `prompt`", param="messages")
        return request.prompt, runner.tokenize(request.prompt, chat=False)

    async def start(self, admission: Admission) -> tuple[Generation, float]:
        """Wait for a CPU slot and start generating; returns the generation and queue ms."""
        return await self.scheduler.start(admission.runner, admission.job)
