"""The pure parts of `edgeserve bench-routing`: the request plan, the statistics, the report."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgeserve.cli import build_parser
from edgeserve.routing.costs import CostProfile, fit_profile, observe, predict_ms
from edgeserve.tools.routing_bench import (
    Crossover,
    Environment,
    Row,
    adjusted_prediction_ms,
    error_stats,
    plan_requests,
    report_markdown,
    row_from_response,
    sampled_tokens,
    summarise,
)

PROFILE = CostProfile(variant_id="fam:q4_1", prefill_fixed_ms=20.0, prefill_ms_per_token=1.0,
                      decode_ms_per_token=10.0)


def row(index: int = 0, *, finish: str = "length", predicted: float = 120.0, actual: float = 100.0,
        budget: int = 10, completion: int = 10, prompt: int = 10, deadline: int = 1000,
        client: float = 105.0) -> Row:
    return Row(index=index, status=200, deadline_ms=deadline, client_ms=client, sent_s=0.0,
               target_prompt_tokens=prompt, variant="fam:q4_1", predicted_ms=predicted,
               actual_ms=actual, queue_ms=0.0, budget_tokens=budget, finish=finish,
               prompt_tokens=prompt, completion_tokens=completion, prompt_ms=30.0,
               decode_ms=actual - 35.0)


def refused(index: int = 0) -> Row:
    return Row(index=index, status=429, deadline_ms=100, client_ms=3.0, sent_s=0.0,
               target_prompt_tokens=50, error_code="deadline_infeasible")


# ---- the plan ------------------------------------------------------------------------------


def test_plan_is_reproducible_and_spread() -> None:
    plans = plan_requests(200, seed=1)
    assert plans == plan_requests(200, seed=1)
    assert plans != plan_requests(200, seed=2)
    assert all(20 <= p.target_prompt_tokens <= 600 for p in plans)
    assert all(100 <= p.deadline_ms <= 10_000 for p in plans)
    deadlines = sorted(p.deadline_ms for p in plans)
    # log-uniform: the median is near sqrt(100 * 10000) = 1000 ms, far below the midpoint
    assert 600 < deadlines[100] < 1700


def shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_prompts_share_no_long_prefix() -> None:
    texts = [p.messages[0]["content"] for p in plan_requests(100, seed=1)]
    longest = max(shared_prefix(a, b) for a, b in itertools.combinations(texts, 2))
    assert longest < 20


def test_prompt_length_follows_the_target() -> None:
    short, long = (min(plan_requests(100, 1), key=lambda p: p.target_prompt_tokens),
                   max(plan_requests(100, 1), key=lambda p: p.target_prompt_tokens))
    assert len(long.messages[0]["content"].split()) > 10 * len(short.messages[0]["content"].split()) / 3


# ---- statistics ----------------------------------------------------------------------------


def test_error_stats() -> None:
    stats = error_stats([(110.0, 100.0), (90.0, 100.0), (150.0, 100.0)])
    assert stats is not None
    assert stats.n == 3
    assert stats.mape == pytest.approx((0.1 + 0.1 + 0.5) / 3)
    assert stats.median == pytest.approx(0.1)
    assert stats.bias == pytest.approx(0.1)
    assert error_stats([]) is None


def test_sampled_tokens_counts_the_end_of_sequence_step() -> None:
    assert sampled_tokens(row(finish="stop", completion=5)) == 6
    assert sampled_tokens(row(finish="length", completion=5)) == 5
    assert sampled_tokens(row(finish="deadline", completion=5)) == 5


def test_adjusted_prediction_rescales_to_the_tokens_sampled() -> None:
    budget_ms = predict_ms(PROFILE, 10, 10)  # 20 + 10 + 9 * 10 = 120
    early = row(predicted=budget_ms * 1.5, budget=10, completion=3, finish="stop")  # drift 1.5
    assert adjusted_prediction_ms(early, PROFILE) == pytest.approx(1.5 * predict_ms(PROFILE, 10, 4))
    full = row(predicted=budget_ms, budget=10, completion=10)
    assert adjusted_prediction_ms(full, PROFILE) == pytest.approx(budget_ms)


def test_row_from_response() -> None:
    plan = plan_requests(1, 1)[0]
    body = {"edgeserve": {"variant": "fam:q2_k", "predicted_ms": 90.5, "actual_ms": 88.0,
                          "queue_ms": 0.1, "budget_tokens": 12, "hint_tokens": 6,
                          "finish": "stop", "reason": "r"},
            "timings": {"prompt_n": 70, "prompt_ms": 30.0, "predicted_n": 8, "predicted_ms": 50.0}}
    ok = row_from_response(plan, 200, body, 95.0, 1.0)
    assert ok.admitted and ok.variant == "fam:q2_k" and ok.completion_tokens == 8
    assert ok.prompt_tokens == 70 and ok.finish == "stop"
    no = row_from_response(plan, 429, {"error": {"code": "deadline_infeasible"}}, 3.0, 1.0)
    assert not no.admitted and no.error_code == "deadline_infeasible"


def test_summarise() -> None:
    rows = [row(0, predicted=110.0, actual=100.0), row(1, finish="deadline", actual=1001.0),
            row(2, finish="stop", completion=2, actual=50.0), refused(3)]
    summary = summarise(rows, {"fam:q4_1": PROFILE})
    assert (summary.requests, summary.admitted, summary.refused, summary.failed) == (4, 3, 1, 0)
    assert summary.refusal_codes == {"deadline_infeasible": 1}
    assert summary.met_server == pytest.approx(2 / 3)
    assert summary.errors_full_budget is not None and summary.errors_full_budget.n == 1
    assert summary.errors_full_budget.mape == pytest.approx(0.1)
    assert summary.errors_not_cut is not None and summary.errors_not_cut.n == 2
    assert summary.variant_shares == {"fam:q4_1": 1.0}


def test_report_has_the_section_and_the_figures() -> None:
    args = build_parser().parse_args(["bench-routing", "--n", "4"])
    summary = summarise([row(0), refused(1)], {"fam:q4_1": PROFILE})
    env = Environment("2025-01-01", "x86_64, 2 cores", 1.0, 1.2, 30.0, "edgeserve bench-routing --n 4")
    text = report_markdown(summary, [5.0, 6.0, 7.0], [Crossover("boxed", "q2_k", "q8_0", 7_200_000.0)],
                           env, args)
    assert text.startswith("## Deadline routing (issue 3)\n")
    assert "`edgeserve bench-routing --n 4`" in text
    assert "1 of 2 (50.0 %)" in text
    assert "median 6 µs" in text
    assert "q8_0 from 2 h 0 min" in text


def test_parser_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["bench-routing", "--jsonl", str(tmp_path / "rows.jsonl")])
    assert (args.n, args.seed, args.concurrency, args.max_tokens) == (100, 1, 1, 256)


# ---- the prefill curve the benchmark found (edgeserve/routing/costs.py) ------------------------
# Served prefill time grew faster than linearly with the prompt (each prompt token attends to all
# before it); these pin the growth term added to the cost model for that.


def test_prefill_growth_is_the_sum_over_prompt_positions() -> None:
    profile = CostProfile(variant_id="v", prefill_fixed_ms=10.0, prefill_ms_per_token=2.0,
                          prefill_growth_ms_per_token_per_1k_ctx=6.0, decode_ms_per_token=20.0)
    by_position = 10.0 + sum(2.0 + 6.0 * i / 1000 for i in range(1, 301))
    assert predict_ms(profile, 300, 1) == pytest.approx(by_position)


def test_fit_recovers_a_prefill_curve_and_keeps_a_line_a_line() -> None:
    def curve(p: int) -> float:
        return 30.0 + 2.5 * p + 7.0 * p * (p + 1) / 2000

    decode = [(20, 16.0), (800, 19.0)]
    fitted = fit_profile([(p, curve(p)) for p in (16, 64, 256, 512)], decode, variant_id="v")
    assert fitted.prefill_fixed_ms == pytest.approx(30.0)
    assert fitted.prefill_ms_per_token == pytest.approx(2.5)
    assert fitted.prefill_growth_ms_per_token_per_1k_ctx == pytest.approx(7.0)
    line = fit_profile([(p, 30.0 + 2.5 * p) for p in (16, 64, 256, 512)], decode, variant_id="v")
    assert line.prefill_growth_ms_per_token_per_1k_ctx == 0.0
    two = fit_profile([(32, curve(32)), (256, curve(256))], decode, variant_id="v")
    assert two.prefill_growth_ms_per_token_per_1k_ctx == 0.0  # two lengths cannot show a curve


def test_observe_scales_the_prefill_growth_too() -> None:
    profile = CostProfile(variant_id="v", prefill_fixed_ms=10.0, prefill_ms_per_token=2.0,
                          prefill_growth_ms_per_token_per_1k_ctx=6.0, decode_ms_per_token=20.0)
    slower = observe(profile, 300, 2 * predict_ms(profile, 300, 1), 0, 0.0, alpha=1.0)
    assert slower.prefill_growth_ms_per_token_per_1k_ctx == pytest.approx(12.0)
    assert predict_ms(slower, 300, 1) == pytest.approx(2 * predict_ms(profile, 300, 1))
