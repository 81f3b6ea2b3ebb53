"""OpenAI wire schemas (msgspec). Limits here are what a 400 names; meaning lives in the domain."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1000)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
StopList = Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=4)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
_REFUSED = "Not supported by edgeserve: a request that sets it gets a 400 naming it"
Json = dict[str, Any]  # a JSON object, whatever is in it


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    model: ModelName
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 40
    seed: Seed | None = None
    stop: Annotated[str, Meta(min_length=1, max_length=256)] | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repeat_penalty: Annotated[float, Meta(ge=0.0, le=10.0)] = 1.0
    # Harmless: accepted, and they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # They would change what the answer means, and are not supported: a 400 names them
    # (http.parse.refuse_unsupported) instead of an answer that ignores them.
    logit_bias: Annotated[dict[str, float] | None, Meta(description=_REFUSED)] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    parallel_tool_calls: bool | None = None  # harmless without tools
    response_format: Annotated[Json | None, Meta(
        description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}: JSON '
                    'sampled under a grammar, closed into valid JSON if cut short; or {"type": "text"}')] = None
    tools: Annotated[list[Any] | None, Meta(description=_REFUSED + " (an empty list is accepted)")] = None
    tool_choice: Annotated[str | Json | None, Meta(description=_REFUSED + ' ("none" is accepted)')] = None
    functions: Annotated[list[Any] | None, Meta(description=_REFUSED)] = None
    function_call: Annotated[str | Json | None, Meta(description=_REFUSED + ' ("none" is accepted)')] = None
    logprobs: bool | None = None  # the sampled tokens' log-probabilities (local variants)
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # and this many alternatives (needs logprobs)
    audio: Annotated[Json | None, Meta(description=_REFUSED)] = None
    modalities: Annotated[list[str] | None, Meta(description=_REFUSED + ' (only ["text"])')] = None
    prediction: Annotated[Json | None, Meta(description=_REFUSED)] = None
    reasoning_effort: Annotated[str | None, Meta(description=_REFUSED)] = None
    web_search_options: Annotated[Json | None, Meta(description=_REFUSED)] = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: Annotated[str, Meta(max_length=4_000_000)] | Annotated[list[str], Meta(min_length=1, max_length=1)]
    max_tokens: MaxTokens | None = 16
    echo: Annotated[bool, Meta(description=_REFUSED + " (false is accepted)")] = False
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # log-probabilities, with this many alternatives
    suffix: Annotated[str | None, Meta(description=_REFUSED)] = None
    best_of: Annotated[int | None, Meta(description=_REFUSED + " (1 is accepted)")] = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---- responses -------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV was reused (a prefix shared with a recent prompt)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Timings(msgspec.Struct):
    """llama-server-style timings of one generation."""

    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    cache_n: int = 0  # prompt tokens taken from the KV cache (not evaluated)
    draft_n: int = 0  # speculative pairs: tokens the draft proposed
    draft_n_accepted: int = 0  # of which the target agreed with


class EdgeserveInfo(msgspec.Struct):
    """What edgeserve decided and what happened; `finish` is finer than OpenAI's finish_reason
    (`stop`, `length`, `deadline` or `cancelled`)."""

    variant: str
    deadline_ms: int | None
    predicted_ms: float
    actual_ms: float
    queue_ms: float
    budget_tokens: int
    hint_tokens: int | None
    finish: str
    reason: str
    style: str | None = None  # the style instruction added to the prompt (None: none)
    answer_forcing: bool = False  # whether the answer was forced when the budget or time ran short
    drafted_tokens: int = 0  # speculative pairs: tokens the draft variant proposed
    accepted_tokens: int = 0  # of which the target agreed with (each saved the target a step)
    # response_format json_object: the answer ran out of tokens or time inside the JSON and was
    # finished with the shortest closing that makes it valid (open strings, arrays, objects)
    structure_closed_early: bool = False


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(msgspec.Struct):
    """One sampled token of a chat answer: its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[ContentLogprob]


class TextLogprobs(msgspec.Struct):
    """A text completion's log-probabilities, in the legacy completions format."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(msgspec.Struct):
    content: str
    role: Literal["assistant"] = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    edgeserve: EdgeserveInfo
    timings: Timings
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True, tag_field="object",
                          tag="chat.completion.chunk"):
    """`object` is a tag so that omit_defaults cannot drop it (clients need it)."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    edgeserve: EdgeserveInfo | None = None
    timings: Timings | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: TextLogprobs | None = None


class TextCompletion(msgspec.Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    edgeserve: EdgeserveInfo | None = None
    timings: Timings | None = None


class ModelCard(msgspec.Struct, omit_defaults=True, tag_field="object", tag="model"):
    id: str
    created: int
    owned_by: str
    kind: str
    variants: list[str] | None = None
    family: str | None = None
    quant: str | None = None
    path: str | None = None
    n_ctx: int | None = None
    loaded: bool | None = None  # a remote: probed and its circuit closed
    base_url: str | None = None  # a remote variant's API
    remote_model: str | None = None  # the `model` it is asked for
    status: str | None = None  # why a remote is not routable now


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
