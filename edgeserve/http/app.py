"""The litestar application: routes, lifespan (model loading), error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgeserve.errors import EdgeserveError, GenerationFailedError, RemoteUnavailableError
from edgeserve.http.auth import api_key_guard
from edgeserve.http.errors import (
    error_frame,
    handle_domain_error,
    handle_http_exception,
    handle_unexpected,
    status_of,
)
from edgeserve.http.openapi import add_request_schemas, operation_with_body
from edgeserve.http.parse import (
    parse_chat,
    parse_choice,
    parse_completion,
    parse_deadline_ms,
    parse_switch,
)
from edgeserve.http.responses import DONE, ChunkEncoder, CompletionContext, full_body
from edgeserve.http.schemas import ModelCard, ModelList
from edgeserve.logging import get_logger
from edgeserve.metrics import NO_VARIANT, Metrics, Outcome, outcome_of
from edgeserve.runtime.calibrate import CalibrationPlan, store_profiles
from edgeserve.runtime.loader import load_and_cost
from edgeserve.runtime.runner import Generation, GenerationResult, LlamaRunner
from edgeserve.sdnotify import Notifier
from edgeserve.service import Admission, Engine, InferenceRequest

log = get_logger("edgeserve.http")
_encoder = msgspec.json.Encoder()
MAX_BODY_BYTES = 1024 * 1024


def _engine(request: Request[Any, Any, Any]) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _metrics(request: Request[Any, Any, Any]) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


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
    """X-Deadline-Ms (ms from arrival), X-Budget-Hint (on|off), X-Prompt-Style (a policy style),
    X-Answer-Forcing (on|off)."""
    engine = _engine(request)
    headers = request.headers
    return replace(
        domain,
        arrived=arrived,
        deadline_ms=parse_deadline_ms(headers.get("x-deadline-ms"), request.app.state.default_deadline_ms),
        hint=parse_switch(headers.get("x-budget-hint"), "X-Budget-Hint"),
        style=parse_choice(headers.get("x-prompt-style"), "X-Prompt-Style", tuple(engine.policy.styles)),
        answer_forcing=parse_switch(headers.get("x-answer-forcing"), "X-Answer-Forcing"),
    )


async def _complete(
    request: Request[Any, Any, Any], kind: str, domain: InferenceRequest, stream: bool, include_usage: bool
) -> Response[bytes] | Stream:
    request_id = _request_id(request)
    engine, metrics, client = _engine(request), _metrics(request), _client(request)
    try:
        admission, started = await _admit(engine, domain, request_id)
    except EdgeserveError as exc:
        _log_turned_away(metrics, request_id, domain, None, exc, client)
        raise
    ctx = CompletionContext(request_id, kind, admission, domain.arrived, domain.deadline_ms)
    if stream:
        return Stream(_stream(engine, metrics, ctx, include_usage, client, started),
                      media_type="text/event-stream",
                      headers={**ctx.headers(), "Cache-Control": "no-cache"})
    try:
        return await _respond(engine, metrics, ctx, client, started)
    finally:
        engine.finished()


async def _admit(engine: Engine, domain: InferenceRequest, request_id: str
                 ) -> tuple[Admission, tuple[Generation, float] | None]:
    """Admit the request. A remote variant is started here, before any byte of the response:
    if it does not take the request, its circuit opens and the request is routed again (to a
    local variant, or another remote), so a remote that went down costs a retry, not an error."""
    attempts = 1 + len(engine.registry.remotes)
    for attempt in range(attempts):
        admission = await engine.admit(domain)
        if admission.remote is None:
            return admission, None
        try:
            return admission, await engine.start(admission)
        except RemoteUnavailableError as exc:
            engine.finished()
            if attempt == attempts - 1:
                raise
            log.warning("remote_fallback", request_id=request_id, variant=admission.variant_id,
                        error=exc.message, detail="routing the request again without it")
    raise AssertionError("unreachable")


async def _respond(engine: Engine, metrics: Metrics, ctx: CompletionContext, client: str,
                   started: tuple[Generation, float] | None) -> Response[bytes]:
    admission = ctx.admission
    try:
        generation, ctx.queue_ms = started or await engine.start(admission)
    except EdgeserveError as exc:  # the queue is full, or the deadline expired while queued
        _log_turned_away(metrics, ctx.request_id, None, admission, exc, client)
        raise
    try:
        text = await generation.text()
    except GenerationFailedError:
        _log_outcome(metrics, ctx, None, client, failed=True)
        raise
    finally:
        generation.cancel()  # no-op once finished; stops the token loop if we were cancelled
    assert generation.result is not None
    engine.record(admission, generation.result)
    _log_outcome(metrics, ctx, generation.result, client)
    return Response(full_body(ctx, text, generation.result), media_type="application/json",
                    headers=ctx.headers())


async def _stream(engine: Engine, metrics: Metrics, ctx: CompletionContext, include_usage: bool,
                  client: str, started: tuple[Generation, float] | None) -> AsyncIterator[bytes]:
    try:
        async for frame in _frames(engine, metrics, ctx, include_usage, client, started):
            yield frame
    finally:
        engine.finished()


async def _frames(engine: Engine, metrics: Metrics, ctx: CompletionContext, include_usage: bool,
                  client: str, started: tuple[Generation, float] | None) -> AsyncIterator[bytes]:
    """Waits for its slot inside the stream, so a client leaving while queued is noticed too
    (a remote variant's generation is started already: see `_admit`)."""
    chunks = ChunkEncoder(ctx)
    first = chunks.first()
    if first is not None:
        yield first
    try:
        generation, ctx.queue_ms = started or await engine.start(ctx.admission)
    except asyncio.CancelledError:  # the client left while waiting for a slot
        _log_outcome(metrics, ctx, None, client)
        raise
    except EdgeserveError as exc:  # the queue is full, or the deadline expired while queued
        _log_turned_away(metrics, ctx.request_id, None, ctx.admission, exc, client)
        yield error_frame(exc)  # the 200 is sent already: say why in the stream, then end it
        yield DONE
        return
    failed = False
    try:
        async for piece in generation:
            yield chunks.piece(piece)
        assert generation.result is not None
        yield chunks.last(generation.result, include_usage)
        engine.record(ctx.admission, generation.result)
    except GenerationFailedError as exc:  # the 200 is sent already: an error event, then the end
        failed = True
        log.error("request_failed", error=exc.message, path="stream", request_id=ctx.request_id,
                  exc_info=exc.__cause__)  # the runner's own traceback, for the operator
        yield error_frame(exc, ctx.request_id)
        yield DONE
    finally:
        # A disconnect cancels this generator at a `yield`; the token loop sees the flag
        # before its next decode step.
        generation.cancel()
        if generation.result is None and not failed:
            # The token loop is still stopping: log what it really did once it reports.
            task = asyncio.create_task(_log_when_done(metrics, ctx, generation, client))
            _background.add(task)
            task.add_done_callback(_background.discard)
        else:
            _log_outcome(metrics, ctx, generation.result, client, failed=failed)


_background: set[asyncio.Task[None]] = set()


async def _log_when_done(metrics: Metrics, ctx: CompletionContext, generation: Generation, client: str) -> None:
    with contextlib.suppress(GenerationFailedError):  # logged as cancelled like before
        async for _ in generation:  # the pieces it made before it saw the cancel flag
            pass
    _log_outcome(metrics, ctx, generation.result, client)


def _client(request: Request[Any, Any, Any]) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _log_outcome(metrics: Metrics, ctx: CompletionContext, result: GenerationResult | None, client: str,
                 failed: bool = False) -> None:
    """The one canonical line per request: the decision and what came of it (and its metrics)."""
    total_ms = (time.perf_counter() - ctx.arrived) * 1000
    outcome = outcome_of(result, ctx.deadline_ms, total_ms, failed)
    metrics.finished(ctx.admission, result, outcome, total_ms=total_ms, queue_ms=ctx.queue_ms)
    log.info(
        "completion",
        request_id=ctx.request_id,
        family=ctx.admission.variant_id.partition(":")[0],
        variant=ctx.admission.variant_id,
        deadline_ms=ctx.deadline_ms,
        predicted_ms=round(ctx.admission.decision.predicted_ms, 1),
        budget_tokens=ctx.admission.budget_tokens,
        hint_tokens=ctx.admission.decision.hint_tokens,
        queue_ms=round(ctx.queue_ms, 1),
        actual_ms=round(total_ms, 1),
        prompt_tokens=len(ctx.admission.job.prompt_tokens),
        completion_tokens=result.predicted_n if result else None,
        finish=result.finish if result else None if failed else "cancelled",
        outcome=outcome,
        code=None,
        client=client,
    )


def _log_turned_away(metrics: Metrics, request_id: str, domain: InferenceRequest | None,
                     admission: Admission | None, error: EdgeserveError, client: str) -> None:
    """The canonical line of a request that never ran: refused (429, or 503 while loading or
    draining) or failed; the same fields, empty where nothing was decided. Input the router
    rejects (another 4xx: unknown model, prompt too long) is only counted: its answer says it all."""
    status = status_of(error)
    outcome: Outcome = "refused" if status in (429, 503) else "rejected" if status < 500 else "failed"
    variant = admission.variant_id if admission is not None else None
    metrics.turned_away(outcome, variant or NO_VARIANT)
    if outcome == "rejected":
        return
    model = variant or (domain.model if domain is not None else "")
    arrived = domain.arrived if domain is not None else None
    log.info(
        "completion",
        request_id=request_id,
        family=model.partition(":")[0] or None,
        variant=variant,
        deadline_ms=domain.deadline_ms if domain is not None else None,
        predicted_ms=round(admission.decision.predicted_ms, 1) if admission is not None else None,
        budget_tokens=admission.budget_tokens if admission is not None else None,
        hint_tokens=admission.decision.hint_tokens if admission is not None else None,
        queue_ms=None,
        actual_ms=round((time.perf_counter() - arrived) * 1000, 1) if arrived is not None else None,
        prompt_tokens=len(admission.job.prompt_tokens) if admission is not None else None,
        completion_tokens=None,
        finish=None,
        outcome=outcome,
        code=error.code,
        client=client,
    )


@get("/v1/models", summary="Families (routed) and their variants (pinned)")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    registry = _engine(request).registry
    started = request.app.state.started_at
    cards: list[ModelCard] = []
    for family in registry.models.families:
        cards.append(ModelCard(
            id=family.name, created=started, owned_by="edgeserve", kind="family",
            variants=[f"{family.name}:{v.name}" for v in family.variants],
        ))
        for variant in family.variants:
            remote = registry.remotes.get(f"{family.name}:{variant.name}")
            if remote is not None:
                cards.append(ModelCard(
                    id=remote.variant_id, created=started, owned_by="edgeserve", kind="remote",
                    family=family.name, n_ctx=variant.n_ctx, loaded=remote.available,
                    base_url=remote.base_url, remote_model=remote.model,
                    status=None if remote.available else remote.unavailable_reason(),
                ))
                continue
            runner = registry.runners[f"{family.name}:{variant.name}"]
            cards.append(ModelCard(
                id=runner.variant_id, created=started, owned_by="edgeserve", kind="variant",
                family=family.name, quant=variant.quant, path=str(runner.path),
                n_ctx=variant.n_ctx, loaded=runner.loaded,
            ))
    return Response(_encoder.encode(ModelList(cards)), media_type="application/json")


@get("/metrics", summary="Prometheus metrics (text exposition format)", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(generate_latest(_metrics(request).registry), media_type=CONTENT_TYPE_LATEST)


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="Readiness: 503 until every variant is loaded")
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    engine = _engine(request)
    if request.app.state.load_error is not None:
        return Response({"status": "failed", "error": request.app.state.load_error}, status_code=503)
    if not engine.ready:
        return Response({"status": "loading", "detail": engine.status()}, status_code=503,
                        headers={"Retry-After": "1"})
    return Response({"status": "ready", "detail": engine.status()})


def create_app(engine: Engine, *, cache_dir: Path, default_deadline_ms: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, notifier: Notifier | None = None,
               api_keys: Sequence[str] = (), metrics_public: bool = False) -> Litestar:
    """With `api_keys`, every route but /health and /ready (and /metrics if `metrics_public`)
    needs `Authorization: Bearer KEY` (see edgeserve.http.auth).

    Models load (and, where no profile matches, calibrate) in the background after start-up,
    so /health answers at once and /ready says 503 until every variant is loaded and costed.
    Under systemd (Type=notify) the progress goes to STATUS=, then READY=1, and the event loop
    pings the watchdog."""
    notify = notifier or Notifier({})

    def loaded(runner: LlamaRunner) -> None:
        log.info("variant_loaded", variant=runner.variant_id, load_ms=round(runner.load_ms or 0, 1))
        notify.status(f"loaded {engine.registry.loading_status()}")

    def calibrating(line: str) -> None:
        log.info("calibration", detail=line)
        notify.status(f"calibrating: {line}")

    @asynccontextmanager
    async def load_models(app: Litestar) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                notify.status(f"loading {len(engine.registry.runners)} variants")
                profiles = await load_and_cost(engine.registry, engine.residency, cache_dir,
                                               CalibrationPlan.quick(), loaded, calibrating)
                for remote in remotes.values():  # one that is down now is re-checked in the background
                    notify.status(f"probing remote {remote.variant_id}")
                    await remote.probe()
                engine.profiles = profiles  # ready from here on
                log.info("ready", detail=engine.status())
                notify.ready(f"serving {', '.join(engine.registry.runners)}")
            except (EdgeserveError, OSError) as exc:  # a bad model file; a cache that cannot be written
                message = exc.message if isinstance(exc, EdgeserveError) else str(exc)
                app.state.load_error = message
                log.error("load_failed", error=message)
                notify.status(f"failed: {message}")
                if app.state.on_load_failed is not None:  # set by lifecycle.serve: exit, do not idle
                    app.state.on_load_failed(message)

        remotes = engine.registry.open_remotes()
        task = asyncio.create_task(load())
        watchdog = asyncio.create_task(notify.watchdog())
        watchers = [asyncio.create_task(remote.watch()) for remote in remotes.values()]
        try:
            yield
        finally:
            task.cancel()
            watchdog.cancel()
            for watcher in watchers:
                watcher.cancel()
            for remote in remotes.values():
                await remote.aclose()
            if engine.ready:
                store_profiles(engine.profiles, cache_dir)
            engine.registry.close()

    app = Litestar(
        route_handlers=[chat_completions, completions, list_models, metrics_endpoint, health, ready],
        lifespan=[load_models],
        exception_handlers={
            EdgeserveError: handle_domain_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=OpenAPIConfig(title="edgeserve", version="0.1.0", path="/schema"),
        request_max_body_size=max_body_bytes,
        guards=[api_key_guard(api_keys, metrics_public=metrics_public)] if api_keys else None,
        debug=False,
    )
    add_request_schemas(app.openapi_schema)
    app.state.engine = engine
    app.state.metrics = Metrics(engine)
    app.state.started_at = int(time.time())
    app.state.load_error = None
    app.state.on_load_failed = None  # Callable[[str], None]: what to do when loading fails
    app.state.default_deadline_ms = default_deadline_ms
    app.state.max_body_bytes = max_body_bytes  # named in the 413
    return app
