"""edgeserve/http/parse.py and schemas.py: wire bytes to domain requests, errors naming the param."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeserve.errors import InvalidRequestError
from edgeserve.http.parse import parse_chat, parse_completion
from edgeserve.runtime.sequence import SamplingParams

USER = {"role": "user", "content": "What is 2+2?"}
OMIT = object()


def chat_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "smollm2-135m", "messages": [USER]}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not OMIT}).encode()


def completion_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "smollm2-135m", "prompt": "Once upon a time"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not OMIT}).encode()


def chat_error(body: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat(body)
    return info.value


# ---- valid chat bodies -------------------------------------------------------------------------


def test_minimal_chat() -> None:
    wire, request = parse_chat(chat_body())
    assert request.model == "smollm2-135m"
    assert request.messages == [{"role": "user", "content": "What is 2+2?"}]
    assert request.prompt is None
    assert request.max_tokens is None
    assert request.stop == ()
    assert request.sampling == SamplingParams()
    assert wire.stream is False


def test_developer_role_becomes_system() -> None:
    messages = [{"role": "developer", "content": "Be brief."}, USER]
    _, request = parse_chat(chat_body(messages=messages))
    assert request.messages is not None
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert request.messages[0]["content"] == "Be brief."


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    _, request = parse_chat(chat_body(max_tokens=5, max_completion_tokens=7))
    assert request.max_tokens == 7
    _, request = parse_chat(chat_body(max_tokens=5))
    assert request.max_tokens == 5
    _, request = parse_chat(chat_body(max_completion_tokens=3))
    assert request.max_tokens == 3


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("###", ("###",)), (["a", "bc"], ("a", "bc")), (None, ()), ([], ())],
)
def test_stop_as_string_or_list(stop: Any, expected: tuple[str, ...]) -> None:
    _, request = parse_chat(chat_body(stop=stop))
    assert request.stop == expected


def test_content_as_list_of_text_parts() -> None:
    content = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    _, request = parse_chat(chat_body(messages=[{"role": "user", "content": content}]))
    assert request.messages == [{"role": "user", "content": "What is 2+2?"}]


def test_null_content_is_empty_text() -> None:
    messages = [USER, {"role": "assistant", "content": None}]
    _, request = parse_chat(chat_body(messages=messages))
    assert request.messages is not None
    assert request.messages[1] == {"role": "assistant", "content": ""}


def test_sampling_fields_reach_the_domain() -> None:
    _, request = parse_chat(
        chat_body(temperature=0.2, top_p=0.9, top_k=10, seed=42, presence_penalty=0.5,
                  frequency_penalty=-0.5, repeat_penalty=1.1)
    )
    assert request.sampling == SamplingParams(
        temperature=0.2, top_p=0.9, top_k=10, seed=42, presence_penalty=0.5,
        frequency_penalty=-0.5, repeat_penalty=1.1,
    )


def test_openai_client_extras_are_accepted() -> None:
    wire, _ = parse_chat(
        chat_body(stream=True, stream_options={"include_usage": True}, n=1, user="u-1",
                  logit_bias=None, metadata={"x": "y"})
    )
    assert wire.stream is True
    assert wire.stream_options is not None and wire.stream_options.include_usage


# ---- valid completion bodies -------------------------------------------------------------------


def test_completion_prompt_string_and_default_max_tokens() -> None:
    _, request = parse_completion(completion_body())
    assert request.prompt == "Once upon a time"
    assert request.messages is None
    assert request.max_tokens == 16  # OpenAI's default for /v1/completions


def test_completion_prompt_as_single_item_list_and_stop_list() -> None:
    _, request = parse_completion(completion_body(prompt=["Hello"], stop=["\n", "."],
                                                  max_tokens=4))
    assert request.prompt == "Hello"
    assert request.stop == ("\n", ".")
    assert request.max_tokens == 4


def test_completion_prompt_list_of_two_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(completion_body(prompt=["a", "b"]))
    assert info.value.param == "prompt"


def test_completion_echo_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(completion_body(echo=True))
    assert info.value.param == "echo"
    assert "echo" in info.value.message


def test_completion_echo_false_is_fine() -> None:
    _, request = parse_completion(completion_body(echo=False))
    assert request.prompt == "Once upon a time"


# ---- bodies that are not JSON ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": smollm2}',
        b"{'model': 'smollm2'}",
        b'{"model": "x", "messages": [}',
        b"not json at all",
    ],
    ids=["bare-word", "single-quotes", "broken-array", "text"],
)
def test_malformed_json(body: bytes) -> None:
    error = chat_error(body)
    assert error.param is None
    assert "not valid JSON" in error.message


def test_truncated_json() -> None:
    error = chat_error(chat_body()[:-7])
    assert error.param is None
    assert "not valid JSON" in error.message
    assert "truncated" in error.message


@pytest.mark.parametrize("body", [b"", b"   \n\t"], ids=["empty", "whitespace"])
def test_empty_body(body: bytes) -> None:
    error = chat_error(body)
    assert error.param is None
    assert "empty" in error.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "\xff\xfe", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "x", "messages": [{"role": "user", "content": "caf\xe9"}]}',
    ],
    ids=["bad-start-byte", "latin1"],
)
def test_invalid_utf8(body: bytes) -> None:
    """Raw bytes that are not UTF-8 are the client's error (400), not a server crash."""
    error = chat_error(body)
    assert error.param is None
    assert "UTF-8" in error.message


def test_invalid_utf8_in_completion_prompt() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(b'{"model": "x", "prompt": "caf\xe9"}')
    assert "UTF-8" in info.value.message


def test_top_level_array() -> None:
    error = chat_error(b"[1, 2]")
    assert "object" in error.message


# ---- bodies with invalid fields ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "hint"),
    [
        ({"max_tokens": "5"}, "max_tokens", "got `str`"),
        ({"max_tokens": -1}, "max_tokens", ">= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
        ({"temperature": -0.1}, "temperature", ">= 0.0"),
        ({"temperature": 2.5}, "temperature", "<= 2.0"),
        ({"top_p": 0}, "top_p", "> 0.0"),
        ({"n": 2}, "n", "<= 1"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"messages": []}, "messages", "length >= 1"),
        ({"messages": "hi"}, "messages", "got `str`"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'tool'"),
        ({"messages": [USER, {"role": 1, "content": "x"}]}, "messages[1].role", "got `int`"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "got `int`"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "length <= 4"),
        ({"stop": ""}, "stop", "length >= 1"),
        ({"model": ""}, "model", "length >= 1"),
        ({"model": 3}, "model", "got `int`"),
        ({"stream": "yes"}, "stream", "got `str`"),
    ],
)
def test_invalid_field_names_the_param(fields: dict[str, Any], param: str, hint: str) -> None:
    error = chat_error(chat_body(**fields))
    assert error.param == param
    assert f"'{param}'" in error.message
    assert hint in error.message


@pytest.mark.parametrize(
    ("omit", "param"),
    [("model", "model"), ("messages", "messages")],
)
def test_missing_required_field(omit: str, param: str) -> None:
    error = chat_error(chat_body(**{omit: OMIT}))
    assert error.param == param
    assert error.message == f"Missing required parameter '{param}'."


def test_missing_nested_required_field() -> None:
    error = chat_error(chat_body(messages=[USER, {"content": "no role"}]))
    assert error.param == "messages[1].role"
    assert "messages[1].role" in error.message


def test_completion_invalid_fields() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(completion_body(prompt=OMIT))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(completion_body(max_tokens="5"))
    assert info.value.param == "max_tokens"


# ---- fields that change what the answer means: honoured or a 400 naming them ---------------------

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("field,value", [
    ("tools", [TOOL]),
    ("tool_choice", "auto"),
    ("tool_choice", {"type": "function", "function": {"name": "get_time"}}),
    ("functions", [TOOL["function"]]),
    ("function_call", "auto"),
    ("logit_bias", {"50256": -100}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"),
    ("web_search_options", {}),
])
def test_chat_fields_that_would_be_ignored_are_refused_by_name(field: str, value: Any) -> None:
    error = chat_error(chat_body(**{field: value}))
    assert error.param == field and error.code == "unsupported_parameter"
    assert f"`{field}` is not supported" in error.message


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"}, {"function_call": "none"},
    {"logprobs": False}, {"modalities": ["text"]}, {"logit_bias": {}}, {"parallel_tool_calls": True},
    {"user": "u1", "metadata": {"app": "demo"}, "store": False, "service_tier": "auto"},
])
def test_harmless_values_and_fields_are_accepted(fields: dict[str, Any]) -> None:
    parse_chat(chat_body(**fields))


@pytest.mark.parametrize("field,value", [("suffix", "The end."), ("best_of", 3),
                                         ("logit_bias", {"1": 5})])
def test_completion_fields_that_would_be_ignored_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_completion(completion_body(**{field: value}))
    assert info.value.param == field and info.value.code == "unsupported_parameter"
    parse_completion(completion_body(best_of=1, user="u1"))


def test_logprobs_become_the_sampling_s_count_of_alternatives() -> None:
    assert parse_chat(chat_body(logprobs=True, top_logprobs=3))[1].sampling.logprobs == 3
    assert parse_chat(chat_body(logprobs=True))[1].sampling.logprobs == 0
    assert parse_chat(chat_body(logprobs=False))[1].sampling.logprobs is None
    assert parse_completion(completion_body(logprobs=2))[1].sampling.logprobs == 2
    error = chat_error(chat_body(top_logprobs=2))
    assert error.param == "top_logprobs" and "logprobs: true" in error.message
    assert chat_error(chat_body(logprobs=True, top_logprobs=21)).param == "top_logprobs"


def test_json_mode_samples_under_the_json_grammar() -> None:
    _, request = parse_chat(chat_body(response_format={"type": "json_object"}))
    assert request.structured and request.sampling.grammar is not None and "root" in request.sampling.grammar
    _, plain = parse_chat(chat_body(response_format={"type": "text"}))
    assert not plain.structured and plain.sampling.grammar is None


def test_a_json_schema_becomes_its_grammar() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    _, request = parse_chat(chat_body(response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": schema, "strict": True}}))
    assert request.structured and request.schema == schema
    assert request.sampling.grammar is not None and '"\\"n\\""' in request.sampling.grammar


@pytest.mark.parametrize("response_format,param", [
    ({"type": "yaml"}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}, "response_format.json_schema.schema"),
])
def test_a_bad_response_format_is_named(response_format: dict[str, Any], param: str) -> None:
    assert chat_error(chat_body(response_format=response_format)).param == param
