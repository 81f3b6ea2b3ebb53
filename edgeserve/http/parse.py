"""Wire requests (bytes) to domain requests, with errors that name the parameter."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from edgeserve.errors import InvalidRequestError
from edgeserve.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from edgeserve.runtime.runner import SamplingParams
from edgeserve.service import InferenceRequest

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


def _sampling(wire: SamplingFields) -> SamplingParams:
    return SamplingParams(
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        seed=wire.seed,
        repeat_penalty=wire.repeat_penalty,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
    )


def parse_chat(body: bytes) -> tuple[ChatCompletionRequest, InferenceRequest]:
    wire = _decode(_chat_decoder, body)
    # "developer" is the newer name of "system"; chat templates only know the latter.
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in wire.messages
    ]
    max_tokens = wire.max_completion_tokens if wire.max_completion_tokens is not None else wire.max_tokens
    request = InferenceRequest(
        model=wire.model,
        messages=messages,
        max_tokens=max_tokens,
        sampling=_sampling(wire),
        stop=tuple(wire.stop_list()),
    )
    return wire, request


def parse_completion(body: bytes) -> tuple[CompletionRequest, InferenceRequest]:
    wire = _decode(_completion_decoder, body)
    if wire.echo:
        raise InvalidRequestError("`echo` is not supported; leave it false.", param="echo")
    request = InferenceRequest(
        model=wire.model,
        prompt=wire.prompt_text(),
        max_tokens=wire.max_tokens,
        sampling=_sampling(wire),
        stop=tuple(wire.stop_list()),
    )
    return wire, request
