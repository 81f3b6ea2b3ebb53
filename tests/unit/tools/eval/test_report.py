"""report.md, summary.csv and the plots from synthetic records."""

from __future__ import annotations

import csv
from pathlib import Path

from edgeserve.tools.eval.records import AnswerRecord
from edgeserve.tools.eval.report import ReportContext, render_report, write_report
from edgeserve.tools.eval.stats import summarize
from tests.unit.tools.eval.helpers import record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def deadline_records() -> list[AnswerRecord]:
    records = []
    for deadline in (1000, 3000):
        for i in range(4):
            records.append(record(index=i, deadline_ms=deadline, correct=i < 2, variant="fam:q2_k",
                                  decode_ms=100.0, completion_tokens=10))
            records.append(record(index=i, policy="pin:q2_k", deadline_ms=deadline, correct=i < 1,
                                  variant="fam:q2_k", decode_ms=100.0, completion_tokens=10))
            slow = {"variant": "fam:q8_0", "decode_ms": 250.0, "completion_tokens": 10}
            if deadline == 1000 and i == 3:
                records.append(record(index=i, policy="pin:q8_0", deadline_ms=deadline, status="refused",
                                      variant=None))
            else:
                records.append(record(index=i, policy="pin:q8_0", deadline_ms=deadline,
                                      correct=deadline == 3000 and i < 3, **slow))
    return records


def sweep_records() -> list[AnswerRecord]:
    records = []
    for variant, ms, accuracy in (("q2_k", 10.0, {32: 1, 64: 2}), ("q8_0", 25.0, {32: 0, 64: 3})):
        for budget, right in accuracy.items():
            for i in range(4):
                records.append(record(index=i, mode="sweep", policy=f"pin:{variant}", deadline_ms=None,
                                      budget=budget, variant=f"fam:{variant}", decode_ms=ms * 10,
                                      completion_tokens=10, correct=i < right))
    return records


def test_deadline_report(tmp_path: Path) -> None:
    records = deadline_records()
    ctx = ReportContext(url="http://x", data="test.jsonl", family="fam", command="edgeserve eval gsm8k ...")
    written = write_report(tmp_path, records, ctx)
    assert {p.name for p in written} == {"summary.csv", "accuracy_vs_deadline.png", "report.md"}
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 6
    routed_1s = next(r for r in rows if r["policy"] == "routed" and r["deadline_ms"] == "1000")
    assert (routed_1s["n"], routed_1s["correct"], routed_1s["accuracy"]) == ("4", "2", "0.5")
    assert (routed_1s["ci_low"], routed_1s["ci_high"]) == ("0.15", "0.85")
    refused = next(r for r in rows if r["policy"] == "pin:q8_0" and r["deadline_ms"] == "1000")
    assert refused["refused"] == "1" and refused["answered"] == "3"
    assert (tmp_path / "accuracy_vs_deadline.png").read_bytes().startswith(PNG_SIGNATURE)
    report = (tmp_path / "report.md").read_text()
    assert "## Accuracy per policy × deadline" in report
    assert "Router vs the better pinned variant" in report
    assert "| boxed, hint on | 3 s | 50.0 % | pin:q8_0 75.0 % | -25.0 pt | +0 / −1 | worse, within" in report
    assert "Equal deadline: q2_k vs q8_0" in report
    assert "2.50 (25.00 / 10.00 ms/token, measured)" in report


def test_sweep_report_has_the_equal_latency_table(tmp_path: Path) -> None:
    records = sweep_records()
    write_report(tmp_path, records, ReportContext())
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes().startswith(PNG_SIGNATURE)
    report = (tmp_path / "report.md").read_text()
    assert "Quality sweep" in report
    assert "Equal latency from the budget sweep: q2_k vs q8_0" in report
    assert "**boxed** — q8_0 catches up" in report


def test_failures_are_listed() -> None:
    records = [record(index=0), record(index=1, status="timeout", error="no reply within 61 s")]
    text = render_report(records, summarize(records), ReportContext())
    assert "## Failed requests (1)" in text and "no reply within 61 s" in text
