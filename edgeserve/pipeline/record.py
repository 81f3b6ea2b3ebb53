"""The end of every request: one `CompletionRecord`, then cost update → metrics → one log line.

`Recorder.completed` (an admitted request ended: finished, cancelled or failed) and
`Recorder.turned_away` (refused, rejected or failed before it ran) build the record;
`Recorder.emit` hands it to the metrics and writes the canonical ``completion`` line, whose
fields `log_fields` lists, once per request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from edgeserve.errors import (
    EdgeserveError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    RefusedError,
    ShuttingDownError,
)
from edgeserve.logging import get_logger
from edgeserve.routing.costs import CostProfile, predict_ms
from edgeserve.runtime.sequence import GenerationResult

if TYPE_CHECKING:
    from edgeserve.pipeline.admission import Admission
    from edgeserve.pipeline.request import InferenceRequest

log = get_logger("edgeserve.http")

Outcome = Literal["met", "missed", "completed", "cancelled", "failed", "refused", "rejected"]
OUTCOMES: tuple[Outcome, ...] = ("met", "missed", "completed", "cancelled", "failed", "refused", "rejected")


class CompletionRecord(msgspec.Struct, kw_only=True, frozen=True):
    """What came of one request: the decision, the timings and the outcome. Times are ms from
    the request's arrival; None where nothing was decided or nothing ran."""

    request_id: str
    family: str | None
    variant: str | None  # "family:name", as on the wire
    deadline_ms: int | None
    predicted_ms: float | None
    budget_tokens: int | None
    hint_tokens: int | None
    queue_ms: float | None
    actual_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish: str | None
    outcome: Outcome
    code: str | None
    client: str
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from a cache (batched runtime)
    batch_width: float = 1.0  # mean sequences per decode step it ran in (batched runtime)
    drafted_tokens: int = 0  # speculative pairs: tokens the draft proposed
    accepted_tokens: int = 0  # of which the target agreed with
    # For the metrics only:
    turned_away: bool = False  # never ran: refused, rejected, or failed before it started
    prompt_ms: float = 0.0  # prefill and first token in the model; 0: it never reached one
    decode_ms: float = 0.0  # the decode steps after the first token
    prediction_error: float | None = None  # |predicted - actual| / actual, see prediction_error


class MetricsSink(Protocol):
    def observe(self, record: CompletionRecord) -> None: ...


def outcome_of(result: GenerationResult | None, deadline_ms: int | None, total_ms: float,
               failed: bool = False) -> Outcome:
    """What came of an admitted request: met / missed its deadline (server-side: arrival to the
    end of the response), completed (it had none), cancelled (the client left), or failed."""
    if failed:
        return "failed"
    if result is None or result.finish == "cancelled":
        return "cancelled"
    if deadline_ms is None:
        return "completed"
    return "met" if total_ms <= deadline_ms else "missed"


def turned_away_outcome(error: EdgeserveError) -> Outcome:
    """Refused (the client may retry: 429, or 503 while loading or draining), rejected (bad
    input: unknown model, prompt too long, a bad header) or failed (the server's fault)."""
    if isinstance(error, RefusedError | NotReadyError | ShuttingDownError):
        return "refused"
    if isinstance(error, InvalidRequestError | ModelNotFoundError):
        return "rejected"
    return "failed"


def prediction_error(profile: CostProfile | None, admission: Admission, result: GenerationResult) -> float | None:
    """|predicted − actual| / actual of the generation's time in the model (prefill + decode).
    The decision predicted its whole budget; a request that stopped early (end of sequence,
    deadline) is judged on the tokens it really sampled: the prediction is rescaled by the live
    cost profile's ratio between the two, as `edgeserve bench-routing` does."""
    actual = result.prompt_ms + result.predicted_ms
    if profile is None or actual <= 0 or result.prompt_ms <= 0:
        return None
    prompt = len(admission.job.prompt_tokens)
    whole = predict_ms(profile, prompt, admission.decision.max_tokens)
    if whole <= 0:
        return None
    sampled = 1 + len(result.token_ms)  # the first token comes with the prefill
    generation_ms = admission.decision.predicted_ms - admission.load_ms  # a load is not generation time
    predicted = generation_ms * predict_ms(profile, prompt, sampled) / whole
    return abs(predicted - actual) / actual


def log_fields(record: CompletionRecord) -> dict[str, object]:
    """The fields of the canonical ``completion`` line, in order."""
    return {
        "request_id": record.request_id,
        "family": record.family,
        "variant": record.variant,
        "deadline_ms": record.deadline_ms,
        "predicted_ms": _round(record.predicted_ms),
        "budget_tokens": record.budget_tokens,
        "hint_tokens": record.hint_tokens,
        "queue_ms": _round(record.queue_ms),
        "actual_ms": _round(record.actual_ms),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_prompt_tokens": record.cached_prompt_tokens,
        "batch_width": record.batch_width,
        "drafted_tokens": record.drafted_tokens,
        "accepted_tokens": record.accepted_tokens,
        "finish": record.finish,
        "outcome": record.outcome,
        "code": record.code,
        "client": record.client,
    }


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 1)


class Recorder:
    def __init__(self, metrics: MetricsSink | None = None) -> None:
        self.metrics = metrics

    def completed(self, admission: Admission, *, request_id: str, client: str, arrived: float,
                  deadline_ms: int | None, queue_ms: float, result: GenerationResult | None,
                  failed: bool = False) -> CompletionRecord:
        """An admitted request ended. Its timings update the variant's cost profile first, so
        the prediction error is judged against the live profile."""
        variant = admission.variant
        if result is not None:
            variant.observe(result)
        total_ms = (time.perf_counter() - arrived) * 1000
        error = None
        if result is not None and result.finish != "cancelled":
            error = prediction_error(variant.profile, admission, result)
        record = CompletionRecord(
            request_id=request_id,
            family=variant.id.family,
            variant=str(variant.id),
            deadline_ms=deadline_ms,
            predicted_ms=admission.decision.predicted_ms,
            budget_tokens=admission.budget_tokens,
            hint_tokens=admission.decision.hint_tokens,
            queue_ms=queue_ms,
            actual_ms=total_ms,
            prompt_tokens=len(admission.job.prompt_tokens),
            completion_tokens=result.predicted_n if result else None,
            finish=result.finish if result else None if failed else "cancelled",
            outcome=outcome_of(result, deadline_ms, total_ms, failed),
            code=None,
            client=client,
            cached_prompt_tokens=result.cache_n if result else 0,
            batch_width=round(result.mean_batch, 2) if result else 1.0,
            drafted_tokens=result.drafted_n if result else 0,
            accepted_tokens=result.accepted_n if result else 0,
            prompt_ms=result.prompt_ms if result else 0.0,
            decode_ms=result.predicted_ms if result else 0.0,
            prediction_error=error,
        )
        self.emit(record)
        return record

    def turned_away(self, error: EdgeserveError, *, request_id: str, client: str,
                    request: InferenceRequest | None, admission: Admission | None,
                    family: str | None) -> CompletionRecord:
        """A request that never ran: refused, rejected or failed before it started; the same
        fields, empty where nothing was decided."""
        record = CompletionRecord(
            request_id=request_id,
            family=admission.variant.id.family if admission is not None else family,
            variant=str(admission.variant.id) if admission is not None else None,
            deadline_ms=request.deadline_ms if request is not None else None,
            predicted_ms=admission.decision.predicted_ms if admission is not None else None,
            budget_tokens=admission.budget_tokens if admission is not None else None,
            hint_tokens=admission.decision.hint_tokens if admission is not None else None,
            queue_ms=None,
            actual_ms=(time.perf_counter() - request.arrived) * 1000 if request is not None else None,
            prompt_tokens=len(admission.job.prompt_tokens) if admission is not None else None,
            completion_tokens=None,
            finish=None,
            outcome=turned_away_outcome(error),
            code=error.code,
            client=client,
            turned_away=True,
        )
        self.emit(record)
        return record

    def emit(self, record: CompletionRecord) -> None:
        """Metrics, then the one canonical line. Input the router rejects (unknown model, prompt
        too long) is only counted: its answer says it all."""
        if self.metrics is not None:
            self.metrics.observe(record)
        if record.outcome != "rejected":
            log.info("completion", **log_fields(record))
