from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import msgspec
import pytest

from edgeserve.cli import build_parser
from edgeserve.routing.batching import Board, SeqLoad, VariantLoad, fit_budget
from edgeserve.routing.costs import predict_ms
from edgeserve.routing.policy import Decision, RoutingRequest, VariantCandidate, choose
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.routing.simulator import (
    Arrival,
    accuracy_vs_deadline,
    choice_spans,
    crossover_deadline,
    deadline_grid,
    deadline_range,
    parallel_of,
    simulate,
    sweep_trace,
)
from edgeserve.tools.simulate import main, run_simulate
from tests.unit.routing.conftest import POLICIES, flat_profile

PROMPT = 150
HOUR = 3_600_000.0


def pick(policy: PolicyFile, candidates: list[VariantCandidate], deadline: float,
         **kwargs: object) -> str | None:
    decision = choose(RoutingRequest(prompt_tokens=PROMPT, deadline_ms=deadline,
                                     **kwargs),  # type: ignore[arg-type]
                      candidates, policy, 0)
    return decision.variant_name if isinstance(decision, Decision) else None


# ---- the study's qualitative result ---------------------------------------------------------


def test_study_q2k_below_the_crossover_q8_above(study_policy: PolicyFile,
                                                study_candidates: list[VariantCandidate]) -> None:
    crossover = crossover_deadline(study_policy, study_candidates, PROMPT)
    assert crossover is not None
    assert 1 * HOUR < crossover < 6 * HOUR
    assert pick(study_policy, study_candidates, crossover) == "q8_0"
    assert pick(study_policy, study_candidates, crossover - 1000) == "q2_k"
    lo, hi = deadline_range(study_policy, study_candidates, PROMPT)
    rows = accuracy_vs_deadline(study_policy, study_candidates, PROMPT,
                                deadline_grid(lo, hi, 40))
    chosen = [row.variant for row in rows if row.variant is not None]
    assert rows[0].variant is None  # the shortest deadline fits nothing
    assert chosen == sorted(chosen)  # q2_k ... q2_k, q8_0 ... q8_0: one switch
    for row in rows:
        if row.variant is None:
            continue
        assert row.variant == ("q2_k" if row.deadline_ms < crossover else "q8_0")
        assert row.expected_accuracy == max(row.per_variant.values())
    # with no deadline (best quality) the 8-bit model wins, as at unlimited budget in the study
    assert pick(study_policy, study_candidates, None) == "q8_0"  # type: ignore[arg-type]


def test_study_hints_and_aav_make_q8_overtake_sooner(
        study_policy: PolicyFile, study_candidates: list[VariantCandidate]) -> None:
    with_hint = crossover_deadline(study_policy, study_candidates, PROMPT, hint=True)
    without = crossover_deadline(study_policy, study_candidates, PROMPT, hint=False)
    aav = crossover_deadline(study_policy, study_candidates, PROMPT, style="aav", hint=True)
    assert with_hint is not None and without is not None and aav is not None
    assert aav < with_hint < without


def test_crossover_is_none_when_the_slow_variant_never_wins(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    assert crossover_deadline(simple_policy, fast_slow, 50, max_tokens=100) is None
    at = crossover_deadline(simple_policy, fast_slow, 50)
    assert at is not None and 4000 < at <= 4020


def test_choice_spans_agree_with_the_crossover(study_policy: PolicyFile,
                                               study_candidates: list[VariantCandidate]) -> None:
    spans = choice_spans(study_policy, study_candidates, PROMPT)
    assert [s.variant for s in spans] == [None, "q2_k", "q8_0"]
    assert spans[0].from_ms == 0 and spans[-1].to_ms is None
    assert all(a.to_ms == b.from_ms for a, b in itertools.pairwise(spans))
    assert spans[2].from_ms == crossover_deadline(study_policy, study_candidates, PROMPT)
    refused_until = spans[1].from_ms
    assert pick(study_policy, study_candidates, refused_until - 1) is None
    assert pick(study_policy, study_candidates, refused_until) == "q2_k"


def pair(ms_per_token: float) -> VariantCandidate:
    """slow's speculative pair: slow's curve, its own (cheaper) cost."""
    return VariantCandidate(variant_id="fam:slow+fast", name="slow",
                            profile=flat_profile("fam:slow+fast", ms_per_token), n_ctx=4096)


def test_a_pair_is_reported_apart_from_its_target(simple_policy: PolicyFile,
                                                  fast_slow: list[VariantCandidate]) -> None:
    candidates = [*fast_slow, pair(20.0)]
    spans = choice_spans(simple_policy, candidates, 50)
    assert [s.variant for s in spans] == [None, "fast", "slow+fast"]
    rows = accuracy_vs_deadline(simple_policy, candidates, 50, [10_000.0])
    assert rows[0].variant == "slow+fast"
    assert set(rows[0].per_variant) == {"fast", "slow", "slow+fast"}
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, deadline_ms=10_000)]
    result = simulate(trace, candidates, simple_policy)
    assert result.variant_shares == {"slow+fast": 1.0}
    assert result.outcomes[0].realized_accuracy == pytest.approx(0.8)  # slow's curve at 200


# ---- the simulated board --------------------------------------------------------------------


def batched(candidate: VariantCandidate, factors: dict[int, float]) -> VariantCandidate:
    """The candidate with measured batch step factors (a step of w sequences costs factors[w] steps)."""
    profile = msgspec.structs.replace(candidate.profile, batch_step_factors=factors)
    return msgspec.structs.replace(candidate, profile=profile)


def test_queue_waits_are_told_to_the_policy(simple_policy: PolicyFile,
                                            fast_slow: list[VariantCandidate]) -> None:
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100, deadline_ms=5000),
             Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100, deadline_ms=5000),
             Arrival(arrival_ms=100, prompt_tokens=50, max_tokens=100, deadline_ms=1500)]
    result = simulate(trace, fast_slow, simple_policy)
    first, second, third = result.outcomes
    assert first.queue_estimate_ms == 0 and first.finish_ms == 1000
    assert second.queue_estimate_ms == 1000
    # EDF: the third has the earliest deadline, so it waits only for the running job
    assert third.queue_estimate_ms == pytest.approx(900)
    assert third.start_ms == 1000 and second.start_ms == third.finish_ms
    assert result.hit_rate == 1.0 and result.refused == 0
    assert result.variant_shares == {"fast": 1.0}


def test_a_newcomer_may_not_make_a_queued_request_miss(simple_policy: PolicyFile,
                                                       fast_slow: list[VariantCandidate]) -> None:
    """Admission's promise (routing.batching.fit_budget, one place): the urgent newcomer goes
    first (EDF) but its budget is capped so the request waiting behind it still meets its deadline."""
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100),  # runs 0..1000
             Arrival(arrival_ms=10, prompt_tokens=50, max_tokens=50, deadline_ms=2000),  # 500 ms, by 2010
             Arrival(arrival_ms=20, prompt_tokens=50, max_tokens=200, deadline_ms=1900)]  # by 1920
    result = simulate(trace, fast_slow[:1], simple_policy)
    _, queued, urgent = result.outcomes
    assert urgent.budget_tokens == 51  # 2010 - 20 - (980 + 500) = 510 ms of slack, not 920 ms
    assert urgent.start_ms == 1000 and queued.start_ms == urgent.finish_ms
    assert queued.met_deadline is True and urgent.met_deadline is True


def test_four_simultaneous_requests_share_a_batch_with_parallel_4(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    """parallel 4 and measured batch factors: the four are all admitted with their whole budget
    and decode together (a step of 4 costs 1.5 steps of one); with parallel 1 the CPU serves them
    one after the other, so the second waits for the first and the last two cannot make it."""
    fast = [batched(fast_slow[0], {2: 1.2, 4: 1.5})]
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100, deadline_ms=2000)
             for _ in range(4)]
    together = simulate(trace, fast, simple_policy, parallel=4)
    assert together.admitted == 4 and together.hit_rate == 1.0
    assert [o.budget_tokens for o in together.outcomes] == [100] * 4
    assert all(o.start_ms == 0 and o.queue_estimate_ms == 0 for o in together.outcomes)
    finishes = [o.finish_ms or 0.0 for o in together.outcomes]
    # one prefill step each (10 ms, riding with the others' decode steps), then steps of 15 ms
    # at width 4: they finish within a few steps of each other, long before 4 x 1000 ms
    assert max(finishes) - min(finishes) <= 3 * 15 + 1e-9
    assert max(finishes) < 1700

    one_by_one = simulate(trace, fast, simple_policy, parallel=1)
    first, second, third, fourth = one_by_one.outcomes
    assert (first.start_ms, first.finish_ms) == (0, 1000)
    assert second.queue_estimate_ms == 1000 and (second.start_ms, second.finish_ms) == (1000, 2000)
    assert third.variant is None and fourth.variant is None
    assert one_by_one.refusals_by_code == {"deadline_infeasible": 2} and one_by_one.hit_rate == 1.0


def test_requests_turned_away_for_room_make_later_ones_share_the_batch(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    """Four clients ask together every second, each with a 2 s deadline. The first is priced
    alone and takes the whole batch (the other three would make it miss). Their refusals count
    as demand until their deadlines, so later groups are priced at the width they will really
    share and most of each group is admitted; every admitted request keeps its deadline."""
    fast = [batched(fast_slow[0], {2: 1.2, 3: 1.35, 4: 1.5})]
    trace = [Arrival(arrival_ms=k * 1000 + j, prompt_tokens=50, max_tokens=400, deadline_ms=2000)
             for k in range(6) for j in range(4)]
    result = simulate(trace, fast, simple_policy, parallel=4)
    groups = [result.outcomes[k * 4:(k + 1) * 4] for k in range(6)]
    assert [o.variant is not None for o in groups[0]] == [True, False, False, False]
    assert sum(o.variant is not None for group in groups[2:] for o in group) >= 12  # of 16
    assert result.admitted >= 3 * 6 and result.hit_rate == 1.0


def test_the_simulator_and_fit_budget_agree_on_an_admission(
        simple_policy: PolicyFile, fast_slow: list[VariantCandidate]) -> None:
    """B arrives at 300 ms while A (100 tokens, due at 1100 ms) decodes; B joining slows A's
    steps to 12 ms, so B's budget is capped to keep A on time (B's own deadline is too close to
    wait for A to finish instead). The board the server would
    publish at 300 ms, given to fit_budget by hand, yields the same budget, start and finish."""
    fast = batched(fast_slow[0], {2: 1.2})
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100, deadline_ms=1100),
             Arrival(arrival_ms=300, prompt_tokens=50, max_tokens=200, deadline_ms=1000)]
    result = simulate(trace, [fast], simple_policy, parallel=2)
    a, b = result.outcomes
    # at 300 ms A has had its prefill step (10 ms, its first token) and 29 steps of 10 ms
    board = Board({"fam:fast": VariantLoad(fast.profile, 2)},
                  (SeqLoad(0, "fam:fast", tokens_left=70, context=80, deadline_ms=800),))
    fit = fit_budget(board, "fam:fast", prompt_tokens=50, cap=200, minimum=16, available_ms=1000)
    assert fit is not None and fit.blocked_by == "requests already running"
    assert b.budget_tokens == fit.tokens < 200
    assert b.start_ms == 300 + fit.start_ms
    assert b.finish_ms == pytest.approx(300 + fit.finish_ms)
    assert a.met_deadline is True and a.finish_ms is not None and a.finish_ms <= 1100
    assert b.met_deadline is True


def test_parallel_per_variant() -> None:
    assert parallel_of(4, "fam:fast") == 4
    assert parallel_of({"fam:fast": 2}, "fam:fast") == 2
    assert parallel_of({"fam:fast": 2}, "fam:slow") == 1
    with pytest.raises(ValueError, match="at least 1"):
        parallel_of(0, "fam:fast")


def test_overload_is_refused_fast_and_admitted_requests_meet_deadlines(
        study_policy: PolicyFile, study_candidates: list[VariantCandidate]) -> None:
    trace = [Arrival(arrival_ms=i * 60_000.0, prompt_tokens=PROMPT, deadline_ms=2 * HOUR)
             for i in range(20)]
    result = simulate(trace, study_candidates, study_policy)
    assert result.refused > 0 and result.refusals_by_code == {"deadline_infeasible": result.refused}
    assert result.hit_rate == 1.0
    assert result.served_rate is not None and result.served_rate < 1.0
    assert result.mean_expected_accuracy_all < (result.mean_expected_accuracy or 0)


def test_noise_is_seeded_and_overruns_are_cut_at_the_deadline(
        study_policy: PolicyFile, study_candidates: list[VariantCandidate]) -> None:
    trace = sweep_trace(study_policy, study_candidates, PROMPT, 30)
    one = simulate(trace, study_candidates, study_policy, noise=0.3, seed=1)
    again = simulate(trace, study_candidates, study_policy, noise=0.3, seed=1)
    other = simulate(trace, study_candidates, study_policy, noise=0.3, seed=2)
    assert one == again
    assert one.outcomes != other.outcomes
    missed = [o for o in one.outcomes if o.met_deadline is False]
    assert missed, "σ=0.3 should push some requests past the 5 % margin"
    for o in missed:
        assert o.finish_ms is not None and o.arrival.deadline_ms is not None
        assert o.finish_ms <= o.arrival.arrival_ms + o.arrival.deadline_ms
        assert o.realized_accuracy <= o.expected_accuracy
    exact = simulate(trace, study_candidates, study_policy)
    assert exact.hit_rate == 1.0
    assert exact.mean_realized_accuracy_all == exact.mean_expected_accuracy_all


def test_requests_without_deadline_go_last(simple_policy: PolicyFile,
                                           fast_slow: list[VariantCandidate]) -> None:
    trace = [Arrival(arrival_ms=0, prompt_tokens=50, max_tokens=100),
             Arrival(arrival_ms=1, prompt_tokens=50, max_tokens=100),
             Arrival(arrival_ms=2, prompt_tokens=50, max_tokens=16, deadline_ms=10_000)]
    result = simulate(trace, fast_slow, simple_policy)
    running, waiting, urgent = result.outcomes
    assert urgent.start_ms == running.finish_ms
    assert waiting.start_ms == urgent.finish_ms
    assert waiting.met_deadline is None and result.with_deadline == 1


def test_sweep_spaces_requests_so_none_waits(study_policy: PolicyFile,
                                            study_candidates: list[VariantCandidate]) -> None:
    trace = sweep_trace(study_policy, study_candidates, PROMPT, 10)
    result = simulate(trace, study_candidates, study_policy)
    assert all(o.queue_estimate_ms == 0 for o in result.outcomes)
    assert set(result.variant_shares) == {"q2_k", "q8_0"}
    assert sum(result.variant_shares.values()) == pytest.approx(1.0)


def test_deadline_grid() -> None:
    grid = deadline_grid(100, 10_000, 5)
    assert grid == [100.0, 316.0, 1000.0, 3162.0, 10000.0]


def test_range_covers_first_feasible_to_full_budget(
        study_policy: PolicyFile, study_candidates: list[VariantCandidate]) -> None:
    lo, hi = deadline_range(study_policy, study_candidates, PROMPT)
    q2 = study_candidates[0].profile
    q8 = study_candidates[1].profile
    assert lo < predict_ms(q2, PROMPT, 16) < hi
    assert predict_ms(q8, PROMPT, 1024) < hi


# ---- the command ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", *argv])


STUDY = ["--policy", str(POLICIES / "llama31-8b-rk3568.toml"),
         "--profile", str(POLICIES / "llama31-8b-rk3568.profile.json")]


def test_run_simulate_prints_the_crossover(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_simulate(parse(STUDY)) == 0
    out = capsys.readouterr().out
    assert "hit rate 100.0 %" in out
    assert "variant shares: q2_k" in out and "q8_0" in out
    assert "accuracy vs deadline" in out
    assert "crossover: q8_0 overtakes q2_k at a deadline of 2 h 49 min" in out


def test_run_simulate_with_a_trace_and_a_keyed_profile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profiles = json.loads((POLICIES / "llama31-8b-rk3568.profile.json").read_text())
    keyed = tmp_path / "profiles.json"
    keyed.write_text(json.dumps({p["variant_id"]: p for p in profiles}))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("# two requests\n"
                     '{"arrival_ms": 0, "prompt_tokens": 150, "max_tokens": 256, '
                     '"deadline_ms": 7200000}\n\n'
                     '{"arrival_ms": 10, "prompt_tokens": 150, "max_tokens": null, '
                     '"deadline_ms": 60000}\n')
    argv = ["--policy", str(POLICIES / "llama31-8b-rk3568.toml"), "--profile", str(keyed),
            "--trace", str(trace), "--hint", "off", "--rows", "5"]
    assert run_simulate(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "requests 2  admitted 1  refused 1 (deadline_infeasible 1)" in out
    assert "hint off" in out
    assert "crossover: q8_0 overtakes q2_k at a deadline of 3 h 32 min" in out


@pytest.mark.parametrize("files,message", [
    ({"trace.jsonl": '{"arrival_ms": "soon"}\n'}, "trace.jsonl:1"),
    ({"profile.json": "[]"}, "no cost profiles"),
    ({"profile.json": '[{"variant_id": "x"}]'}, "profile.json"),
    ({"policy.toml": 'name = "x"\n[routing]\nmin_useful_tokens = -1\n'},
     "policy.toml: at routing.min_useful_tokens"),
])
def test_bad_inputs_fail_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         files: dict[str, str], message: str) -> None:
    paths = {"policy.toml": POLICIES / "llama31-8b-rk3568.toml",
             "profile.json": POLICIES / "llama31-8b-rk3568.profile.json"}
    for name, text in files.items():
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    argv = ["--policy", str(paths["policy.toml"]), "--profile", str(paths["profile.json"])]
    if "trace.jsonl" in paths:
        argv += ["--trace", str(paths["trace.jsonl"])]
    assert run_simulate(parse(argv)) == 2
    assert message in capsys.readouterr().err


def test_run_simulate_with_parallel_places(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The study's profiles with batch factors (a step of 4 costs 1.3 steps of one, as on a board
    bound by memory bandwidth): four 2-hour requests at once fit only when they share a batch."""
    profiles = json.loads((POLICIES / "llama31-8b-rk3568.profile.json").read_text())
    for p in profiles:
        p["batch_step_factors"] = {"2": 1.1, "4": 1.3}
    batched_profiles = tmp_path / "profiles.json"
    batched_profiles.write_text(json.dumps(profiles))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join('{"arrival_ms": 0, "prompt_tokens": 150, "max_tokens": 64, '
                             '"deadline_ms": 7200000}\n' for _ in range(4)))
    base = ["--policy", str(POLICIES / "llama31-8b-rk3568.toml"), "--profile", str(batched_profiles),
            "--trace", str(trace), "--rows", "3"]
    assert run_simulate(parse(base)) == 0
    alone = capsys.readouterr().out
    assert "parallel 1, prefill chunk 64" in alone
    assert "requests 4  admitted 2  refused 2" in alone
    assert run_simulate(parse([*base, "--parallel", "4", "--prefill-chunk", "32"])) == 0
    together = capsys.readouterr().out
    assert "parallel 4, prefill chunk 32" in together
    assert "requests 4  admitted 4  refused 0" in together
    assert "hit rate 100.0 %" in together


def test_parallel_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse([*STUDY, "--parallel", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_module_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*STUDY, "--style", "aav", "--requests", "5", "--rows", "4"]) == 0
    assert "crossover: q8_0 overtakes q2_k at a deadline of 2 h 3 min" in capsys.readouterr().out


def test_simulation_results_serialise(study_policy: PolicyFile,
                                      study_candidates: list[VariantCandidate]) -> None:
    result = simulate(sweep_trace(study_policy, study_candidates, PROMPT, 3), study_candidates,
                      study_policy)
    assert json.loads(msgspec.json.encode(result))["requests"] == 3
