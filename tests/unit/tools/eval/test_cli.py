"""The command line without a server: argument errors, --report-only, the parser wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.cli import build_parser
from edgeserve.tools.eval.cli import main, run_eval
from edgeserve.tools.eval.records import ResultsWriter
from tests.unit.tools.eval.helpers import record


def test_the_parser_plugs_into_a_cli() -> None:
    args = build_parser().parse_args(["eval", "gsm8k", "--data", "d.jsonl", "--out", "o", "--hint", "both"])
    assert (args.command, args.eval_command, args.hint, args.concurrency) == ("eval", "gsm8k", "both", 1)
    assert callable(run_eval)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--deadlines", "1s"], "--deadlines"), (["--policies", "best"], "unknown policy"),
     (["--prompt", "Boxed!"], "--prompt"), (["--concurrency", "0"], "--concurrency"),
     (["--sweep-budgets", "32", "--max-tokens", "8"], "--max-tokens"),
     (["--sweep-budgets", "32", "--deadlines", "1000"], "without deadlines"),
     (["--compare", "q2_k"], "--compare"), (["--token-ratio", "-1"], "--token-ratio")],
)
def test_bad_arguments_exit_2_before_asking_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code = main(["gsm8k", "--url", "http://127.0.0.1:9", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_missing_dataset_or_server_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["gsm8k", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "out")]
    assert main([*base, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read the dataset" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    assert main([*base, "--data", str(data)]) == 2
    assert "cannot reach edgeserve" in capsys.readouterr().err


def test_report_only_rewrites_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ResultsWriter(out / "results.jsonl") as writer:
        writer.write(record(index=0, correct=True))
        writer.write(record(index=0, policy="pin:q8_0", variant="fam:q8_0"))
    assert main(["gsm8k", "--data", "unused.jsonl", "--out", str(out), "--report-only"]) == 0
    assert {p.name for p in out.iterdir()} >= {"report.md", "summary.csv", "accuracy_vs_deadline.png"}
    assert main(["gsm8k", "--data", "unused.jsonl", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
