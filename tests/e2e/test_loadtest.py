"""A headless Locust run of ~15 s against a real server, through `edgeserve loadtest`, and one of
12 s the way Locust's users run it (`locust -f loadtests/locustfile.py --host URL`, nothing else).

The scenario is built so that every outcome class really occurs: generous deadlines (met), a
1 ms deadline (refused at once), clients that keep their tight deadline to themselves (the server
runs them to max_tokens, last in its queue: missed), and a malformed X-Deadline-Ms (a 400: error).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.tools.loadplan import OUTCOMES, load_scenarios, plan_arrivals, read_events
from tests.e2e.conftest import FAMILY, VARIANTS, Server

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A pen costs 2 dollars. How much do 5 pens cost?",
    "Sara reads 10 pages a day. How many pages does she read in a week?",
    "A box holds 6 eggs. How many eggs are in 4 boxes?",
    "Ben had 20 marbles and gave away 7. How many are left?",
]
SCENARIOS = """
[scenarios.classes]
description = "one deadline class per outcome"
phases = [{ until = 1.0, load = 0.6 }]
deadlines = [
    { name = "generous", service_x = 20 },
    { name = "impossible", ms = 1 },
    { name = "unaware", service_x = 0.1, send = false },
    { name = "malformed", ms = 0 },
]
"""
RUN_S = 15
LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
LOCUSTFILE = LOADTESTS / "locustfile.py"
USER_RUN_S = 12


@pytest.fixture(scope="module")
def run(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("loadtest")
    questions = work / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS))
    scenarios = work / "scenarios.toml"
    scenarios.write_text(SCENARIOS)
    out = work / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "edgeserve.tools.loadtest", "--url", server.base, "--no-baseline",
         "--scenario", "classes", "--scenarios", str(scenarios), "--questions", str(questions),
         "--run-time", f"{RUN_S}s", "--max-tokens", "24", "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


def test_every_outcome_class_is_counted(run: Path) -> None:
    (summary,) = json.loads((run / "summary.json").read_text())
    for outcome in OUTCOMES:
        assert summary["counts"][outcome] > 0, summary
    assert summary["by_class"]["generous"].keys() == {"met"}, summary
    assert summary["by_class"]["impossible"] == {"refused": summary["counts"]["refused"]}
    assert summary["refusals"] == {"deadline_infeasible": summary["counts"]["refused"]}
    assert summary["by_class"]["unaware"].get("missed", 0) > 0, summary
    assert summary["by_class"]["malformed"].keys() == {"error"}, summary
    assert summary["goodput_rps"] == summary["counts"]["met"] / RUN_S
    assert "| classes | edgeserve |" in (run / "summary.md").read_text()


def test_no_server_error_and_every_request_accounted_for(run: Path, server: Server) -> None:
    events = read_events(run / "classes" / "edgeserve" / "events.jsonl")
    assert events and [e.index for e in sorted(events, key=lambda e: e.index)] == list(range(len(events)))
    assert all(e.status is None or e.status < 500 for e in events)
    assert {e.status for e in events if e.outcome == "error"} == {400}
    assert server.error_records() == []


def test_locust_wrote_its_csv_and_html(run: Path) -> None:
    target = run / "classes" / "edgeserve"
    with (target / "locust_stats.csv").open() as f:
        rows = list(csv.DictReader(f))  # one per (type = variant or refusal code, name = outcome)
    (summary,) = json.loads((run / "summary.json").read_text())
    for outcome in OUTCOMES:
        counted = sum(int(r["Request Count"]) for r in rows if r["Name"] == outcome)
        assert counted == summary["counts"][outcome], (outcome, rows)
    assert (target / "report.html").stat().st_size > 0
    assert "edgeserve_requests_total" in (target / "metrics.txt").read_text()


def locust_as_a_user(host: str, cwd: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", host, "--headless", "-u", "4", "-r", "2",
         "-t", f"{USER_RUN_S}s", *options], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_locust_runs_as_its_users_run_it(server: Server, tmp_path: Path) -> None:
    """No edgeserve-only flag: the shipped questions, the model the server lists first, and the
    service time S the server predicts for one request alone (the deadline mix derives from it)."""
    completed = locust_as_a_user(server.base, tmp_path, "--csv", str(tmp_path / "run"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = re.search(r"scenario steady: S = ([\d.]+) ms \(predicted by the server for (\S+) alone at 128 tokens\)"
                      r".* model (\S+), ", completed.stderr)
    assert found is not None, completed.stderr[-3000:]
    service_ms, variant, model = float(found[1]), found[2], found[3]
    assert model == FAMILY and variant in VARIANTS and service_ms > 0
    with (tmp_path / "run_stats.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    assert {r["Name"] for r in rows} <= set(OUTCOMES) - {"error"}, rows
    # the plan is the one `edgeserve.tools.loadplan` makes from that S: every arrival with time to
    # be answered (or given up on) before the run ended was sent and counted
    plan = plan_arrivals(load_scenarios(LOADTESTS / "scenarios.toml")["steady"], USER_RUN_S - 1, service_ms, 1)
    due = [a for a in plan if 0.5 + a.at_s + a.deadline_ms / 1000 + 1.0 + 2.0 < USER_RUN_S]
    assert sum(int(r["Request Count"]) for r in rows) >= len(due), (rows, len(due))
    assert server.error_records() == []


def test_locust_refuses_a_host_that_is_not_loopback(tmp_path: Path) -> None:
    completed = locust_as_a_user("http://192.0.2.1:8080", tmp_path)
    assert completed.returncode == 3, completed.stderr[-3000:]
    assert "loopback addresses only" in completed.stderr
