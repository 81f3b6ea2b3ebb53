"""Wire requests (bytes) to domain requests, with errors that name the parameter."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Literal, TypeVar

import msgspec

from edgeserve.errors import InvalidRequestError
from edgeserve.http.schemas import ChatCompletionRequest, CompletionRequest
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.runtime.json_closer import json_object_grammar, json_schema_grammar
from edgeserve.runtime.sequence import SamplingParams

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_LOCATION = re.compile(r" - at `\$\.?(?P<where>[^`]*)`$")

T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    if not body.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _LOCATION.search(message)
        param = match.group("where") if match else None
        reason = message[: match.start()] if match else message
        if reason.startswith("Object missing required field"):
            missing = reason.split("`")[1]
            param = f"{param}.{missing}" if param else missing
            raise InvalidRequestError(f"Missing required parameter '{param}'.", param=param) from exc
        where = f" for '{param}'" if param else ""
        raise InvalidRequestError(f"Invalid value{where}: {reason}.", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(
            f"The request body is not valid JSON ({exc}); send a JSON object in UTF-8."
        ) from exc
    except UnicodeDecodeError as exc:  # msgspec raises this (not DecodeError) for bad UTF-8
        raise InvalidRequestError(
            f"The request body is not valid UTF-8 (byte {exc.start}: {exc.reason}); "
            "send a JSON object in UTF-8."
        ) from exc


def _logprobs(wire: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives per token the request wants log-probabilities for (None: none)."""
    if isinstance(wire, CompletionRequest):
        return wire.logprobs
    return (wire.top_logprobs or 0) if wire.logprobs else None


def _sampling(wire: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    return SamplingParams(
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        seed=wire.seed,
        repeat_penalty=wire.repeat_penalty,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
        logprobs=_logprobs(wire),
    )


def _unsupported(field: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"`{field}` is not supported by edgeserve: {why}. Leave it out; the answer "
                               "would not be what it asks for.", param=field, code="unsupported_parameter")


def refuse_unsupported(wire: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 for every OpenAI field that would change what the answer means and that edgeserve
    does not honour; harmless values of them (the defaults a client may send) pass."""
    if wire.logit_bias:
        raise _unsupported("logit_bias", "token biases are not applied")
    if isinstance(wire, CompletionRequest):
        if wire.echo:
            raise _unsupported("echo", "the prompt is not echoed")
        if wire.suffix:
            raise _unsupported("suffix", "text is not inserted before a suffix")
        if wire.best_of not in (None, 1):
            raise _unsupported("best_of", "one completion is generated per request")
        return
    if wire.response_format is not None and wire.response_format.get("type") not in FORMATS:
        raise InvalidRequestError(f"`response_format.type` must be one of {', '.join(FORMATS)}, got "
                                  f"{str(wire.response_format.get('type'))[:40]!r}.", param="response_format")
    if wire.tools:
        raise _unsupported("tools", "tool calls are not parsed for any model it serves (their chat templates "
                           "have no tool support)")
    if wire.functions:
        raise _unsupported("functions", "function calls are not parsed")
    for field in ("tool_choice", "function_call"):
        choice = getattr(wire, field)
        if choice is not None and choice != "none":
            raise _unsupported(field, "there are no tools to call; only \"none\" is accepted")
    if wire.top_logprobs is not None and not wire.logprobs:
        raise InvalidRequestError("`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
    if wire.modalities is not None and wire.modalities != ["text"]:
        raise _unsupported("modalities", "it answers in text only")
    for field in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if getattr(wire, field) is not None:
            raise _unsupported(field, "its models and runtime have no such feature")


FORMATS = ("text", "json_object", "json_schema")


def _schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    """`response_format.json_schema.schema`, a JSON object."""
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequestError("`response_format.json_schema.schema` must be a JSON schema object.",
                                  param="response_format.json_schema.schema")
    return schema


def _grammar_of(schema: dict[str, Any]) -> str:
    try:
        return json_schema_grammar(schema)
    except ValueError as exc:
        raise InvalidRequestError(f"{exc}; simplify it (types, properties, required, items, enum).",
                                  param="response_format.json_schema.schema") from exc


def parse_chat(body: bytes) -> tuple[ChatCompletionRequest, InferenceRequest]:
    wire = _decode(_chat_decoder, body)
    refuse_unsupported(wire)
    # "developer" is the newer name of "system"; chat templates only know the latter.
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in wire.messages
    ]
    max_tokens = wire.max_completion_tokens if wire.max_completion_tokens is not None else wire.max_tokens
    kind = None if wire.response_format is None else wire.response_format.get("type")
    structured = kind in ("json_object", "json_schema")
    schema = _schema_of(wire.response_format) if kind == "json_schema" and wire.response_format else None
    sampling = _sampling(wire)
    if structured:
        sampling = replace(sampling, grammar=json_object_grammar() if schema is None else _grammar_of(schema))
    request = InferenceRequest(
        model=wire.model,
        messages=messages,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(wire.stop_list()),
        structured=structured,
        schema=schema,
    )
    return wire, request


def parse_completion(body: bytes) -> tuple[CompletionRequest, InferenceRequest]:
    wire = _decode(_completion_decoder, body)
    refuse_unsupported(wire)
    request = InferenceRequest(
        model=wire.model,
        prompt=wire.prompt_text(),
        max_tokens=wire.max_tokens,
        sampling=_sampling(wire),
        stop=tuple(wire.stop_list()),
    )
    return wire, request


MAX_DEADLINE_MS = 3_600_000


def parse_deadline_ms(value: str | None, default_ms: int | None) -> int | None:
    """`X-Deadline-Ms`: milliseconds from arrival, an integer in 1..3,600,000."""
    if value is None:
        return default_ms
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_DEADLINE_MS:
        raise InvalidRequestError(
            f"Header X-Deadline-Ms must be an integer number of milliseconds from 1 to "
            f"{MAX_DEADLINE_MS:,}, got {value[:40]!r}.",
            param="X-Deadline-Ms",
            code="invalid_deadline",
        )
    return int(text)


def parse_switch(value: str | None, header: str) -> bool | None:
    """`on`/`off` headers such as X-Budget-Hint; absent means the policy's default."""
    if value is None:
        return None
    text = value.strip().lower()
    if text not in ("on", "off"):
        raise InvalidRequestError(f"Header {header} must be 'on' or 'off', got {value[:40]!r}.", param=header)
    return text == "on"


def parse_forcing(value: str | None) -> Literal["on", "off", "auto"] | None:
    """X-Answer-Forcing: on, off, or auto (the router decides from the measured curves)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == "on":
        return "on"
    if text == "off":
        return "off"
    if text == "auto":
        return "auto"
    raise InvalidRequestError(f"Header X-Answer-Forcing must be 'on', 'off' or 'auto', got {value[:40]!r}.",
                              param="X-Answer-Forcing")


def parse_name(value: str | None) -> str | None:
    """A header that names something the pipeline checks against the family's policy
    (X-Prompt-Style): trimmed and lower-cased; absent means the policy's default."""
    return None if value is None else value.strip().lower()
