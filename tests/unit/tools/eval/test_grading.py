"""Answer extraction, normalisation and comparison over the outputs small models really write."""

from __future__ import annotations

import threading
from fractions import Fraction

import pytest

from edgeserve.tools.eval import grading
from edgeserve.tools.eval.grading import (
    Extraction,
    canonical,
    extract_answer,
    grade,
    judge,
    last_boxed,
    math_verify_equal,
    numbers_in,
    numbers_match,
    to_number,
)


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("so \\boxed{18}.", "18"),
        ("\\boxed{\\frac{36}{2}}", "\\frac{36}{2}"),
        ("\\boxed{{18}}", "{18}"),
        ("\\boxed{\\text{\\$}18}", "\\text{\\$}18"),
        ("first \\boxed{5}, then \\boxed{18}", "18"),
        ("\\boxed{7} and an unclosed \\boxed{1", "7"),  # a reply cut off inside its box
        ("\\boxed{9} then the echoed instruction \\boxed{}", "9"),
        ("\\fbox{12}", "12"),
        ("\\boxed 42 is it", "42"),
    ],
)
def test_last_boxed_keeps_nested_braces_and_skips_empty_or_unclosed_boxes(text: str, content: str) -> None:
    assert last_boxed(text) == content


def test_no_box_at_all() -> None:
    assert last_boxed("put your final answer within \\boxed{}") is None
    assert last_boxed("no box here") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The total is \\boxed{18} dollars. #### 20", Extraction("18", "boxed")),
        ("She makes 9 * 2 = 18.\n#### 18", Extraction("18", "hash")),
        ("#### $1,234 dollars", Extraction("1,234", "hash")),
        ("So the answer is 42. Check: 6 * 7 = 42, and 43 is wrong", Extraction("42", "answer_is")),
        ("The final answer is: -5", Extraction("-5", "answer_is")),
        ("Answer: 3/4 of the cake", Extraction("3/4", "answer_is")),
        ("16 - 3 - 4 = 9 eggs; 9 * 2 = $18", Extraction("18", "last_number")),
        ("It is 5-3 degrees", Extraction("3", "last_number")),  # a dash between digits is no minus
        ("It was −7 degrees", Extraction("-7", "last_number")),  # Unicode minus
        ("put your final answer within \\boxed{}. The answer is 7", Extraction("7", "answer_is")),
    ],
)
def test_extraction_order(text: str, expected: Extraction) -> None:
    assert extract_answer(text) == expected


def test_no_number_means_no_answer() -> None:
    assert extract_answer("I am not sure how to solve this.") is None
    result = grade("I am not sure how to solve this.", "18")
    assert result.correct is False and result.extracted is None and result.judged_by == "none"


def test_numbers_in_reads_commas_decimals_signs_and_fractions() -> None:
    assert numbers_in("1,000 apples, 2.5 kg, -3 C, 3/4 cup, .5 l and x2") == ["1,000", "2.5", "-3", "3/4", ".5"]


@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ("18", Fraction(18)),
        ("18.0", Fraction(18)),
        ("18.00 dollars", Fraction(18)),
        ("$1,234.50", Fraction(246900, 200)),
        ("\\$18", Fraction(18)),
        ("50\\%", Fraction(50)),
        ("50%", Fraction(50)),
        ("-7", Fraction(-7)),
        ("−7", Fraction(-7)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{36}{2}", Fraction(18)),
        ("\\frac34", Fraction(3, 4)),
        ("x = 18", Fraction(18)),
        ("18 \\text{ eggs}", Fraction(18)),
        ("\\text{18 cm}", Fraction(18)),
        ("1{,}000", Fraction(1000)),
        ("1\\,000", Fraction(1000)),
        ("{18}", Fraction(18)),
        ("18.", Fraction(18)),
    ],
)
def test_to_number_normalises(answer: str, value: Fraction) -> None:
    assert to_number(answer) == value


@pytest.mark.parametrize("answer", ["", "eighteen", "2 \\times 9", "18 and 20", "1/0", "\\sqrt{2}"])
def test_to_number_refuses_what_is_not_one_number(answer: str) -> None:
    assert to_number(answer) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(Fraction(18), "18"), (Fraction(-3), "-3"), (Fraction(3, 4), "0.75"), (Fraction(1, 3), "1/3"),
     (Fraction(5, 2), "2.5")],
)
def test_canonical_has_no_trailing_zero(value: Fraction, text: str) -> None:
    assert canonical(value) == text


def test_numbers_match_within_tolerance_only() -> None:
    assert numbers_match(Fraction(18), Fraction(18))
    assert numbers_match(Fraction(1_000_000), Fraction(1_000_000) + Fraction(1, 10**7))
    assert not numbers_match(Fraction(18), Fraction(19))
    assert not numbers_match(Fraction(33, 100), Fraction(1, 3))
    assert not numbers_match(Fraction(0), Fraction(1, 1000))


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("Janet makes \\boxed{18} dollars.", "18", True),
        ("\\boxed{\\$18.00}", "18", True),
        ("\\boxed{18 \\text{ dollars}}", "18", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{1000}", "1,000", True),  # a gold with a comma
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{0.5}", "1/2", True),
        ("\\boxed{50\\%}", "50", True),
        ("\\boxed{-5}", "-5", True),
        ("\\boxed{5}", "-5", False),
        ("\\boxed{x = 18}", "18", True),
        ("\\boxed{Janet makes $18 per day}", "18", True),  # prose in the box: its last number
        ("#### 72", "72", True),
        ("The answer is 71.", "72", False),
        ("so 8 + 10 = 18 in total", "18", True),
        ("\\boxed{18", "18", True),  # cut off inside the box: the last number
    ],
)
def test_grade(completion: str, gold: str, correct: bool) -> None:
    assert grade(completion, gold).correct is correct


def test_math_verify_settles_formulas() -> None:
    result = grade("\\boxed{2 \\times 9}", "18")
    assert result.correct and result.judged_by == "math_verify"
    assert grade("\\boxed{\\sqrt{324}}", "18").correct
    assert grade("\\boxed{16 - 3 - 4}", "9").correct
    assert not grade("\\boxed{2 \\times 10}", "18").correct


def test_math_verify_failure_falls_back_to_the_last_number(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("antlr exploded")

    monkeypatch.setattr(grading, "_math_verify", (broken, broken))
    assert math_verify_equal("2 \\times 9", "18") is None
    result = judge(Extraction("2 \\times 9", "boxed"), "18")
    assert result.judged_by == "numeric" and result.value == "9" and not result.correct
    monkeypatch.setattr(grading, "_math_verify", False)  # not installed
    assert math_verify_equal("2 \\times 9", "18") is None
    assert judge(Extraction("\\sqrt{2}", "boxed"), "18").correct is False


def test_math_verify_is_not_called_off_the_main_thread() -> None:
    """Its timeout is signal.alarm, which only works in the main thread."""
    seen: list[bool | None] = []
    thread = threading.Thread(target=lambda: seen.append(math_verify_equal("2 \\times 9", "18")))
    thread.start()
    thread.join()
    assert seen == [None]
    assert math_verify_equal("2 \\times 9", "18") is True


def test_a_number_too_large_for_a_float_is_graded_not_crashed() -> None:
    huge = "9" * 400
    assert not numbers_match(Fraction(int(huge)), Fraction(18))
    assert numbers_match(Fraction(int(huge)), Fraction(int(huge)))
    graded = grade(f"The answer is \\boxed{{{huge}}}", "18")
    assert graded.correct is False and graded.extracted == huge
