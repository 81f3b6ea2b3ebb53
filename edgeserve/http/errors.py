"""The one place where domain errors become HTTP responses in the OpenAI error format."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from edgeserve.errors import (
    ContextLengthExceededError,
    EdgeserveError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    RefusedError,
    RemoteUnavailableError,
    ShuttingDownError,
)
from edgeserve.http.schemas import ErrorBody, ErrorResponse
from edgeserve.logging import get_logger

log = get_logger("edgeserve.http")
_encoder = msgspec.json.Encoder()

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = ErrorResponse(ErrorBody(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code))
    return Response(_encoder.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def status_of(error: EdgeserveError) -> int:
    if isinstance(error, ModelNotFoundError):
        return 404
    if isinstance(error, ContextLengthExceededError | InvalidRequestError):
        return 400
    if isinstance(error, NotReadyError | ShuttingDownError):
        return 503
    if isinstance(error, RefusedError):
        return 429
    if isinstance(error, RemoteUnavailableError):
        return 502  # an upstream failed; every local variant was worse or busy
    return 500


def with_request_id(message: str, status: int, request_id: str | None) -> str:
    """A server-side failure (500, 502) names the request, so an operator can find its log
    lines; refusals (429, 503) and bad input are the client's to act on and need no id."""
    if status < 500 or status == 503 or not request_id:
        return message
    return f"{message} (request {request_id}; the server keeps serving, report this id to the operator)"


def error_frame(error: EdgeserveError, request_id: str | None = None) -> bytes:
    """The error as a server-sent event, for a stream whose 200 and headers are already sent
    (OpenAI streams report errors the same way: ``data: {"error": {...}}``)."""
    status = status_of(error)
    body = ErrorResponse(ErrorBody(with_request_id(error.message, status, request_id),
                                   ERROR_TYPES.get(status, "server_error"), error.param, error.code))
    return b"data: " + _encoder.encode(body) + b"\n\n"


def handle_domain_error(request: Request[Any, Any, Any], error: EdgeserveError) -> Response[bytes]:
    status = status_of(error)
    headers = {"Retry-After": "1"} if status == 503 else None
    if isinstance(error, RefusedError):
        headers = {"Retry-After": str(error.retry_after_s)}
        if error.min_deadline_ms is not None:  # lets a client retry with a deadline that can work
            headers["X-Edgeserve-Min-Deadline-Ms"] = f"{error.min_deadline_ms:.0f}"
    request_id = request.scope.get("state", {}).get("request_id")
    if status == 503:
        log.warning("not_ready", error=error.message, path=request.url.path)
    elif status >= 500:
        log.error("request_failed", error=error.message, path=request.url.path, request_id=request_id,
                  exc_info=error.__cause__)  # e.g. the exception a runner raised, with its traceback
    return error_response(status, with_request_id(error.message, status, request_id), param=error.param,
                          code=error.code, headers=headers)


def handle_http_exception(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    """Litestar's own errors (unknown route, wrong method, body too large) in the OpenAI format."""
    status = error.status_code
    message = str(error.detail)
    if status == 404:
        message = f"No route {request.method} {request.url.path}; see /schema for the API."
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif status == 413:
        limit = request.app.state.get("max_body_bytes")
        message = (f"The request body is too large: over this server's limit of {limit:,} bytes (--max-body-bytes)."
                   if isinstance(limit, int) else f"The request body is too large: {error.detail}.")
    code = "invalid_api_key" if status == 401 else None  # raised by the API key guard only
    return error_response(status, message, code=code, headers=getattr(error, "headers", None))


def handle_unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    """A bug, not bad input: logged with its traceback, answered without one."""
    request_id = request.scope.get("state", {}).get("request_id", "unknown")
    log.exception("unhandled_error", path=request.url.path, request_id=request_id)
    return error_response(
        500,
        f"Internal error while serving request {request_id}; the server keeps serving. "
        "Report this id to the operator.",
        code="internal_error",
    )
