"""Build OpenAI response bodies and SSE frames from a finished or running generation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from edgeserve.http.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    EdgeserveInfo,
    FinishReason,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    Timings,
    Usage,
)
from edgeserve.pipeline.admission import Admission
from edgeserve.pipeline.run import Run
from edgeserve.runtime.sequence import GenerationResult

_encoder = msgspec.json.Encoder()


@dataclass
class CompletionContext:
    """Everything a response needs besides the text: ids, timing and the admitted run."""

    request_id: str
    kind: str  # "chat" or "text"
    run: Run
    created: int = 0

    def __post_init__(self) -> None:
        self.created = int(time.time())

    @property
    def admission(self) -> Admission:
        return self.run.admission

    @property
    def arrived(self) -> float:
        return self.run.request.arrived  # time.perf_counter() at arrival

    @property
    def deadline_ms(self) -> int | None:
        return self.run.request.deadline_ms

    @property
    def queue_ms(self) -> float:
        return self.run.queue_ms

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.request_id}"

    @property
    def model(self) -> str:
        return str(self.admission.variant_id)

    def headers(self) -> dict[str, str]:
        return {
            "X-Request-Id": self.request_id,
            "X-Edgeserve-Variant": str(self.admission.variant_id),
            "X-Edgeserve-Budget-Tokens": str(self.admission.budget_tokens),
            "X-Edgeserve-Predicted-Ms": f"{self.admission.decision.predicted_ms:.0f}",
        }


def finish_reason(result: GenerationResult) -> FinishReason:
    """OpenAI knows only `stop` and `length`; the edgeserve object says what really happened."""
    return "stop" if result.finish == "stop" else "length"


def usage_of(result: GenerationResult) -> Usage:
    return Usage(result.prompt_n, result.predicted_n, result.prompt_n + result.predicted_n,
                 PromptTokensDetails(result.cache_n))


def timings_of(result: GenerationResult) -> Timings:
    return Timings(result.prompt_n, round(result.prompt_ms, 3), result.predicted_n,
                   round(result.predicted_ms, 3), result.cache_n, result.drafted_n, result.accepted_n)


def info_of(ctx: CompletionContext, result: GenerationResult) -> EdgeserveInfo:
    decision = ctx.admission.decision
    return EdgeserveInfo(
        variant=str(ctx.admission.variant_id),
        deadline_ms=ctx.deadline_ms,
        predicted_ms=round(decision.predicted_ms, 1),
        actual_ms=round((time.perf_counter() - ctx.arrived) * 1000, 1),
        queue_ms=round(ctx.queue_ms, 1),
        budget_tokens=ctx.admission.budget_tokens,
        hint_tokens=decision.hint_tokens,
        finish=result.finish,
        reason=decision.reason,
        style=ctx.admission.style,
        answer_forcing=ctx.admission.job.forcing is not None,
        drafted_tokens=result.drafted_n,
        accepted_tokens=result.accepted_n,
    )


def full_body(ctx: CompletionContext, text: str, result: GenerationResult) -> bytes:
    if ctx.kind == "chat":
        return _encoder.encode(ChatCompletion(
            id=ctx.response_id, created=ctx.created, model=ctx.model,
            choices=[ChatChoice(0, AssistantMessage(text), finish_reason(result))],
            usage=usage_of(result), edgeserve=info_of(ctx, result), timings=timings_of(result),
        ))
    return _encoder.encode(TextCompletion(
        id=ctx.response_id, created=ctx.created, model=ctx.model,
        choices=[TextChoice(0, text, finish_reason(result))],
        usage=usage_of(result), edgeserve=info_of(ctx, result), timings=timings_of(result),
    ))


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """SSE frames of one stream; encoders are built once and reused per token."""

    def __init__(self, ctx: CompletionContext) -> None:
        self.ctx = ctx

    def first(self) -> bytes | None:
        """Chat streams open with the assistant role, like OpenAI's."""
        if self.ctx.kind != "chat":
            return None
        return sse(_encoder.encode(ChatCompletionChunk(
            id=self.ctx.response_id, created=self.ctx.created, model=self.ctx.model,
            choices=[ChunkChoice(0, Delta(role="assistant", content=""))],
        )))

    def piece(self, text: str) -> bytes:
        ctx = self.ctx
        if ctx.kind == "chat":
            return sse(_encoder.encode(ChatCompletionChunk(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[ChunkChoice(0, Delta(content=text))],
            )))
        return sse(_encoder.encode(TextCompletion(
            id=ctx.response_id, created=ctx.created, model=ctx.model,
            choices=[TextChoice(0, text, None)],
        )))

    def last(self, result: GenerationResult, include_usage: bool) -> bytes:
        """The finishing chunk carries finish_reason, the edgeserve object and timings;
        with stream_options.include_usage a usage-only chunk follows, as OpenAI sends it."""
        ctx = self.ctx
        info, timings = info_of(ctx, result), timings_of(result)
        usage_chunk: ChatCompletionChunk | TextCompletion
        if ctx.kind == "chat":
            final = _encoder.encode(ChatCompletionChunk(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[ChunkChoice(0, Delta(), finish_reason(result))],
                edgeserve=info, timings=timings,
            ))
            usage_chunk = ChatCompletionChunk(id=ctx.response_id, created=ctx.created,
                                              model=ctx.model, choices=[], usage=usage_of(result))
        else:
            final = _encoder.encode(TextCompletion(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[TextChoice(0, "", finish_reason(result))], edgeserve=info, timings=timings,
            ))
            usage_chunk = TextCompletion(id=ctx.response_id, created=ctx.created, model=ctx.model,
                                         choices=[], usage=usage_of(result))
        frames = sse(final)
        if include_usage:
            frames += sse(_encoder.encode(usage_chunk))
        return frames + DONE
