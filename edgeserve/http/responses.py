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
    ChoiceLogprobs,
    ChunkChoice,
    ContentLogprob,
    Delta,
    EdgeserveInfo,
    FinishReason,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    Timings,
    TopLogprob,
    Usage,
)
from edgeserve.pipeline.admission import Admission
from edgeserve.pipeline.run import Run
from edgeserve.runtime.sequence import GenerationResult, TokenLogprob

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

    @property
    def wants_logprobs(self) -> bool:
        return self.run.request.sampling.logprobs is not None

    def headers(self) -> dict[str, str]:
        return {
            "X-Request-Id": self.request_id,
            "X-Edgeserve-Variant": str(self.admission.variant_id),
            "X-Edgeserve-Budget-Tokens": str(self.admission.budget_tokens),
            "X-Edgeserve-Predicted-Ms": f"{self.admission.decision.predicted_ms:.0f}",
        }


def finish_reason(result: GenerationResult) -> FinishReason:
    """OpenAI knows only `stop` and `length`; the edgeserve object says what really happened. A
    structured answer closed early is complete JSON: `stop` (clients such as the openai parse
    helper refuse to parse a `length` one), with `structure_closed_early` and `finish` saying why."""
    return "stop" if result.finish == "stop" or result.closed_early else "length"


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
        structure_closed_early=result.closed_early,
    )


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs([
        ContentLogprob(_text(lp.piece), lp.logprob, list(lp.piece),
                       [TopLogprob(_text(piece), value, list(piece)) for piece, value in lp.top])
        for lp in logprobs])


def text_logprobs(logprobs: list[TokenLogprob], offset: int = 0) -> TextLogprobs:
    """The legacy format; `offset`: where in the completion's text the first token starts."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(_text(lp.piece))
    return TextLogprobs([_text(lp.piece) for lp in logprobs], [lp.logprob for lp in logprobs],
                        [{_text(piece): value for piece, value in lp.top} for lp in logprobs], offsets)


def full_body(ctx: CompletionContext, text: str, result: GenerationResult,
              logprobs: list[TokenLogprob] | None = None) -> bytes:
    """`logprobs`: the sampled tokens' (when the request asked for them)."""
    if ctx.kind == "chat":
        return _encoder.encode(ChatCompletion(
            id=ctx.response_id, created=ctx.created, model=ctx.model,
            choices=[ChatChoice(0, AssistantMessage(text), finish_reason(result),
                                None if logprobs is None else chat_logprobs(logprobs))],
            usage=usage_of(result), edgeserve=info_of(ctx, result), timings=timings_of(result),
        ))
    return _encoder.encode(TextCompletion(
        id=ctx.response_id, created=ctx.created, model=ctx.model,
        choices=[TextChoice(0, text, finish_reason(result), None if logprobs is None else text_logprobs(logprobs))],
        usage=usage_of(result), edgeserve=info_of(ctx, result), timings=timings_of(result),
    ))


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """SSE frames of one stream; encoders are built once and reused per token."""

    def __init__(self, ctx: CompletionContext) -> None:
        self.ctx = ctx
        self._offset = 0  # text completions: where the next token's text starts (text_offset)

    def first(self) -> bytes | None:
        """Chat streams open with the assistant role, like OpenAI's."""
        if self.ctx.kind != "chat":
            return None
        return sse(_encoder.encode(ChatCompletionChunk(
            id=self.ctx.response_id, created=self.ctx.created, model=self.ctx.model,
            choices=[ChunkChoice(0, Delta(role="assistant", content=""))],
        )))

    def piece(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        """A chunk of text, with the log-probabilities of the tokens sampled for it (when asked)."""
        ctx = self.ctx
        if ctx.kind == "chat":
            return sse(_encoder.encode(ChatCompletionChunk(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[ChunkChoice(0, Delta(content=text), None,
                                     None if logprobs is None else chat_logprobs(logprobs))],
            )))
        return sse(_encoder.encode(TextCompletion(
            id=ctx.response_id, created=ctx.created, model=ctx.model,
            choices=[TextChoice(0, text, None, self._text_logprobs(logprobs))],
        )))

    def _text_logprobs(self, logprobs: list[TokenLogprob] | None) -> TextLogprobs | None:
        if logprobs is None:
            return None
        found = text_logprobs(logprobs, self._offset)
        self._offset += sum(len(token) for token in found.tokens)
        return found

    def last(self, result: GenerationResult, include_usage: bool,
             logprobs: list[TokenLogprob] | None = None) -> bytes:
        """The finishing chunk carries finish_reason, the edgeserve object and timings (and the
        log-probabilities of tokens whose text was held back, when asked); with
        stream_options.include_usage a usage-only chunk follows, as OpenAI sends it."""
        ctx = self.ctx
        info, timings = info_of(ctx, result), timings_of(result)
        usage_chunk: ChatCompletionChunk | TextCompletion
        if ctx.kind == "chat":
            final = _encoder.encode(ChatCompletionChunk(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[ChunkChoice(0, Delta(), finish_reason(result),
                                     None if logprobs is None else chat_logprobs(logprobs))],
                edgeserve=info, timings=timings,
            ))
            usage_chunk = ChatCompletionChunk(id=ctx.response_id, created=ctx.created,
                                              model=ctx.model, choices=[], usage=usage_of(result))
        else:
            final = _encoder.encode(TextCompletion(
                id=ctx.response_id, created=ctx.created, model=ctx.model,
                choices=[TextChoice(0, "", finish_reason(result), self._text_logprobs(logprobs))],
                edgeserve=info, timings=timings,
            ))
            usage_chunk = TextCompletion(id=ctx.response_id, created=ctx.created, model=ctx.model,
                                         choices=[], usage=usage_of(result))
        frames = sse(final)
        if include_usage:
            frames += sse(_encoder.encode(usage_chunk))
        return frames + DONE
