"""Sweep → quality curves → policy file, round-tripped through the server's own parser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeserve.routing.policy_file import parse_policy
from edgeserve.routing.quality import make_curve
from edgeserve.tools.eval.policy_writer import (
    MeasuredCurve,
    PolicyWriteError,
    curve_key,
    curves_from_records,
    dump_toml,
    write_policy,
)
from edgeserve.tools.eval.records import AnswerRecord
from tests.unit.tools.eval.helpers import record

ROOT = Path(__file__).resolve().parents[4]
NOTE = "by a test"


def sweep(variant: str, budget: int, correct: list[bool], hint: bool = True, finish: str = "stop",
          style: str = "boxed") -> list[AnswerRecord]:
    return [record(index=i, mode="sweep", policy=f"pin:{variant}", model=f"fam:{variant}", deadline_ms=None,
                   budget=budget, hint=hint, style=style, correct=c, finish=finish)
            for i, c in enumerate(correct)]


def test_curve_keys() -> None:
    assert curve_key("boxed", True) == "boxed"
    assert curve_key("aav", False) == "aav-nohint"


def test_curves_from_sweep_records() -> None:
    records = [
        *sweep("q8_0", 32, [False, False, False, False], finish="length"),
        *sweep("q8_0", 64, [True, False, False, False]),
        *sweep("q8_0", 64, [True], hint=False),
        *sweep("q8_0", 128, [True], hint=False, finish="length"),
        record(mode="sweep", policy="pin:q8_0", deadline_ms=None, budget=64, hint=False, status="timeout", index=9),
        record(index=0),  # a deadline-run record is no sweep point
    ]
    curves = {(m.variant, m.key): m for m in curves_from_records(records)}
    assert set(curves) == {("q8_0", "boxed"), ("q8_0", "boxed-nohint")}
    boxed = curves[("q8_0", "boxed")]
    assert boxed.curve.budgets == [32, 64]
    assert boxed.curve.accuracies == [0.0, 0.25]
    assert boxed.curve.unlimited is None  # with the hint on, a larger budget changes the prompt
    assert boxed.questions == 4
    nohint = curves[("q8_0", "boxed-nohint")]
    assert nohint.left_out == 1 and nohint.curve.accuracies == [1.0, 1.0]
    assert nohint.curve.unlimited is None  # cut short at its largest budget


def test_unlimited_only_when_hint_off_and_nothing_was_cut() -> None:
    (m,) = curves_from_records(sweep("q2_k", 32, [True, False], hint=False))
    assert m.curve.unlimited == 0.5
    (m,) = curves_from_records(sweep("q2_k", 32, [True, False], hint=False, finish="length"))
    assert m.curve.unlimited is None


def _measured() -> list[MeasuredCurve]:
    return [
        MeasuredCurve("q8_0", "boxed", make_curve([32, 64, 128], [0.0, 0.02, 0.03], 0.03), 100, 0),
        MeasuredCurve("q2_k", "boxed-nohint", make_curve([32, 64], [0.01, 0.015]), 100, 2),
    ]


def test_updating_the_default_policy_keeps_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "smollm2-135m.toml"
    shutil.copy(ROOT / "policies" / "smollm2-135m.toml", path)
    before = parse_policy(path.read_bytes(), str(path))
    original = path.read_text()
    policy = write_policy(path, _measured(), "smollm2-135m", NOTE)
    text = path.read_text()
    assert policy.curves["q8_0"]["boxed"] == _measured()[0].curve
    assert policy.curves["q2_k"]["boxed-nohint"] == _measured()[1].curve
    for variant, by_style in before.curves.items():  # every other curve as it was
        for key, curve in by_style.items():
            if (variant, key) != ("q8_0", "boxed"):
                assert policy.curves[variant][key] == curve
    assert (policy.name, policy.family, policy.hint, policy.routing, policy.answer_forcing) == (
        before.name, before.family, before.hint, before.routing, before.answer_forcing)
    assert text.startswith(original.split("[hint]")[0])  # the header comments and top keys untouched
    assert "# ---- aav (hint on)" in text  # a comment between tables kept
    assert text.count("[curves.q8_0.boxed]") == 1
    assert "# measured by a test; 100 questions per budget, 2 failed requests left out" in text
    # A second sweep replaces its own tables (and its own notes) again, in place.
    write_policy(path, _measured(), "smollm2-135m", "by a second test")
    again = path.read_text()
    # its two notes replaced (one table was new in the first run), the others' notes kept
    assert again.count("[curves.q8_0.boxed]") == 1 and again.count("by a second test") == 2
    assert again.count("# measured") == original.count("# measured") + 1
    assert "by a test" not in again


def test_a_new_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policies" / "board.toml"
    policy = write_policy(path, _measured(), "smollm2-135m", NOTE)
    assert policy.name == "board" and policy.family == "smollm2-135m"
    assert parse_policy(path.read_bytes(), str(path)).curves["q8_0"]["boxed"].unlimited == 0.03


def test_curves_written_as_inline_tables_are_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "inline.toml"
    path.write_text('name = "inline"  # a comment\n\n[curves.q8_0]\n'
                    'boxed = { budgets = [10], accuracy = [0.5] }\naav = { budgets = [10], accuracy = [0.4] }\n')
    policy = write_policy(path, _measured()[:1], None, NOTE)
    assert policy.curves["q8_0"]["boxed"] == _measured()[0].curve
    assert policy.curves["q8_0"]["aav"] == make_curve([10], [0.4])
    assert policy.name == "inline"


def test_the_family_is_written_into_a_file_that_names_none(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    original = ('# a hand-written policy\nname = "mine"  # keep me\ndescription = "d"\n\n'
                "# the routing knobs\n[routing]\nmin_useful_tokens = 8\n")
    path.write_text(original)
    policy = write_policy(path, _measured(), "smollm2-135m", NOTE)
    assert policy.family == "smollm2-135m" and policy.routing.min_useful_tokens == 8
    text = path.read_text()
    assert text.startswith('# a hand-written policy\nname = "mine"  # keep me\nfamily = "smollm2-135m"\n'
                           'description = "d"\n\n# the routing knobs\n[routing]\n')
    assert text.count("family =") == 1
    write_policy(path, _measured(), "smollm2-135m", NOTE)  # the same family again: fine, once
    assert path.read_text().count("family =") == 1


def test_a_regenerated_file_gets_the_family_too(tmp_path: Path) -> None:
    path = tmp_path / "inline.toml"
    path.write_text('"name" = "inline"\n\n[curves.q8_0]\nboxed = { budgets = [10], accuracy = [0.5] }\n')
    policy = write_policy(path, _measured()[:1], "fam", NOTE)
    assert (policy.name, policy.family) == ("inline", "fam")
    assert policy.curves["q8_0"]["boxed"] == _measured()[0].curve
    assert parse_policy(path.read_bytes(), str(path)).family == "fam"


def test_curves_of_one_family_are_not_written_into_another_family_s_file(tmp_path: Path) -> None:
    path = tmp_path / "smollm2-135m.toml"
    shutil.copy(ROOT / "policies" / "smollm2-135m.toml", path)
    original = path.read_text()
    with pytest.raises(PolicyWriteError) as info:
        write_policy(path, _measured(), "llama31-8b", NOTE)
    message = info.value.message
    assert "family 'smollm2-135m'" in message and "family 'llama31-8b'" in message
    assert "policies/llama31-8b.toml" in message
    assert path.read_text() == original  # untouched
    assert write_policy(path, _measured(), None, NOTE).family == "smollm2-135m"  # family unknown: kept


def test_an_invalid_policy_file_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = 'x'\n[routing]\nbogus = 1\n")
    with pytest.raises(PolicyWriteError, match="not a valid policy"):
        write_policy(path, _measured(), None, NOTE)
    assert path.read_text() == "name = 'x'\n[routing]\nbogus = 1\n"


def test_nothing_measured_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyWriteError, match="no curve"):
        write_policy(tmp_path / "p.toml", [], None, NOTE)


def test_dump_toml_round_trips_through_tomllib() -> None:
    import tomllib

    data = {"name": 'a "q" \\ b', "n": 3, "x": 0.5, "on": True, "l": [1, 2],
            "t": {"k": "v", "sub": {"dash-key": [0.1]}}, "curves": {"q8_0": {"boxed-nohint": {"budgets": [1]}}}}
    assert tomllib.loads(dump_toml(data)) == data
