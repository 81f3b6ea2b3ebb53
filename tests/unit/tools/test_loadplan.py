"""The pure parts of the load test: scenarios, arrival plans, outcomes, the summary, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from edgeserve.errors import EdgeserveError
from edgeserve.tools.loadplan import (
    DeadlineClass,
    Event,
    Phase,
    Scenario,
    classify,
    load_scenarios,
    plan_arrivals,
    read_events,
    summarize,
    users_needed,
)
from edgeserve.tools.loadtest import BASELINE, EDGESERVE, check_loopback, parse_duration, render

SHIPPED = Path(__file__).resolve().parents[3] / "loadtests" / "scenarios.toml"
MIX = [DeadlineClass("tight", service_x=0.5), DeadlineClass("loose", weight=3, ms=9000)]


def scenario(*phases: Phase) -> Scenario:
    return Scenario("test", list(phases) or [Phase(1.0, 1.0)], MIX)


def test_the_shipped_scenarios_load() -> None:
    scenarios = load_scenarios(SHIPPED)
    assert {"steady", "overload", "burst"} <= set(scenarios)
    assert scenarios["steady"].peak_load == pytest.approx(0.7)
    assert scenarios["overload"].peak_load == pytest.approx(2.0)
    assert scenarios["burst"].phases[0].load == 0


@pytest.mark.parametrize("text", [
    '[scenarios.x]\ndescription = ""\nphases = [{ until = 0.5, load = 1 }]\ndeadlines = [{ name = "a", ms = 5 }]',
    '[scenarios.x]\ndescription = ""\nphases = [{ until = 1, load = 1 }]\ndeadlines = [{ name = "a" }]',
    '[scenarios.x]\ndescription = ""\nphases = [{ until = 1, load = 1 }]\ndeadlines = [{ name = "a", ms = 5, '
    'service_x = 1 }]',
    '[scenarios.x]\ndescription = ""\nphases = [{ until = 1, load = 1 }]\ndeadlines = [{ name = "a", ms = 5 }]\n'
    'typo = 1',
])
def test_a_bad_scenarios_file_names_itself(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.toml"):
        load_scenarios(path)


def test_the_plan_is_seeded_and_offers_the_scenario_rate() -> None:
    plan = plan_arrivals(scenario(Phase(1.0, 2.0)), 1000.0, 500.0, seed=7)
    assert plan == plan_arrivals(scenario(Phase(1.0, 2.0)), 1000.0, 500.0, seed=7)
    assert plan != plan_arrivals(scenario(Phase(1.0, 2.0)), 1000.0, 500.0, seed=8)
    assert len(plan) / 1000.0 == pytest.approx(4.0, rel=0.05)  # 2 x capacity of 2 req/s
    assert all(0 <= a.at_s < 1000 for a in plan)
    assert [a.at_s for a in plan] == sorted(a.at_s for a in plan)
    tight = sum(a.deadline_class == "tight" for a in plan) / len(plan)
    assert tight == pytest.approx(0.25, abs=0.03)
    assert {a.deadline_ms for a in plan} == {250, 9000}
    assert [a.index for a in plan] == list(range(len(plan)))


def test_an_idle_phase_has_no_arrivals() -> None:
    plan = plan_arrivals(scenario(Phase(0.5, 0.0), Phase(0.6, 5.0), Phase(1.0, 0.0)), 100.0, 1000.0, seed=1)
    assert plan and all(50 <= a.at_s < 60 for a in plan)


def test_a_client_side_deadline_is_not_sent() -> None:
    quiet = Scenario("t", [Phase(1.0, 1.0)], [DeadlineClass("unaware", ms=100, send=False)])
    assert not any(a.send_deadline for a in plan_arrivals(quiet, 10.0, 100.0, seed=1))


def test_users_cover_the_peak_rate_for_the_longest_wait() -> None:
    # peak 2 req/s x (9 s + 1 s grace) = 20 busy users at most; with room
    assert users_needed(scenario(Phase(1.0, 1.0)), 500.0, 1.0) >= 20
    assert users_needed(Scenario("t", [Phase(1.0, 0.01)], [DeadlineClass("a", ms=1)]), 1000.0, 0.0) == 5


@pytest.mark.parametrize(("status", "elapsed", "timed_out", "expected"), [
    (200, 999.0, False, "met"),
    (200, 1000.0, False, "met"),
    (200, 1000.1, False, "missed"),
    (None, 2000.0, True, "missed"),
    (429, 3.0, False, "refused"),
    (400, 3.0, False, "error"),
    (503, 3.0, False, "error"),
    (None, 3.0, False, "error"),
])
def test_classify(status: int | None, elapsed: float, timed_out: bool, expected: str) -> None:
    assert classify(status, elapsed, 1000, timed_out=timed_out) == expected


def event(index: int, outcome: str, elapsed: float = 100.0, **fields: object) -> Event:
    status = {"met": 200, "missed": 200, "refused": 429, "error": 500}[outcome]
    return Event(index=index, deadline_class=str(fields.pop("cls", "tight")), deadline_ms=500,
                 outcome=outcome, elapsed_ms=elapsed, status=status, **fields)  # type: ignore[arg-type]


def test_summary_goodput_hit_rate_and_latency() -> None:
    events = [event(0, "met", 100.0, variant="f:q2_k", finish="length"),
              event(1, "met", 300.0, variant="f:q4_1", finish="stop"),
              event(2, "missed", 900.0, variant="f:q4_1", finish="deadline"),
              event(3, "refused", 2.0, code="deadline_infeasible"),
              event(4, "refused", 2.0, code="queue_full", cls="loose"),
              Event(index=5, deadline_class="loose", deadline_ms=500, outcome="missed", elapsed_ms=1500.0,
                    status=None, timed_out=True, lag_ms=12.0)]
    s = summarize(events, target=EDGESERVE, scenario="steady", run_s=2.0, service_ms=400.0)
    assert s.counts == {"met": 2, "missed": 2, "refused": 2, "error": 0}
    assert s.goodput_rps == 1.0 and s.offered_rps == 3.0
    assert s.hit_rate == 0.5
    assert s.p50_ms == 300.0  # of the three 200 responses; the time-out is not a latency
    assert s.timeouts == 1 and s.max_lag_ms == 12.0
    assert s.refusals == {"deadline_infeasible": 1, "queue_full": 1}
    assert s.variants == {"f:q2_k": 1, "f:q4_1": 2}
    assert s.by_class["loose"] == {"refused": 1, "missed": 1}


def test_events_round_trip_through_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    original = [event(0, "met"), event(1, "refused", code="queue_full")]
    path.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in original))
    assert read_events(path) == original
    assert read_events(tmp_path / "missing.jsonl") == []


def test_no_answer_at_all_has_no_hit_rate() -> None:
    s = summarize([event(0, "refused")], target=EDGESERVE, scenario="x", run_s=1.0, service_ms=1.0)
    assert s.hit_rate is None and s.p99_ms is None


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("2m", 120), ("1m30s", 90), ("0.5", 0.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "m", "0s"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"])
def test_loopback_urls_pass(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://example.com", "http://192.168.1.2"])
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(EdgeserveError, match="loopback"):
        check_loopback(url)


def test_the_report_compares_the_targets() -> None:
    es = summarize([event(0, "met"), event(1, "met"), event(2, "refused")], target=EDGESERVE,
                   scenario="overload", run_s=1.0, service_ms=100.0)
    base = summarize([event(0, "met"), event(1, "missed"), event(2, "missed")], target=BASELINE,
                     scenario="overload", run_s=1.0, service_ms=100.0)
    args = argparse.Namespace(run_s=1.0, max_tokens=16, seed=1, questions=Path("q.jsonl"), grace_s=1.0)
    report = render([es, base], args, {"llama_cpp.server (f:q4_1)": 100.0}, 100.0)
    assert "| overload | edgeserve | 3.00 | 2.00 | 2 | 0 | 1 (? 1) | 0 | 100.0% |" in report
    assert "overload: goodput edgeserve / baseline = 2.00× (target ≥ 2×: met)." in report
    steady = [msgspec.structs.replace(s, scenario="steady") for s in (es, base)]
    assert "steady: goodput edgeserve / baseline = 2.00×." in render(steady, args, {}, 100.0)
    assert "met their deadline 100.0% of the time (target ≥ 99%: met)" in report
