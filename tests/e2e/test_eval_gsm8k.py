"""`edgeserve eval gsm8k` against a real server: 3 questions, results, report, plot, resume, sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edgeserve.routing.policy_file import parse_policy
from edgeserve.tools.eval.cli import main
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

QUESTIONS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "Sara had $1,000 and spent $250. How many dollars are left?", "answer": "1000 - 250 = 750\n#### 750"},
    {"question": "This fourth question is beyond --limit.", "answer": "#### 1"},
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 1 ms can never be met (a fast 429); a minute always can, even on a loaded machine.
DEADLINES = "1,60000"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gsm8k") / "mini.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def run(server: Server, dataset: Path, out: Path, *extra: str) -> int:
    return main(["gsm8k", "--url", server.base, "--data", str(dataset), "--limit", "3", "--out", str(out),
                 "--max-tokens", "24", "--concurrency", "2", *extra])


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image

        assert matplotlib.image.imread(str(path)).ndim == 3
    else:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_deadline_run_writes_results_report_csv_and_plot_then_resumes(
        server: Server, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["--deadlines", DEADLINES, "--policies", "routed,pin:q2_k", "--hint", "both"]
    assert run(server, dataset, out, *args) == 0

    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 * 2 * 2 * 2  # questions × policies × deadlines × hint
    keys = {(r["index"], r["policy"], r["deadline_ms"], r["style"], r["hint"], r["budget"]) for r in records}
    assert len(keys) == len(records)
    assert {r["index"] for r in records} == {0, 1, 2}
    assert {r["gold"] for r in records} == {"7", "24", "750"}
    for r in records:
        if r["deadline_ms"] == 1:
            assert r["status"] == "refused", r
            assert r["http_status"] == 429 and r["min_deadline_ms"] > 1 and not r["correct"]
            continue
        assert r["status"] == "ok", r
        assert r["variant"].startswith("smollm2-135m:")
        if r["policy"] == "pin:q2_k":
            assert r["variant"] == "smollm2-135m:q2_k"
        assert 1 <= r["completion_tokens"] <= 24 and r["prompt_tokens"] > 10
        assert r["finish"] in ("stop", "length", "deadline")
        assert r["latency_ms"] >= r["actual_ms"] > 0 and r["predicted_ms"] > 0
        assert r["actual_ms"] <= 60000
        assert isinstance(r["text"], str) and isinstance(r["correct"], bool)
        assert (r["hint_tokens"] is not None) == r["hint"]
    hinted = [r["prompt_tokens"] for r in records if r["hint"] and r["status"] == "ok"]
    plain = [r["prompt_tokens"] for r in records if not r["hint"] and r["status"] == "ok"]
    assert min(hinted) > min(plain)  # the server added the hint to the prompt

    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert row["n"] == "3"
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["ci_low"]) <= float(row["ci_high"])
        if row["deadline_ms"] == "1":
            assert row["refused"] == "3" and row["accuracy"] == "0"
        else:
            assert row["refused"] == "0" and float(row["deadline_hit_rate"]) == 1.0
            assert float(row["mean_completion_tokens"]) <= 24
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Accuracy per policy × deadline" in report and "pin:q2_k" in report and "60 s" in report
    assert "Router vs the better pinned variant" in report
    assert_valid_png(out / "accuracy_vs_deadline.png")

    capsys.readouterr()
    assert run(server, dataset, out, *args) == 0  # the rerun asks nothing
    err = capsys.readouterr().err
    assert "24 already in" in err and "asking 0 " in err
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_a_rerun_retries_only_what_is_missing(server: Server, dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["--deadlines", "60000", "--policies", "pin:q8_0"]
    assert main(["gsm8k", "--url", server.base, "--data", str(dataset), "--limit", "2", "--out", str(out),
                 "--max-tokens", "24", *args]) == 0
    capsys.readouterr()
    assert run(server, dataset, out, *args) == 0  # now three questions: only the third is new
    assert "2 already in" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2]


def test_sweep_writes_quality_curves_the_router_can_read(server: Server, dataset: Path, tmp_path: Path) -> None:
    out, policy_path = tmp_path / "sweep", tmp_path / "policies" / "measured.toml"
    code = main(["gsm8k", "--url", server.base, "--data", str(dataset), "--limit", "3", "--out", str(out),
                 "--sweep-budgets", "8,16", "--policies", "pin:q2_k", "--hint", "off",
                 "--write-policy", str(policy_path)])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2
    assert all(r["mode"] == "sweep" and r["deadline_ms"] is None and r["status"] == "ok" for r in records)
    assert all(r["completion_tokens"] <= r["budget"] for r in records)
    policy = parse_policy(policy_path.read_bytes(), str(policy_path))
    curve = policy.curves["q2_k"]["boxed-nohint"]
    assert curve.budgets == [8, 16] and all(0 <= a <= 1 for a in curve.accuracies)
    assert policy.family == "smollm2-135m"
    assert_valid_png(out / "accuracy_vs_budget.png")
    assert "Quality sweep" in (out / "report.md").read_text(encoding="utf-8")
