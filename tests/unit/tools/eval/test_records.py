"""results.jsonl: append, read back (tolerating a torn line), and what a rerun skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.tools.eval.dataset import Problem
from edgeserve.tools.eval.plan import EvalPolicy, deadline_items, pending, sweep_items
from edgeserve.tools.eval.records import ResultsWriter, done_keys, latest, read_records
from tests.unit.tools.eval.helpers import record

PROBLEMS = [Problem(i, f"q{i}", f"... #### {i}", str(i)) for i in range(3)]


def test_records_round_trip_and_a_torn_last_line_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out" / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.write(record(index=0, text="\\boxed{18}", correct=True))
        writer.write(record(index=1, status="refused"))
    with path.open("ab") as handle:
        handle.write(b'{"index": 2, "mode": "dead')  # killed mid-write
    with ResultsWriter(path) as writer:  # the next run starts on a fresh line
        writer.write(record(index=2))
    records = read_records(path)
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].text == "\\boxed{18}" and records[0].correct
    assert "malformed" in capsys.readouterr().err


def test_rerun_skips_done_items_and_retries_failed_ones() -> None:
    items = deadline_items(PROBLEMS, [EvalPolicy(), EvalPolicy("q2_k")], [1000, 3000], ["boxed"], [True, False], None)
    assert len(items) == 3 * 2 * 2 * 2
    first = items[0]
    assert first.key == (0, "routed", 1000, "boxed", True, None, None)
    records = [
        record(index=0, policy="routed", deadline_ms=1000, hint=True),
        record(index=0, policy="pin:q2_k", deadline_ms=1000, hint=True, status="refused"),
        record(index=0, policy="routed", deadline_ms=3000, hint=True, status="timeout"),
        record(index=0, policy="routed", deadline_ms=1000, hint=False, status="http_error"),
    ]
    todo = pending(items, done_keys(records))
    assert len(todo) == len(items) - 2
    assert first not in todo
    assert any(i.key == (0, "routed", 3000, "boxed", True, None, None) for i in todo)


def test_a_different_budget_or_style_is_a_different_item() -> None:
    done = done_keys([record(index=0, budget=24)])
    items = deadline_items(PROBLEMS[:1], [EvalPolicy()], [1000], ["boxed", "aav"], [True], None)
    assert len(pending(items, done)) == 2  # budget None differs from 24
    items = deadline_items(PROBLEMS[:1], [EvalPolicy()], [1000], ["boxed", "aav"], [True], 24)
    assert [i.style for i in pending(items, done)] == ["aav"]


def test_sweep_items_are_pinned_and_have_no_deadline() -> None:
    items = sweep_items(PROBLEMS[:2], ["q2_k", "q8_0"], [32, 64], ["boxed"], [True])
    assert len(items) == 8
    assert {i.deadline_ms for i in items} == {None}
    assert {i.policy.name for i in items} == {"pin:q2_k", "pin:q8_0"}
    assert {i.budget for i in items} == {32, 64}


def test_latest_prefers_a_done_line_over_an_error() -> None:
    ok = record(index=0, correct=True)
    retried_error = record(index=0, status="http_error")
    error_then_ok = [record(index=1, status="timeout"), record(index=1, correct=True)]
    chosen = latest([ok, retried_error, *error_then_ok])
    assert [(r.index, r.status) for r in chosen] == [(0, "ok"), (1, "ok")]
