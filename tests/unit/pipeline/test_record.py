"""edgeserve/pipeline/record.py: outcomes, the prediction error, the log line's fields."""

from __future__ import annotations

import pytest

from edgeserve.errors import (
    ContextLengthExceededError,
    GenerationFailedError,
    ModelNotFoundError,
    NotReadyError,
    RefusedError,
    RemoteUnavailableError,
    ShuttingDownError,
)
from edgeserve.pipeline import Admission, CompletionRecord
from edgeserve.pipeline.record import log_fields, outcome_of, prediction_error, turned_away_outcome
from edgeserve.routing.costs import CostProfile, predict_ms
from edgeserve.routing.policy import Decision
from edgeserve.runtime.sequence import GenerationJob, GenerationResult

VARIANT = "fam:q4_1"
PROFILE = CostProfile(variant_id=VARIANT, prefill_fixed_ms=20.0, prefill_ms_per_token=1.0,
                      decode_ms_per_token=10.0)


def result(finish: str = "length", *, tokens: int = 8, prompt_ms: float = 30.0, token_ms: float = 10.0
           ) -> GenerationResult:
    steps = [token_ms] * (tokens - 1)
    return GenerationResult(finish, 10, prompt_ms, tokens, sum(steps), steps, 10)  # type: ignore[arg-type]


def admission(budget: int = 8, predicted_ms: float | None = None) -> Admission:
    predicted = predict_ms(PROFILE, 10, budget) if predicted_ms is None else predicted_ms
    decision = Decision(variant_id=VARIANT, variant_name="q4_1", max_tokens=budget, hint_tokens=None,
                        predicted_ms=predicted, expected_accuracy=0.5, reason="test", style="boxed",
                        deadline_ms=1000.0, queue_wait_ms=0.0)
    return Admission(None, None, GenerationJob(list(range(10)), budget), decision)  # type: ignore[arg-type]


@pytest.mark.parametrize(("finish", "deadline", "total", "failed", "expected"), [
    ("length", 1000, 999.0, False, "met"),
    ("deadline", 1000, 1000.0, False, "met"),
    ("stop", 1000, 1000.5, False, "missed"),
    ("stop", None, 5000.0, False, "completed"),
    ("cancelled", 1000, 10.0, False, "cancelled"),
    (None, 1000, 10.0, False, "cancelled"),
    (None, 1000, 10.0, True, "failed"),
])
def test_outcome_of(finish: str | None, deadline: int | None, total: float, failed: bool, expected: str) -> None:
    generation = None if finish is None else result(finish)
    assert outcome_of(generation, deadline, total, failed) == expected


@pytest.mark.parametrize(("error", "expected"), [
    (RefusedError("late", code="deadline_infeasible", retry_after_s=1), "refused"),
    (NotReadyError("0/3 loaded"), "refused"),
    (ShuttingDownError(), "refused"),
    (ModelNotFoundError("gpt-4o", ["fam"]), "rejected"),
    (ContextLengthExceededError(5000, 2048, VARIANT), "rejected"),
    (RemoteUnavailableError("remote fam:cloud: 503"), "failed"),
    (GenerationFailedError("broke"), "failed"),
])
def test_what_a_request_turned_away_counts_as(error: Exception, expected: str) -> None:
    assert turned_away_outcome(error) == expected  # type: ignore[arg-type]


def test_prediction_error_is_zero_when_the_profile_was_exact() -> None:
    exact = result(tokens=8, prompt_ms=PROFILE.prefill_fixed_ms + 10 * PROFILE.prefill_ms_per_token)
    assert prediction_error(PROFILE, admission(8), exact) == pytest.approx(0.0)


def test_prediction_error_rescales_to_the_tokens_sampled() -> None:
    """A request that stopped after 3 of its 8 tokens is judged on 3 tokens, not on 8."""
    early = result("stop", tokens=3, prompt_ms=30.0, token_ms=10.0)  # 30 + 2 x 10 = 50 ms, as predicted
    assert prediction_error(PROFILE, admission(8), early) == pytest.approx(0.0)
    slow = result(tokens=8, prompt_ms=30.0, token_ms=20.0)  # actual 170 ms, predicted 100 ms
    assert prediction_error(PROFILE, admission(8), slow) == pytest.approx(70 / 170)


def test_prediction_error_needs_a_profile_and_a_prefill() -> None:
    assert prediction_error(None, admission(), result()) is None
    assert prediction_error(PROFILE, admission(), result(prompt_ms=0.0)) is None


def test_the_log_line_rounds_times_and_keeps_the_record_only_fields_out() -> None:
    record = CompletionRecord(request_id="r", family="fam", variant=VARIANT, deadline_ms=None,
                              predicted_ms=12.345, budget_tokens=8, hint_tokens=4, queue_ms=0.04, actual_ms=99.96,
                              prompt_tokens=10, completion_tokens=8, finish="stop", outcome="completed", code=None,
                              client="c", prediction_error=0.5)
    fields = log_fields(record)
    assert fields["predicted_ms"] == 12.3 and fields["queue_ms"] == 0.0 and fields["actual_ms"] == 100.0
    assert "prediction_error" not in fields and "turned_away" not in fields and len(fields) == 19
