"""The batching timeline: the stepping loop's rules, in milliseconds, without a model."""

from __future__ import annotations

import math

import pytest

from edgeserve.routing.batching import (
    Board,
    LoadMeter,
    SeqLoad,
    Timeline,
    UnservedDemand,
    VariantLoad,
    fit_budget,
    most_urgent,
)
from edgeserve.routing.costs import CostProfile, step_ms, width_factor


def profile(decode: float = 10.0, prefill_per_token: float = 1.0, factors: dict[int, float] | None = None,
            variant: str = "f:q8_0") -> CostProfile:
    return CostProfile(variant_id=variant, prefill_ms_per_token=prefill_per_token, decode_ms_per_token=decode,
                       batch_step_factors=factors if factors is not None else {2: 1.2, 4: 1.5, 8: 2.0})


def test_width_factor_interpolates_and_extends() -> None:
    p = profile()
    assert width_factor(p, 1) == 1.0
    assert width_factor(p, 2) == pytest.approx(1.2)
    assert width_factor(p, 3) == pytest.approx(1.35)
    assert width_factor(p, 16) == pytest.approx(3.0)  # last slope 0.125 per sequence
    assert width_factor(profile(factors={}), 4) == 4.0  # nothing measured: no batching gain assumed


def test_step_grows_with_context() -> None:
    p = msgspec_replace_growth(profile(), 2.0)
    assert step_ms(p, 1, 1000) == pytest.approx(12.0)


def msgspec_replace_growth(p: CostProfile, growth: float) -> CostProfile:
    import msgspec

    return msgspec.structs.replace(p, decode_growth_ms_per_token_per_1k_ctx=growth)


def test_one_sequence_alone_costs_prefill_then_steps() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)})
    finishes = board.finishes([SeqLoad(1, "f:q8_0", tokens_left=11, prompt_left=20)])
    # prefill 20 ms gives the first token, then 10 steps of 10 ms
    assert finishes[1] == pytest.approx(20 + 100)


def test_batched_sequences_share_steps() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)})
    loads = [SeqLoad(k, "f:q8_0", tokens_left=10, context=5) for k in range(4)]
    finishes = board.finishes(loads)
    assert all(f == pytest.approx(10 * 10 * 1.5) for f in finishes.values())


def test_parallel_limit_makes_the_rest_wait_earliest_deadline_first() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(factors={2: 2.0}), parallel=1)})
    timeline = board.timeline([
        SeqLoad(1, "f:q8_0", tokens_left=5, context=1, deadline_ms=None),
        SeqLoad(2, "f:q8_0", tokens_left=5, context=1, deadline_ms=500, running=False),
        SeqLoad(3, "f:q8_0", tokens_left=5, context=1, deadline_ms=100, running=False),
    ])
    finishes = timeline.run()
    assert finishes[1] == pytest.approx(50)
    assert timeline.start_ms[3] == pytest.approx(50) and finishes[3] == pytest.approx(100)
    assert timeline.start_ms[2] == pytest.approx(100) and finishes[2] == pytest.approx(150)


def test_most_urgent_variant_runs_first() -> None:
    board = Board({"f:q2_k": VariantLoad(profile(decode=5), 2), "f:q8_0": VariantLoad(profile(), 2)})
    finishes = board.finishes([
        SeqLoad(1, "f:q2_k", tokens_left=10, context=1, deadline_ms=1000),
        SeqLoad(2, "f:q8_0", tokens_left=10, context=1, deadline_ms=200),
    ])
    assert finishes[2] == pytest.approx(100)
    assert finishes[1] == pytest.approx(150)


def test_most_urgent_picks_the_earliest_deadline_then_the_earliest_arrival_and_skips_empty_batches() -> None:
    assert most_urgent([("a", [(5.0, 1), (9.0, 2)]), ("b", [(3.0, 3)]), ("c", [])]) == "b"
    # no deadlines: the variant holding the oldest request, whatever the order of the variants
    assert most_urgent([("a", [(math.inf, 7)]), ("b", [(math.inf, 4)])]) == "b"
    assert most_urgent([("a", [(4.0, 1)]), ("b", [(4.0, 2), (1.0, 3)])]) == "b"
    assert most_urgent([("a", []), ("b", [])]) is None


def test_requests_without_deadlines_on_two_variants_are_served_first_come_first_served() -> None:
    # variant a is listed first but its request came later: b's runs first and is not starved
    board = Board({"f:a": VariantLoad(profile(variant="f:a"), parallel=1),
                   "f:b": VariantLoad(profile(variant="f:b"), parallel=1)})
    finishes = board.finishes([SeqLoad(9, "f:a", tokens_left=10, context=5),
                               SeqLoad(2, "f:b", tokens_left=10, context=5)])
    assert finishes[2] == pytest.approx(100) and finishes[9] == pytest.approx(200)


def test_prefill_chunks_ride_along_with_decode_steps() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=2)}, chunk_tokens=10)
    timeline = board.timeline([
        SeqLoad(1, "f:q8_0", tokens_left=100, context=50),
        SeqLoad(2, "f:q8_0", tokens_left=3, prompt_left=30),
    ])
    finishes = timeline.run()
    # three chunk steps of 10 ms prefill + 10 ms decode for seq 1, then 2 steps at width 2
    assert finishes[2] == pytest.approx(3 * 20 + 2 * 12)


def test_fit_budget_alone_matches_the_deadline() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)})
    fit = fit_budget(board, "f:q8_0", prompt_tokens=20, cap=1000, minimum=4, available_ms=520)
    assert fit is not None
    assert fit.tokens == 51  # 20 ms prefill + 50 steps of 10 ms
    assert fit.start_ms == 0.0 and fit.finish_ms == pytest.approx(520)


def test_fit_budget_without_deadline_takes_the_cap() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)})
    fit = fit_budget(board, "f:q8_0", 20, cap=64, minimum=4, available_ms=math.inf)
    assert fit is not None and fit.tokens == 64


def test_fit_budget_protects_admitted_deadlines() -> None:
    # One sequence runs with 100 tokens left and 1600 ms: alone it needs 1000 ms. Joining slows
    # every step to 12 ms, so the newcomer may only join for a while.
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)},
                  (SeqLoad(1, "f:q8_0", tokens_left=100, context=10, deadline_ms=1100),))
    # (its own deadline is too close to wait until the running one leaves: that would give 30)
    fit = fit_budget(board, "f:q8_0", 10, cap=500, minimum=4, available_ms=1300)
    assert fit is not None
    assert fit.blocked_by == "requests already running" and fit.join_width is None
    finishes = board.finishes([SeqLoad(-1, "f:q8_0", fit.tokens, prompt_left=10, running=False)])
    assert finishes[1] <= 1100
    too_many = board.finishes([SeqLoad(-1, "f:q8_0", fit.tokens + 1, prompt_left=10, running=False)])
    assert too_many[1] > 1100


def test_fit_budget_refuses_when_nothing_fits() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=1)},
                  (SeqLoad(1, "f:q8_0", tokens_left=100, context=10, deadline_ms=5000),))
    assert fit_budget(board, "f:q8_0", 10, cap=50, minimum=16, available_ms=500) is None


def test_a_late_sequence_does_not_block_newcomers() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)},
                  (SeqLoad(1, "f:q8_0", tokens_left=100, context=10, deadline_ms=10),))
    fit = fit_budget(board, "f:q8_0", 10, cap=50, minimum=4, available_ms=10_000)
    assert fit is not None and fit.tokens == 50


def test_advance_to_runs_the_steps_that_start_before_and_reports_who_finished() -> None:
    timeline = Board({"f:q8_0": VariantLoad(profile(), parallel=4)}).timeline([
        SeqLoad(1, "f:q8_0", tokens_left=10, context=1),
        SeqLoad(2, "f:q8_0", tokens_left=3, context=1, running=False),
    ])  # two decoding at width 2: steps of 12 ms
    assert timeline.advance_to(30) == [2]  # steps at 0, 12, 24: the one under way at 30 ends at 36
    assert timeline.now_ms == pytest.approx(36)
    assert timeline.finish_ms[2] == pytest.approx(36)
    assert timeline.advance_to(36) == []  # nothing starts before 36: nothing runs
    assert timeline.advance_to(1000) == [1]
    assert timeline.finish_ms[1] == pytest.approx(36 + 7 * 10)
    assert timeline.now_ms == 1000  # then idle until the arrival
    assert timeline.advance_to(math.inf) == [] and timeline.now_ms == 1000


def test_advance_to_idles_an_empty_board_and_steps_in_whole_prefill_chunks() -> None:
    timeline = Timeline({"f:q8_0": VariantLoad(profile(), 1)}, chunk_tokens=10)
    assert timeline.advance_to(50) == [] and timeline.now_ms == 50
    timeline.add(SeqLoad(1, "f:q8_0", tokens_left=2, prompt_left=25))
    timeline.advance_to(55)  # the first chunk (10 ms) started at 50: it runs to its end
    assert timeline.now_ms == pytest.approx(60)
    assert timeline.advance_to(math.inf) == [1]
    assert timeline.finish_ms[1] == pytest.approx(50 + 25 + 10)
    assert timeline.start_ms[1] == 50


def test_advancing_in_pieces_ends_where_running_through_does() -> None:
    def fresh() -> Timeline:
        board = Board({"f:q2_k": VariantLoad(profile(decode=5), 2), "f:q8_0": VariantLoad(profile(), 1)},
                      chunk_tokens=16)
        return board.timeline([
            SeqLoad(1, "f:q8_0", tokens_left=40, prompt_left=30, deadline_ms=2000),
            SeqLoad(2, "f:q8_0", tokens_left=20, prompt_left=10, deadline_ms=900, running=False),
            SeqLoad(3, "f:q2_k", tokens_left=60, prompt_left=50),
            SeqLoad(4, "f:q2_k", tokens_left=30, context=12, deadline_ms=1500),
        ])

    whole = fresh().run()
    pieces = fresh()
    for t in range(0, 2000, 37):
        pieces.advance_to(t)
    pieces.advance_to(math.inf)
    assert pieces.finish_ms.keys() == whole.keys()
    for key, finish in whole.items():
        assert pieces.finish_ms[key] == pytest.approx(finish)


def test_board_of_a_timeline_predicts_the_same_finishes_from_now() -> None:
    board = Board({"f:q2_k": VariantLoad(profile(decode=5), 1), "f:q8_0": VariantLoad(profile(), 2)},
                  chunk_tokens=16)
    timeline = board.timeline([
        SeqLoad(1, "f:q8_0", tokens_left=40, prompt_left=30, deadline_ms=2000),
        SeqLoad(2, "f:q8_0", tokens_left=20, prompt_left=10, deadline_ms=900),
        SeqLoad(3, "f:q8_0", tokens_left=5, prompt_left=10, deadline_ms=3000, running=False),
        SeqLoad(4, "f:q2_k", tokens_left=30, context=12),
        SeqLoad(5, "f:q2_k", tokens_left=30, prompt_left=8, running=False),
    ])
    timeline.advance_to(123)
    now = timeline.now_ms
    snapshot = timeline.board()
    assert {s.key for s in snapshot.sequences} == {1, 2, 3, 4, 5} - set(timeline.finish_ms)
    assert all(s.running == (s.key not in (3, 5)) for s in snapshot.sequences)
    assert next(s for s in snapshot.sequences if s.key == 1).deadline_ms == pytest.approx(2000 - now)
    predicted = snapshot.finishes()
    actual = timeline.run()
    for key, finish in predicted.items():
        assert actual[key] == pytest.approx(now + finish)


def test_a_cost_factor_scales_a_sequence_s_steps() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(factors={2: 1.0}), parallel=2)})
    alone = board.finishes([SeqLoad(1, "f:q8_0", tokens_left=11, prompt_left=20, cost_factor=2.0)])
    assert alone[1] == pytest.approx(2 * (20 + 100))
    pair = board.finishes([SeqLoad(1, "f:q8_0", tokens_left=10, context=5, cost_factor=1.0),
                           SeqLoad(2, "f:q8_0", tokens_left=10, context=5, cost_factor=3.0)])
    assert pair == {1: pytest.approx(10 * 10 * 2.0), 2: pytest.approx(10 * 10 * 2.0)}  # the mean factor


def test_cut_at_deadline_is_the_runtime_s_deadline_rule() -> None:
    loads = [SeqLoad(1, "f:q8_0", tokens_left=10, context=1, deadline_ms=55),
             SeqLoad(2, "f:q8_0", tokens_left=3, prompt_left=40, deadline_ms=30, running=False)]
    predicted = Board({"f:q8_0": VariantLoad(profile(), 1)}).finishes(loads)
    assert predicted == {1: pytest.approx(100), 2: pytest.approx(160)}  # admission: whole budgets
    timeline = Timeline({"f:q8_0": VariantLoad(profile(), 1)}, cut_at_deadline=True)
    for load in loads:
        timeline.add(load)
    assert timeline.advance_to(math.inf) == [1, 2]
    # 5 steps end by 55; the sixth would end at 60, so it leaves at 50 with 5 tokens
    assert timeline.finish_ms[1] == pytest.approx(50) and timeline.cut[1] == 5
    # the waiting one joins at 50, past its deadline: it leaves before its first step
    assert timeline.finish_ms[2] == pytest.approx(50) and timeline.cut[2] == 0


def test_timeline_rejects_unknown_variant() -> None:
    with pytest.raises(KeyError):
        Timeline({}).add(SeqLoad(1, "nope", 1))


# ---- the policy on a board ------------------------------------------------------------------

def _board_of(candidates: list, parallel: int = 4, sequences: tuple[SeqLoad, ...] = ()) -> Board:  # type: ignore[type-arg]
    return Board({c.variant_id: VariantLoad(c.profile, parallel) for c in candidates}, sequences)


def test_choose_on_an_empty_board_matches_the_unbatched_choice(simple_policy, fast_slow) -> None:  # type: ignore[no-untyped-def]
    from edgeserve.routing.policy import Decision, RoutingRequest, choose

    request = RoutingRequest(prompt_tokens=10, requested_max_tokens=400, deadline_ms=6000)
    plain = choose(request, fast_slow, simple_policy, 0.0)
    batched = choose(request, fast_slow, simple_policy, 0.0, _board_of(fast_slow))
    assert isinstance(plain, Decision) and isinstance(batched, Decision)
    assert (batched.variant_id, batched.max_tokens) == (plain.variant_id, plain.max_tokens)
    assert batched.queue_wait_ms == 0.0


def test_choose_moves_to_the_variant_that_keeps_everyone_on_time(simple_policy, fast_slow) -> None:  # type: ignore[no-untyped-def]
    from edgeserve.routing.policy import Decision, RoutingRequest, choose

    # slow is full (parallel 1) with a sequence that needs 4.5 s of its 5 s: the newcomer goes to
    # fast at once, for no more than the 0.5 s the running one can spare (one CPU runs both)
    busy = (SeqLoad(1, "fam:slow", tokens_left=150, context=10, deadline_ms=5000),)
    board = _board_of(fast_slow, parallel=1, sequences=busy)
    request = RoutingRequest(prompt_tokens=10, requested_max_tokens=200, deadline_ms=3000)
    decision = choose(request, fast_slow, simple_policy, 0.0, board)
    assert isinstance(decision, Decision)
    assert decision.variant_name == "fast"
    assert decision.max_tokens == 50
    assert "capped by requests already running" in decision.reason
    assert decision.predicted_ms + decision.queue_wait_ms <= 3000


def test_choose_refuses_when_joining_would_make_others_miss(simple_policy, fast_slow) -> None:  # type: ignore[no-untyped-def]
    from edgeserve.routing.policy import Refusal, RoutingRequest, choose

    slow_only = [fast_slow[1]]
    busy = (SeqLoad(1, "fam:slow", tokens_left=100, context=10, deadline_ms=3000),)
    board = _board_of(slow_only, parallel=1, sequences=busy)
    request = RoutingRequest(prompt_tokens=10, requested_max_tokens=200, deadline_ms=2000)
    refusal = choose(request, slow_only, simple_policy, 0.0, board)
    assert isinstance(refusal, Refusal)
    assert refusal.code == "deadline_infeasible"
    assert "already admitted" in refusal.reason
    assert refusal.retry_after_s == 3
    assert refusal.crowded == ("fam:slow",)  # it would fit alone: demand the board should price


def test_a_newcomer_waits_rather_than_slow_a_request_that_needs_every_step() -> None:
    # seq 1 needs all of its 1000 ms: a wider batch would make it miss, so the newcomer (with
    # a loose deadline) waits until it leaves instead of being refused
    board = Board({"f:q8_0": VariantLoad(profile(), parallel=4)},
                  (SeqLoad(1, "f:q8_0", tokens_left=100, context=10, deadline_ms=1000),))
    fit = fit_budget(board, "f:q8_0", 10, cap=50, minimum=4, available_ms=10_000)
    assert fit is not None and fit.tokens == 50
    assert fit.join_width == 1
    assert fit.start_ms == pytest.approx(1000)
    finishes = board.finishes([SeqLoad(-1, "f:q8_0", 50, prompt_left=10, running=False, join_width=1)])
    assert finishes[1] <= 1000


def test_join_width_holds_a_waiting_sequence_until_the_batch_narrows() -> None:
    board = Board({"f:q8_0": VariantLoad(profile(factors={2: 1.0, 3: 1.0}), parallel=3)})
    timeline = board.timeline([
        SeqLoad(1, "f:q8_0", tokens_left=10, context=5),
        SeqLoad(2, "f:q8_0", tokens_left=20, context=5),
        SeqLoad(3, "f:q8_0", tokens_left=5, context=5, running=False, join_width=2),
    ])
    timeline.run()
    assert timeline.start_ms[3] == pytest.approx(100)  # when seq 1 left, not at once


# ---- recent load ------------------------------------------------------------------------------


def test_load_meter_averages_the_running_count_over_time_and_fades_when_idle() -> None:
    meter = LoadMeter(half_life_ms=1000)
    assert meter.value(0) == 0.0
    meter.observe(0, 4)
    assert meter.value(1000) == pytest.approx(2.0)  # half way from 0 to 4 after one half-life
    assert meter.value(10_000) == pytest.approx(4.0, abs=0.01)
    meter.observe(10_000, 0)
    assert meter.value(11_000) == pytest.approx(2.0, abs=0.01)
    assert meter.value(30_000) < 0.01


def test_unserved_demand_counts_until_each_deadline_and_at_most_parallel() -> None:
    demand = UnservedDemand()
    four = {"f:a": 4, "f:b": 2}.__getitem__
    demand.note(["f:a"], 1000, four)
    demand.note(["f:a", "f:b"], 3000, four)
    assert (demand.count("f:a", 0), demand.count("f:b", 0), demand.count("f:c", 0)) == (2, 1, 0)
    assert demand.count("f:a", 1000) == 1  # the first one's deadline has passed
    for until in (4000, 5000, 6000):
        demand.note(["f:b"], until, four)
    assert demand.count("f:b", 0) == 2  # capped at its 2 places: the latest deadlines stay
    assert demand.count("f:b", 4500) == 2 and demand.count("f:b", 5500) == 1


def test_a_busy_variant_prices_a_lone_newcomer_at_its_recent_width() -> None:
    quiet = Board({"f:q8_0": VariantLoad(profile(), parallel=4)})
    busy = Board({"f:q8_0": VariantLoad(profile(), parallel=4, load=3.6)})
    assert busy.variants["f:q8_0"].priced_width(1) == pytest.approx(3.6)
    assert busy.variants["f:q8_0"].priced_width(4) == 4.0
    assert VariantLoad(profile(), parallel=2, load=3.6).priced_width(1) == 2.0  # never above parallel
    alone = fit_budget(quiet, "f:q8_0", 20, cap=500, minimum=4, available_ms=1000)
    loaded = fit_budget(busy, "f:q8_0", 20, cap=500, minimum=4, available_ms=1000)
    assert alone is not None and loaded is not None
    assert alone.tokens == 99  # 20 ms prefill + 98 steps of 10 ms
    assert loaded.tokens < alone.tokens and loaded.finish_ms <= 1000
    # priced at width 3.6 (factor 1.5 + 0.125 × ... between 2 and 4: 1.2 + 0.15 × 1.6 = 1.44)
    assert loaded.finish_ms == pytest.approx(20 + (loaded.tokens - 1) * 10 * 1.44)


def test_the_promise_to_admitted_sequences_is_kept_against_the_board_as_it_stands() -> None:
    # priced at the recent load, the running sequence would already miss; on the board as it
    # stands it is on time, so the newcomer must still not make it miss
    running = (SeqLoad(1, "f:q8_0", tokens_left=100, context=10, deadline_ms=1100),)
    busy = Board({"f:q8_0": VariantLoad(profile(), parallel=4, load=4.0)}, running)
    fit = fit_budget(busy, "f:q8_0", 10, cap=500, minimum=4, available_ms=5000)
    assert fit is not None
    plain = Board({"f:q8_0": VariantLoad(profile(), parallel=4)}, running)
    finishes = plain.finishes([SeqLoad(-1, "f:q8_0", fit.tokens, prompt_left=10, running=False,
                                       join_width=fit.join_width)])
    assert finishes[1] <= 1100


def test_the_timelines_board_carries_the_load_it_ran() -> None:
    timeline = Timeline({"f:q8_0": VariantLoad(profile(), parallel=4)})
    for k in range(4):
        timeline.add(SeqLoad(k, "f:q8_0", tokens_left=400, context=5))
    timeline.advance_to(3000)
    # 4 running since 0 ms, faded in from nothing with a 2 s half-life
    assert timeline.board().variants["f:q8_0"].load == pytest.approx(4 * (1 - 0.5 ** 1.5), rel=1e-3)
