"""The litestar application: routes that parse, call the pipeline and format (JSON or SSE).

No domain logic here: admission, the remote fallback, starting, recording and logging a request
are `edgeserve.pipeline`'s; loading and calibrating at start-up are `edgeserve.startup`'s; the
app is built from one settings object by `edgeserve.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgeserve.errors import EdgeserveError, GenerationFailedError
from edgeserve.http.auth import api_key_guard
from edgeserve.http.errors import error_frame, handle_domain_error, handle_http_exception, handle_unexpected
from edgeserve.http.openapi import add_request_schemas, operation_with_body
from edgeserve.http.parse import (
    parse_chat,
    parse_completion,
    parse_deadline_ms,
    parse_forcing,
    parse_name,
    parse_switch,
)
from edgeserve.http.responses import DONE, ChunkEncoder, CompletionContext, full_body
from edgeserve.http.schemas import ModelCard, ModelList
from edgeserve.logging import get_logger
from edgeserve.metrics import Metrics
from edgeserve.pipeline import InferenceRequest, Pipeline, Run
from edgeserve.settings import ServerSettings
from edgeserve.startup import Startup

log = get_logger("edgeserve.http")
_encoder = msgspec.json.Encoder()


def _pipeline(request: Request[Any, Any, Any]) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


def _request_id(request: Request[Any, Any, Any]) -> str:
    given = request.headers.get("x-request-id", "")
    request_id = given if given.isascii() and given.isprintable() and 0 < len(given) <= 64 else uuid.uuid4().hex
    request.scope.setdefault("state", {})["request_id"] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


@post("/v1/chat/completions", status_code=200, summary="Chat completion (OpenAI-compatible)",
      operation_class=operation_with_body("ChatCompletionRequest"))
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    arrived = time.perf_counter()
    wire, domain = parse_chat(await request.body())
    include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
    return await _complete(request, "chat", _with_headers(request, domain, arrived), wire.stream, include_usage)


@post("/v1/completions", status_code=200, summary="Text completion (OpenAI-compatible)",
      operation_class=operation_with_body("CompletionRequest"))
async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    arrived = time.perf_counter()
    wire, domain = parse_completion(await request.body())
    include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
    return await _complete(request, "text", _with_headers(request, domain, arrived), wire.stream, include_usage)


def _with_headers(request: Request[Any, Any, Any], domain: InferenceRequest, arrived: float) -> InferenceRequest:
    """X-Deadline-Ms (ms from arrival), X-Budget-Hint (on|off), X-Prompt-Style (a style of the
    family's policy, or auto: checked by admission), X-Answer-Forcing (on|off|auto)."""
    headers = request.headers
    return replace(
        domain,
        arrived=arrived,
        deadline_ms=parse_deadline_ms(headers.get("x-deadline-ms"), request.app.state.default_deadline_ms),
        hint=parse_switch(headers.get("x-budget-hint"), "X-Budget-Hint"),
        style=parse_name(headers.get("x-prompt-style")),
        answer_forcing=parse_forcing(headers.get("x-answer-forcing")),
    )


async def _complete(
    request: Request[Any, Any, Any], kind: str, domain: InferenceRequest, stream: bool, include_usage: bool
) -> Response[bytes] | Stream:
    request_id = _request_id(request)
    run = await _pipeline(request).open(domain, request_id=request_id, client=_client(request))
    ctx = CompletionContext(request_id, kind, run)
    if stream:
        return Stream(_frames(ctx, include_usage), media_type="text/event-stream",
                      headers={**ctx.headers(), "Cache-Control": "no-cache"})
    answer = asyncio.ensure_future(run.text())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():  # the client left: the generation stops at its next step
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer
            return Response(b"", status_code=499)  # nobody reads it (nginx's "client closed request")
        text = answer.result()
        assert run.result is not None
        logprobs = run.take_logprobs() if ctx.wants_logprobs else None
        return Response(full_body(ctx, text, run.result, logprobs), media_type="application/json",
                        headers=ctx.headers())
    finally:
        gone.cancel()
        run.close()


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Returns when the client closes the connection (the body has been read already, so the
    next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _frames(ctx: CompletionContext, include_usage: bool) -> AsyncIterator[bytes]:
    """Waits for its slot inside the stream, so a client leaving while queued is noticed too.
    Once the 200 is sent, an error becomes an error event, then the end of the stream."""
    run: Run = ctx.run
    chunks = ChunkEncoder(ctx)
    try:
        first = chunks.first()
        if first is not None:
            yield first
        try:
            await run.start()
        except EdgeserveError as exc:  # the queue is full, or the deadline expired while queued
            yield error_frame(exc)
            yield DONE
            return
        try:
            async for piece in run:
                yield chunks.piece(piece, run.take_logprobs() if ctx.wants_logprobs else None)
            assert run.result is not None
            yield chunks.last(run.result, include_usage, run.take_logprobs() if ctx.wants_logprobs else None)
        except GenerationFailedError as exc:
            log.error("request_failed", error=exc.message, path="stream", request_id=ctx.request_id,
                      exc_info=exc.__cause__)  # the runner's own traceback, for the operator
            yield error_frame(exc, ctx.request_id)
            yield DONE
    finally:
        # A disconnect closes this generator at a `yield`; the run stops its generation at the
        # next token and is recorded with what it really did.
        run.close()


def _client(request: Request[Any, Any, Any]) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


@get("/v1/models", summary="Families (routed) and their variants (pinned)")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    catalog = _pipeline(request).catalog
    started = request.app.state.started_at
    cards: list[ModelCard] = []
    for family in catalog.registry.models.families:
        ids = catalog.resolve(family.name).ids
        cards.append(ModelCard(id=family.name, created=started, owned_by="edgeserve", kind="family",
                               variants=[str(vid) for vid in ids]))
        for vid in ids:
            info = catalog[vid].info()
            cards.append(ModelCard(
                id=str(vid), created=started, owned_by="edgeserve", kind=info.kind, family=family.name,
                quant=info.quant, path=info.path, n_ctx=info.n_ctx, loaded=info.loaded,
                base_url=info.base_url, remote_model=info.remote_model, status=info.status,
            ))
    return Response(_encoder.encode(ModelList(cards)), media_type="application/json")


@get("/metrics", summary="Prometheus metrics (text exposition format)", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="Readiness: 503 until every variant is loaded")
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    pipeline = _pipeline(request)
    startup: Startup = request.app.state.startup
    if startup.error is not None:
        return Response({"status": "failed", "error": startup.error}, status_code=503)
    if not pipeline.ready:
        return Response({"status": "loading", "detail": pipeline.status()}, status_code=503,
                        headers={"Retry-After": "1"})
    return Response({"status": "ready", "detail": pipeline.status()})


def create_app(pipeline: Pipeline, metrics: Metrics, startup: Startup, settings: ServerSettings) -> Litestar:
    """With `settings.api_keys`, every route but /health and /ready (and /metrics if
    `metrics_public`) needs `Authorization: Bearer KEY` (see edgeserve.http.auth). The models
    load in `startup`'s lifespan, in the background: /health answers at once and /ready says 503
    until every variant is loaded and costed."""
    api_keys = settings.api_keys
    app = Litestar(
        route_handlers=[chat_completions, completions, list_models, metrics_endpoint, health, ready],
        lifespan=[startup.lifespan],
        exception_handlers={
            EdgeserveError: handle_domain_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=OpenAPIConfig(title="edgeserve", version="0.1.0", path="/schema"),
        request_max_body_size=settings.max_body_bytes,
        guards=[api_key_guard(api_keys, metrics_public=settings.metrics_public)] if api_keys else None,
        debug=False,
    )
    add_request_schemas(app.openapi_schema)
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    app.state.startup = startup
    app.state.started_at = int(time.time())
    app.state.default_deadline_ms = settings.default_deadline_ms
    app.state.max_body_bytes = settings.max_body_bytes  # named in the 413
    return app
