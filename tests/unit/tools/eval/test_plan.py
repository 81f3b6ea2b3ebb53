"""Command-line values: policies, integer lists, the dataset file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.tools.eval.dataset import DatasetError, gold_of, load_problems
from edgeserve.tools.eval.plan import EvalPolicy, parse_int_list, parse_policies


def test_policies() -> None:
    policies = parse_policies("routed, pin:q2_k,pin:q8_0,routed")
    assert [p.name for p in policies] == ["routed", "pin:q2_k", "pin:q8_0"]
    assert policies[0].model("fam") == "fam" and policies[1].model("fam") == "fam:q2_k"
    assert EvalPolicy("q8_0").variant == "q8_0"
    for bad in ["", "pin:", "pinned:q2_k", "best"]:
        with pytest.raises(ValueError):
            parse_policies(bad)


def test_int_lists() -> None:
    assert parse_int_list("3000,1000, 10000,1000", "--deadlines", 1, 3_600_000) == [1000, 3000, 10000]
    for bad in ["", "1s", "0", "3600001"]:
        with pytest.raises(ValueError, match="--deadlines"):
            parse_int_list(bad, "--deadlines", 1, 3_600_000)


def test_gold_of() -> None:
    assert gold_of("She has 9.\n#### 18") == "18"
    assert gold_of("#### 1,000 ") == "1,000"
    assert gold_of("no marker") is None


def test_load_problems(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q1", "answer": "x\\n#### 4"}\n\n{"question": "q2", "answer": "#### 5"}\n')
    problems = load_problems(path)
    assert [(p.index, p.question, p.gold) for p in problems] == [(0, "q1", "4"), (1, "q2", "5")]
    assert len(load_problems(path, limit=1)) == 1
    skipped = load_problems(path, skip=1)
    assert [(p.index, p.question) for p in skipped] == [(1, "q2")]  # its place in the file
    with pytest.raises(DatasetError, match="no problems in the file after the first 2"):
        load_problems(path, skip=2)


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json\n", "d.jsonl:1: not valid JSON"), ('{"question": "q"}\n', "`answer`"),
     ('{"question": "q", "answer": "5"}\n', "#### <number>"), ("", "no problems")],
)
def test_bad_datasets_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_problems(path)


def test_a_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_problems(tmp_path / "nope.jsonl")
