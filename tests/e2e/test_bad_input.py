"""Bad input against a real edgeserve process: every case is a 4xx in the OpenAI error format
that names the parameter, runs no generation, logs no server error, and the next request
succeeds. Never a 500."""

from __future__ import annotations

import json
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import FAMILY, VARIANTS, Server

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
LONG_TEXT = " ".join(["word"] * 3000)  # more tokens than n_ctx = 2048


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": FAMILY, "messages": HELLO, "max_tokens": 2, **fields}


@dataclass(frozen=True)
class Case:
    id: str
    body: dict[str, Any] | bytes | None
    status: int = 400
    param: str | None = None
    code: str | None = None
    mentions: tuple[str, ...] = ()  # words the message must contain (besides the param)
    path: str = CHAT
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()


CASES = [
    Case("malformed-json", b'{"model": "smollm2-135m", "messages": [', mentions=("JSON",)),
    Case("truncated-json", b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hel',
         mentions=("JSON", "truncated")),
    Case("trailing-garbage", b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}}',
         mentions=("JSON",)),
    Case("empty-body", b"", mentions=("empty",)),
    Case("not-an-object", b"[1, 2]", mentions=("object",)),
    Case("invalid-utf8", b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\xff"}]}',
         mentions=("UTF-8",)),
    Case("missing-model", {"messages": HELLO}, param="model"),
    Case("missing-messages", {"model": FAMILY}, param="messages"),
    Case("max-tokens-string", chat(max_tokens="5"), param="max_tokens", mentions=("str",)),
    Case("max-tokens-negative", chat(max_tokens=-5), param="max_tokens"),
    Case("max-tokens-zero", chat(max_tokens=0), param="max_tokens"),
    Case("max-tokens-float", chat(max_tokens=2.5), param="max_tokens"),
    Case("max-tokens-huge", chat(max_tokens=10**7), param="max_tokens", mentions=("1000000",)),
    Case("max-tokens-beyond-64-bits", chat(max_tokens=2**70), param="max_tokens"),
    Case("messages-not-a-list", chat(messages={"role": "user", "content": "hi"}), param="messages"),
    Case("content-number", chat(messages=[{"role": "user", "content": 7}]), param="messages[0].content"),
    Case("max-completion-tokens-negative", chat(max_completion_tokens=-1),
         param="max_completion_tokens"),
    Case("temperature-negative", chat(temperature=-1), param="temperature"),
    Case("temperature-string", chat(temperature="hot"), param="temperature"),
    Case("top-p-zero", chat(top_p=0), param="top_p"),
    Case("n-2", chat(n=2), param="n"),
    Case("stream-not-bool", chat(stream="yes"), param="stream"),
    Case("stop-too-many", chat(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("stop-too-many-hundreds", chat(stop=["x"] * 500), param="stop"),
    Case("empty-messages", chat(messages=[]), param="messages"),
    Case("message-not-object", chat(messages=["hello"]), param="messages[0]"),
    Case("unknown-role", chat(messages=[{"role": "wizard", "content": "hi"}]),
         param="messages[0].role", mentions=("wizard",)),
    Case("image-part", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]}]),
         param="messages[0].content[0].type"),
    Case("model-empty", chat(model=""), param="model"),
    Case("model-not-string", chat(model=7), param="model"),
    Case("unknown-model", chat(model="gpt-4o"), status=404, param="model", code="model_not_found",
         mentions=("gpt-4o", FAMILY)),
    Case("unknown-variant", chat(model=f"{FAMILY}:q3_k"), status=404, param="model",
         code="model_not_found", mentions=(f"{FAMILY}:q3_k", *VARIANTS)),
    Case("unknown-model-streaming", chat(model="nope", stream=True), status=404, param="model",
         code="model_not_found"),
    Case("context-too-long", chat(messages=[{"role": "user", "content": LONG_TEXT}]),
         param="messages", code="context_length_exceeded", mentions=("2048",)),
    Case("context-too-long-streaming",
         chat(messages=[{"role": "user", "content": LONG_TEXT}], stream=True),
         param="messages", code="context_length_exceeded", mentions=("2048",)),
    Case("text-context-too-long", {"model": FAMILY, "prompt": LONG_TEXT, "max_tokens": 2},
         path=TEXT, param="prompt", code="context_length_exceeded", mentions=("2048",)),
    Case("text-missing-prompt", {"model": FAMILY}, path=TEXT, param="prompt"),
    Case("text-prompt-tokens", {"model": FAMILY, "prompt": [1, 2, 3]}, path=TEXT,
         param="prompt[0]"),
    Case("text-empty-prompt", {"model": FAMILY, "prompt": "", "max_tokens": 2}, path=TEXT,
         param="prompt"),
    Case("text-echo", {"model": FAMILY, "prompt": "hi", "echo": True}, path=TEXT, param="echo",
         code="unsupported_parameter"),
    Case("response-format-yaml", chat(response_format={"type": "yaml"}), param="response_format"),
    Case("json-schema-missing", chat(response_format={"type": "json_schema"}),
         param="response_format.json_schema.schema"),
    Case("tools", chat(tools=[{"type": "function", "function": {"name": "now", "parameters": {}}}]),
         param="tools", code="unsupported_parameter"),
    Case("top-logprobs-alone", chat(top_logprobs=2), param="top_logprobs"),
    Case("top-logprobs-too-many", chat(logprobs=True, top_logprobs=50), param="top_logprobs"),
    Case("logit-bias", chat(logit_bias={"42": 10}), param="logit_bias", code="unsupported_parameter"),
    Case("text-suffix", {"model": FAMILY, "prompt": "hi", "suffix": "end"}, path=TEXT, param="suffix",
         code="unsupported_parameter"),
    Case("text-max-tokens-negative", {"model": FAMILY, "prompt": "hi", "max_tokens": -1},
         path=TEXT, param="max_tokens"),
    Case("deadline-not-a-number", chat(), headers=(("X-Deadline-Ms", "soon"),),
         param="X-Deadline-Ms", code="invalid_deadline"),
    Case("deadline-zero", chat(), headers=(("X-Deadline-Ms", "0"),), param="X-Deadline-Ms",
         code="invalid_deadline"),
    Case("deadline-too-long", chat(), headers=(("X-Deadline-Ms", "3600001"),),
         param="X-Deadline-Ms", code="invalid_deadline"),
    Case("deadline-negative", chat(), headers=(("X-Deadline-Ms", "-5"),), param="X-Deadline-Ms",
         code="invalid_deadline"),
    Case("budget-hint-not-a-switch", chat(), headers=(("X-Budget-Hint", "maybe"),),
         param="X-Budget-Hint"),
    Case("unknown-prompt-style", chat(), headers=(("X-Prompt-Style", "sonnet"),),
         param="X-Prompt-Style"),
    Case("body-too-large", b"{" + b" " * (2 * 1024 * 1024) + b"}", status=413),
    Case("unknown-route", None, status=404, path="/v1/does-not-exist", method="GET",
         mentions=("/v1/does-not-exist",)),
    Case("unknown-route-post", chat(), status=404, path="/v1/chat/completion",
         mentions=("/v1/chat/completion",)),
    Case("wrong-method", None, status=405, path=CHAT, method="GET", mentions=("GET",)),
]


def send(http: httpx.Client, case: Case, request_id: str) -> httpx.Response:
    headers = {"X-Request-Id": request_id, **dict(case.headers)}
    if isinstance(case.body, dict):
        return http.request(case.method, case.path, json=case.body, headers=headers)
    return http.request(case.method, case.path, content=case.body,
                        headers={**headers, "Content-Type": "application/json"})


def check_openai_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    return dict(error)


def good_request_succeeds(http: httpx.Client) -> None:
    reply = http.post(CHAT, json=chat(temperature=0))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def http(server: Server) -> Any:
    with server.http() as client:
        yield client


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_a_4xx_in_openai_format(server: Server, http: httpx.Client, case: Case) -> None:
    errors_before = len(server.error_records())
    request_id = f"e2e-bad-{case.id}-{uuid.uuid4().hex[:8]}"

    response = send(http, case, request_id)

    assert response.status_code == case.status, response.text
    error = check_openai_error(response)
    assert error["param"] == case.param
    assert error["code"] == case.code
    if case.param is not None:
        assert case.param in error["message"]
    for word in case.mentions:
        assert word in error["message"], error["message"]
    good_request_succeeds(http)
    assert server.completion_records(request_id) == []  # no generation ran for it
    assert server.error_records()[errors_before:] == []  # bad input is not a server error


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_context_length_message_has_both_numbers(http: httpx.Client, path: str) -> None:
    body = chat(messages=[{"role": "user", "content": LONG_TEXT}]) if path == CHAT else \
        {"model": FAMILY, "prompt": LONG_TEXT, "max_tokens": 2}
    response = http.post(path, json=body)
    assert response.status_code == 400
    error = check_openai_error(response)
    assert error["code"] == "context_length_exceeded"
    numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
    assert 2048 in numbers
    prompt_tokens = [n for n in numbers if n > 2048]
    assert prompt_tokens, error["message"]  # the prompt's length, which is over the limit
    assert prompt_tokens[0] >= 3000 if path == TEXT else prompt_tokens[0] > 3000


def test_openai_client_raises_typed_errors(server: Server) -> None:
    """The official client maps the error bodies to its exception types and fields."""
    with server.client() as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(model="llama-3-70b", messages=HELLO,
                                           max_tokens=2)
        assert not_found.value.status_code == 404
        assert not_found.value.code == "model_not_found"
        assert not_found.value.param == "model"

        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(
                model=VARIANTS[0], messages=[{"role": "user", "content": LONG_TEXT}], max_tokens=2)
        assert too_long.value.code == "context_length_exceeded"

        with pytest.raises(openai.BadRequestError) as bad_n:
            client.chat.completions.create(model=FAMILY, messages=HELLO,
                                           max_tokens=2, n=2)
        assert bad_n.value.param == "n"

        with pytest.raises(openai.BadRequestError) as bad_stream:  # fails before any SSE frame
            client.chat.completions.create(model=FAMILY, messages=HELLO,
                                           max_tokens=2, temperature=-1, stream=True)
        assert bad_stream.value.param == "temperature"

        reply = client.chat.completions.create(model=FAMILY, messages=HELLO,
                                               max_tokens=2)
        assert reply.choices[0].message.content


def raw_post(base: str, header: bytes, body: bytes) -> tuple[int, bytes]:
    """A POST with one header exactly as given: httpx refuses to send control characters."""
    url = httpx.URL(base)
    assert url.host and url.port
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode("ascii")
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(head + header + b"\r\n\r\n" + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(("header", "param", "code"), [
    pytest.param(b"X-Deadline-Ms: 5\x01", None, "invalid_http_request", id="soh-in-deadline"),
    pytest.param(b"X-Request-Id: abc\x7fdef", None, "invalid_http_request", id="del-in-request-id"),
    pytest.param(b"X-Budget-Hint: on\x00", None, "invalid_http_request", id="nul-in-budget-hint"),
    pytest.param(b"X-Prompt-Style: \x1b[31mboxed", None, "invalid_http_request", id="escape-in-prompt-style"),
    # Bytes >= 0x80 are legal in HTTP header values (obs-text): they reach the app, which names the header.
    pytest.param(b"X-Budget-Hint: \xe9on", "X-Budget-Hint", None, id="latin1-in-budget-hint"),
])
def test_header_with_control_characters(server: Server, http: httpx.Client, header: bytes, param: str | None,
                                        code: str | None) -> None:
    """Refused with a 400 in the OpenAI format, whether by the HTTP parser (control characters
    never reach the app) or by the app; no server error, and the next request succeeds."""
    errors_before = len(server.error_records())
    status, body = raw_post(server.base, header, json.dumps(chat()).encode())
    assert status == 400, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"]
    good_request_succeeds(http)
    assert server.error_records()[errors_before:] == []


def test_huge_but_valid_max_tokens_is_capped(http: httpx.Client) -> None:
    """max_tokens at the schema's limit (1,000,000) is accepted and capped by the context and
    the deadline: a prompt, not the client, decides how long a generation can run."""
    response = http.post(CHAT, json=chat(max_tokens=1_000_000), headers={"X-Deadline-Ms": "3000"})
    assert response.status_code == 200, response.text
    budget = int(response.headers["X-Edgeserve-Budget-Tokens"])
    assert 1 <= budget < 2048  # n_ctx of the default variants
    assert response.json()["usage"]["completion_tokens"] <= budget
    good_request_succeeds(http)


def test_no_server_error_was_logged(server: Server) -> None:
    records = server.log_records()
    assert records, "the server log is empty"
    assert [r for r in records if r.get("event") in ("unhandled_error", "request_failed")] == []
    assert json.dumps(server.error_records()) == "[]"
