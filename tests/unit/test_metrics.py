"""Prometheus collectors without a model: outcomes, prediction error, smaps, the exposition."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgeserve.metrics import Metrics, mapped_rss_bytes, outcome_of, prediction_error
from edgeserve.routing.costs import CostProfile, predict_ms
from edgeserve.routing.policy import Decision
from edgeserve.runtime.runner import GenerationJob, GenerationResult
from edgeserve.service import Admission

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
    return Admission(VARIANT, None, "", GenerationJob(list(range(10)), budget), decision)  # type: ignore[arg-type]


def engine(tmp_path: Path, profiles: dict[str, CostProfile] | None = None) -> Any:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 1000)
    runner = SimpleNamespace(path=gguf, loaded=True, file_bytes=1000, variant_id=VARIANT)
    return SimpleNamespace(registry=SimpleNamespace(runners={VARIANT: runner}, remotes={}),
                           scheduler=SimpleNamespace(queue_depth=3, running=1),
                           profiles={VARIANT: PROFILE} if profiles is None else profiles,
                           residency=None)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


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


def test_prediction_error_is_zero_when_the_profile_was_exact(tmp_path: Path) -> None:
    exact = result(tokens=8, prompt_ms=PROFILE.prefill_fixed_ms + 10 * PROFILE.prefill_ms_per_token)
    assert prediction_error(admission(8), exact, engine(tmp_path)) == pytest.approx(0.0)


def test_prediction_error_rescales_to_the_tokens_sampled(tmp_path: Path) -> None:
    """A request that stopped after 3 of its 8 tokens is judged on 3 tokens, not on 8."""
    early = result("stop", tokens=3, prompt_ms=30.0, token_ms=10.0)  # 30 + 2 x 10 = 50 ms, as predicted
    assert prediction_error(admission(8), early, engine(tmp_path)) == pytest.approx(0.0)
    slow = result(tokens=8, prompt_ms=30.0, token_ms=20.0)  # actual 170 ms, predicted 100 ms
    assert prediction_error(admission(8), slow, engine(tmp_path)) == pytest.approx(70 / 170)


def test_prediction_error_needs_a_profile_and_a_prefill(tmp_path: Path) -> None:
    assert prediction_error(admission(), result(), engine(tmp_path, profiles={})) is None
    assert prediction_error(admission(), result(prompt_ms=0.0), engine(tmp_path)) is None


SMAPS = """\
7f0000000000-7f0000100000 r--s 00000000 fe:00 123    /models/a.gguf
Size:               1024 kB
Rss:                 512 kB
VmFlags: rd sh mr mw me ms sd
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                 999 kB
7f0000200000-7f0000300000 r--s 00100000 fe:00 123    /models/a.gguf
Rss:                   4 kB
7f0000300000-7f0000400000 r--s 00000000 fe:00 124    /models/b (1).gguf
Rss:                   8 kB
"""


def test_mapped_rss_sums_every_mapping_of_a_file() -> None:
    rss = mapped_rss_bytes(SMAPS, [Path("/models/a.gguf"), Path("/models/b (1).gguf"), Path("/models/c.gguf")])
    assert rss == {Path("/models/a.gguf"): 516 * 1024, Path("/models/b (1).gguf"): 8 * 1024,
                   Path("/models/c.gguf"): 0}


def test_the_exposition_parses_and_every_series_is_there_from_the_start(tmp_path: Path) -> None:
    metrics = Metrics(engine(tmp_path))
    before = samples(metrics)
    assert before[("edgeserve_requests_total", (("outcome", "met"), ("variant", VARIANT)))] == 0
    assert before[("edgeserve_requests_total", (("outcome", "refused"), ("variant", "none")))] == 0
    assert before[("edgeserve_deadline_total", (("result", "missed"),))] == 0
    assert before[("edgeserve_queue_depth", ())] == 3
    assert before[("edgeserve_running_generations", ())] == 1
    assert before[("edgeserve_variant_loaded", (("variant", VARIANT),))] == 1
    assert before[("edgeserve_variant_file_bytes", (("variant", VARIANT),))] == 1000
    assert ("edgeserve_variant_resident_bytes", (("variant", VARIANT),)) in before
    assert before[("edgeserve_decode_ms_per_token", (("variant", VARIANT),))] == 10.0
    assert before[("edgeserve_prefill_ms_per_token", (("variant", VARIANT),))] == 1.0


def test_a_finished_request_moves_counters_and_histograms(tmp_path: Path) -> None:
    metrics = Metrics(engine(tmp_path))
    generation = result(tokens=8, prompt_ms=30.0, token_ms=10.0)
    metrics.finished(admission(8), generation, "met", total_ms=250.0, queue_ms=100.0)
    metrics.turned_away("refused")
    metrics.turned_away("refused", VARIANT)
    after = samples(metrics)
    variant = (("variant", VARIANT),)
    assert after[("edgeserve_requests_total", (("outcome", "met"), *variant))] == 1
    assert after[("edgeserve_requests_total", (("outcome", "refused"), ("variant", "none")))] == 1
    assert after[("edgeserve_requests_total", (("outcome", "refused"), *variant))] == 1
    assert after[("edgeserve_deadline_total", (("result", "met"),))] == 1
    assert after[("edgeserve_prompt_tokens_total", variant)] == 10
    assert after[("edgeserve_completion_tokens_total", variant)] == 8
    assert after[("edgeserve_queue_wait_seconds_sum", variant)] == pytest.approx(0.1)
    assert after[("edgeserve_request_duration_seconds_sum", variant)] == pytest.approx(0.25)
    # 70 ms of decode after the first token: the first came 180 ms after arrival
    assert after[("edgeserve_time_to_first_token_seconds_sum", variant)] == pytest.approx(0.18)
    assert after[("edgeserve_prediction_error_ratio_count", variant)] == 1


def test_a_request_that_never_reached_llama_cpp_counts_but_has_no_timings(tmp_path: Path) -> None:
    metrics = Metrics(engine(tmp_path))
    metrics.finished(admission(), None, "cancelled", total_ms=40.0, queue_ms=0.0)
    after = samples(metrics)
    variant = (("variant", VARIANT),)
    assert after[("edgeserve_requests_total", (("outcome", "cancelled"), *variant))] == 1
    assert after[("edgeserve_request_duration_seconds_count", variant)] == 1
    assert ("edgeserve_queue_wait_seconds_count", variant) not in after
    assert after[("edgeserve_deadline_total", (("result", "met"),))] == 0


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    one, two = Metrics(engine(tmp_path)), Metrics(engine(tmp_path))
    one.turned_away("rejected")
    assert samples(one)[("edgeserve_requests_total", (("outcome", "rejected"), ("variant", "none")))] == 1
    assert samples(two)[("edgeserve_requests_total", (("outcome", "rejected"), ("variant", "none")))] == 0
