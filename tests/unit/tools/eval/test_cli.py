"""The command line without a server: argument errors, --report-only, the parser wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.cli import build_parser
from edgeserve.tools.eval.cli import main, run_eval
from edgeserve.tools.eval.records import AnswerRecord, ResultsWriter
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


def _sweep_record(model: str, index: int = 0) -> AnswerRecord:
    variant = model.partition(":")[2]
    return record(index=index, mode="sweep", policy=f"pin:{variant}", model=model, variant=model,
                  deadline_ms=None, budget=32, correct=True)


def test_write_policy_names_the_swept_family_in_the_file(tmp_path: Path) -> None:
    out, policy = tmp_path / "out", tmp_path / "policies" / "fam.toml"
    with ResultsWriter(out / "results.jsonl") as writer:
        writer.write(_sweep_record("fam:q8_0"))  # a pin: family:variant
    args = ["gsm8k", "--data", "unused.jsonl", "--out", str(out), "--report-only", "--write-policy", str(policy)]
    assert main(args) == 0
    assert 'family = "fam"' in policy.read_text()


def test_write_policy_refuses_a_sweep_of_two_families(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, policy = tmp_path / "out", tmp_path / "p.toml"
    with ResultsWriter(out / "results.jsonl") as writer:
        writer.write(_sweep_record("fam:q8_0"))
        writer.write(_sweep_record("other:q8_0", index=1))
    args = ["gsm8k", "--data", "unused.jsonl", "--out", str(out), "--report-only", "--write-policy", str(policy)]
    assert main(args) == 2
    assert "from families fam, other" in capsys.readouterr().err
    assert not policy.exists()


def test_write_policy_refuses_another_family_s_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, policy = tmp_path / "out", tmp_path / "p.toml"
    policy.write_text('name = "p"\nfamily = "other"\n')
    with ResultsWriter(out / "results.jsonl") as writer:
        writer.write(_sweep_record("fam:q8_0"))
    args = ["gsm8k", "--data", "unused.jsonl", "--out", str(out), "--report-only", "--write-policy", str(policy)]
    assert main(args) == 2
    assert "is the policy of family 'other'" in capsys.readouterr().err
    assert policy.read_text() == 'name = "p"\nfamily = "other"\n'
