"""edgeserve/http/errors.py: domain errors → HTTP status and the OpenAI error body."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from edgeserve.errors import (
    ConfigError,
    ContextLengthExceededError,
    EdgeserveError,
    GenerationFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    RefusedError,
)
from edgeserve.http.errors import error_response, handle_domain_error, status_of


def body_of(response: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(response.content)
    return decoded


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ModelNotFoundError("gpt-4", ["smollm2-135m", "smollm2-135m:q2_k"]), 404),
        (ContextLengthExceededError(3000, 2048, "smollm2-135m:q2_k"), 400),
        (InvalidRequestError("bad", param="temperature"), 400),
        (NotReadyError("1/3 variants loaded"), 503),
        (RefusedError("too late", code="deadline_infeasible", retry_after_s=3), 429),
        (GenerationFailedError("llama.cpp failed"), 500),
        (ConfigError("broken file"), 500),
        (EdgeserveError("anything else"), 500),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_status_of(error: EdgeserveError, status: int) -> None:
    assert status_of(error) == status


def test_model_not_found_carries_param_code_and_known_models() -> None:
    error = ModelNotFoundError("gpt-4", ["smollm2-135m", "smollm2-135m:q2_k"])
    assert error.param == "model"
    assert error.code == "model_not_found"
    assert "gpt-4" in error.message
    assert "smollm2-135m:q2_k" in error.message


def test_context_length_exceeded_carries_code_and_both_numbers() -> None:
    error = ContextLengthExceededError(3000, 2048, "smollm2-135m:q2_k")
    assert isinstance(error, InvalidRequestError)
    assert error.code == "context_length_exceeded"
    assert error.param == "messages"
    assert "3000" in error.message and "2048" in error.message
    assert (error.prompt_tokens, error.n_ctx) == (3000, 2048)


def test_error_response_has_the_openai_shape() -> None:
    response = error_response(400, "Invalid value for 'n'.", param="n", code="bad_n")
    assert response.status_code == 400
    assert response.media_type == "application/json"
    body = msgspec.json.decode(response.content)
    assert body == {
        "error": {
            "message": "Invalid value for 'n'.",
            "type": "invalid_request_error",
            "param": "n",
            "code": "bad_n",
        }
    }


def test_error_response_keeps_null_param_and_code() -> None:
    body = msgspec.json.decode(error_response(500, "boom").content)
    assert body == {"error": {"message": "boom", "type": "server_error", "param": None,
                              "code": None}}


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (404, "invalid_request_error"),
     (429, "rate_limit_error"), (503, "server_error"), (418, "invalid_request_error")],
)
def test_error_types(status: int, kind: str) -> None:
    body = msgspec.json.decode(error_response(status, "x").content)
    assert body["error"]["type"] == kind


def test_error_response_headers() -> None:
    response = error_response(429, "slow down", headers={"Retry-After": "3"})
    assert response.headers["Retry-After"] == "3"


def raiser(error: EdgeserveError) -> Litestar:
    """A tiny app whose one route raises `error`, wired like edgeserve's app."""

    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise error

    return Litestar([boom], exception_handlers={EdgeserveError: handle_domain_error})


@pytest.mark.parametrize(
    ("error", "status", "kind", "param", "code"),
    [
        (ModelNotFoundError("nope", ["smollm2-135m"]), 404, "invalid_request_error", "model",
         "model_not_found"),
        (ContextLengthExceededError(5000, 2048, "v"), 400, "invalid_request_error", "messages",
         "context_length_exceeded"),
        (InvalidRequestError("Invalid value for 'n'.", param="n"), 400,
         "invalid_request_error", "n", None),
        (NotReadyError("0/3 variants loaded"), 503, "server_error", None, "not_ready"),
        (RefusedError("queue full", code="queue_full", retry_after_s=7), 429,
         "rate_limit_error", None, "queue_full"),
    ],
)
def test_handle_domain_error_through_a_real_app(
    error: EdgeserveError, status: int, kind: str, param: str | None, code: str | None
) -> None:
    with TestClient(app=raiser(error)) as client:
        response = client.get("/boom")
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert body_of(response) == {
        "error": {"message": error.message, "type": kind, "param": param, "code": code}
    }
    if status == 503:
        assert response.headers["retry-after"] == "1"
    elif isinstance(error, RefusedError):
        assert response.headers["retry-after"] == str(error.retry_after_s)
    else:
        assert "retry-after" not in response.headers


def test_refused_retry_after_is_at_least_one_second() -> None:
    assert RefusedError("x", code="queue_full", retry_after_s=0).retry_after_s == 1
