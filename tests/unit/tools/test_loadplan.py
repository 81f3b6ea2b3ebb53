"""The pure parts of the load test: scenarios, arrival plans, outcomes, the summary, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from edgeserve.config import FamilyConfig, VariantConfig
from edgeserve.errors import EdgeserveError
from edgeserve.tools.bench import Target
from edgeserve.tools.loadplan import (
    DeadlineClass,
    Event,
    Phase,
    Scenario,
    classify,
    first_model,
    load_scenarios,
    plan_arrivals,
    prediction_errors,
    read_events,
    read_questions,
    summarize,
    users_needed,
)
from edgeserve.tools.loadtest import (
    BASELINE,
    EDGESERVE,
    LLAMA_SERVER,
    check_loopback,
    parse_duration,
    render,
    run_loadtest,
    servers,
)

LOADTESTS = Path(__file__).resolve().parents[3] / "loadtests"
SHIPPED = LOADTESTS / "scenarios.toml"
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
    assert "overload: goodput edgeserve / llama_cpp.server = 2.00 / 1.00 = 2.00× (target ≥ 2×: met)." in report
    steady = [msgspec.structs.replace(s, scenario="steady") for s in (es, base)]
    assert "steady: goodput edgeserve / llama_cpp.server = 2.00 / 1.00 = 2.00×." in render(steady, args, {}, 100.0)
    assert "met their deadline 100.0% of the time (target ≥ 99%: met)" in report


def test_the_report_puts_llama_server_beside_both() -> None:
    es = summarize([event(i, "met") for i in range(3)], target=EDGESERVE, scenario="overload", run_s=1.0,
                   service_ms=100.0)
    native = summarize([event(0, "met"), event(1, "met"), event(2, "missed")], target=LLAMA_SERVER,
                       scenario="overload", run_s=1.0, service_ms=100.0)
    queued = summarize([event(0, "missed")], target=BASELINE, scenario="overload", run_s=1.0, service_ms=100.0)
    args = argparse.Namespace(run_s=1.0, max_tokens=16, seed=1, questions=Path("q.jsonl"), grace_s=1.0)
    report = render([queued, native, es], args, {}, 100.0, ["Targets, one server process at a time: …"])
    assert "| overload | llama-server | 3.00 | 2.00 | 2 | 1 |" in report
    assert "Targets, one server process at a time: …" in report
    assert "overload: goodput edgeserve / llama-server = 3.00 / 2.00 = 1.50× (target ≥ 2×: NOT met)." in report
    assert "overload: llama_cpp.server met no deadline; edgeserve's goodput 3.00/s." in report
    # llama-server is compared first: the target is against it
    assert report.index("/ llama-server") < report.index("llama_cpp.server met no deadline")


def test_whole_budget_prediction_error() -> None:
    events = [
        event(0, "met", finish="length", predicted_ms=1100.0, actual_ms=1200.0, queue_ms=200.0),  # 10 %
        event(1, "met", finish="length", predicted_ms=900.0, actual_ms=1000.0),  # 10 %
        event(2, "met", finish="length", predicted_ms=1300.0, actual_ms=1000.0),  # 30 %
        event(3, "met", finish="stop", predicted_ms=5000.0, actual_ms=1000.0),  # ended early: not judged
        event(4, "missed", finish="deadline", predicted_ms=500.0, actual_ms=1000.0),  # cut: not judged
        event(5, "met", finish="length"),  # a baseline's answer: no prediction
    ]
    assert prediction_errors(events) == pytest.approx([0.1, 0.1, 0.3])
    s = summarize(events, target=EDGESERVE, scenario="overload", run_s=1.0, service_ms=100.0)
    assert s.whole_budget_error == pytest.approx(0.5 / 3) and s.whole_budget_n == 3
    args = argparse.Namespace(run_s=1.0, max_tokens=16, seed=1, questions=Path("q.jsonl"), grace_s=1.0)
    assert ("overload: edgeserve's latency prediction error on answers that ran their whole budget 16.7% "
            "(n = 3; target ≤ 10%: NOT met)") in render([s], args, {}, 100.0)
    assert summarize([event(0, "met")], target=BASELINE, scenario="x", run_s=1.0,
                     service_ms=1.0).whole_budget_error is None


def test_the_shipped_questions_are_short_and_many() -> None:
    questions = read_questions(LOADTESTS / "questions.jsonl")
    assert len(questions) >= 20 and len(set(questions)) == len(questions)
    assert all(10 < len(q) < 200 and q.endswith("?") for q in questions)


def test_an_empty_questions_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        read_questions(tmp_path / "q.jsonl")


def test_first_model_of_v1_models() -> None:
    assert first_model({"data": [{"id": "fam"}, {"id": "fam:q4_1"}]}) == "fam"
    assert first_model({"data": []}) is None
    assert first_model({"error": "x"}) is None
    assert first_model(["not", "a", "dict"]) is None


VARIANT = VariantConfig(name="q4_1", quant="Q4_1", n_ctx=1024, n_threads=2, n_batch=256, parallel=4)
FAMILY = FamilyConfig(name="fam", variants=[VARIANT])


def loadtest_args(**overrides: object) -> argparse.Namespace:
    args = argparse.Namespace(
        baseline=True, llama_server=Path("/opt/llama/llama-server"), url=None, model="fam",
        models=Path("models.toml"), cache_dir=Path("/cache"), policy=None,
        target=Target(FAMILY, VARIANT, Path("/models/fam-q4_1.gguf")))
    vars(args).update(overrides)
    return args


def test_servers_run_the_baselines_first_and_llama_server_with_parallel_slots() -> None:
    found = servers(loadtest_args())
    assert [s.name for s in found] == [BASELINE, LLAMA_SERVER, EDGESERVE]
    native = found[1]
    assert native.model == "fam:q4_1" and native.ready_path == "/health" and native.command is not None
    command = native.command(8123)
    assert command[0] == "/opt/llama/llama-server"

    def flag(name: str) -> str:
        return command[command.index(name) + 1]

    assert flag("--model") == "/models/fam-q4_1.gguf"
    assert flag("--parallel") == "4" and flag("--ctx-size") == str(1024 * 4) and "--cont-batching" in command
    assert flag("--threads") == "2" and flag("--threads-batch") == "2" and flag("--batch-size") == "256"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "8123"
    queued = found[0].command
    assert queued is not None and "/models/fam-q4_1.gguf" in queued(1) and found[0].ready_path == "/v1/models"
    es = found[2]
    assert es.command is not None and "--port" in es.command(9) and es.env == {"EDGESERVE_LOG_FORMAT": "json"}


def test_servers_without_baselines_and_with_a_running_edgeserve() -> None:
    found = servers(loadtest_args(baseline=False, llama_server=None, url="http://127.0.0.1:8080/"))
    assert [(s.name, s.url, s.command) for s in found] == [(EDGESERVE, "http://127.0.0.1:8080", None)]
    assert [s.name for s in servers(loadtest_args(baseline=False))] == [LLAMA_SERVER, EDGESERVE]


def test_llama_server_must_be_an_executable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeserve.cli import build_parser

    not_executable = tmp_path / "llama-server"
    not_executable.write_text("")
    for path in (not_executable, tmp_path / "missing"):
        args = build_parser().parse_args(["loadtest", "--out", str(tmp_path / "out"), "--llama-server", str(path)])
        assert run_loadtest(args) == 2
        assert f"--llama-server {path} is not an executable file" in capsys.readouterr().err


def test_the_shipped_questions_are_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeserve.cli import build_parser

    monkeypatch.delenv("EDGESERVE_LOADTEST_QUESTIONS", raising=False)
    args = build_parser().parse_args(["loadtest", "--out", str(tmp_path)])
    assert args.questions == LOADTESTS / "questions.jsonl" and args.llama_server is None
