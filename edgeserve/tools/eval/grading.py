"""Grading GSM8K answers: find the model's final answer, normalise it, compare it with the gold one.

Extraction, first rule that finds something wins:

1. the last complete ``\\boxed{...}`` (braces nested to any depth; an empty or unclosed box is
   skipped, so a model that echoes the instruction "within \\boxed{}" is not read as answering);
2. the number after the last ``#### ``;
3. the number after the last "the answer is" / "answer:";
4. the last number in the text.

Comparison: both sides are normalised to exact fractions (commas, ``$``, ``%``, trailing units and
``.0``, ``a/b`` and ``\\frac{a}{b}``, ``x = 18`` → 18) and compared with a small tolerance. When the
model's answer is not a plain number (``\\frac{36}{2}``, ``2 \\times 9``, ``\\sqrt{324}``), the
``math-verify`` library decides; if it is missing, fails or times out, the last number inside the
answer is compared instead. math-verify's timeout uses ``signal.alarm``, so it is only called from
the main thread (elsewhere it is skipped, never run without a timeout).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

Method = Literal["boxed", "hash", "answer_is", "last_number"]
JudgedBy = Literal["numeric", "math_verify", "text", "none"]

REL_TOL = 1e-6
ABS_TOL = 1e-9
MATH_VERIFY_MAX_CHARS = 300
MATH_VERIFY_TIMEOUT_S = 3

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# A minus sign counts only when it does not follow a digit or a word (5-3 is 5 and 3, not -3).
_NUMBER_IN_TEXT = re.compile(rf"(?<![\w.])(-?)({_NUMBER})(?:\s*/\s*({_NUMBER}))?(?![\d])")
_CLEAN_NUMBER = re.compile(
    rf"^(-|\+)?\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?\s*([a-zA-Z][a-zA-Z .'/-]*)?$"
)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\b")
_HASH = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


@dataclass(frozen=True)
class Extraction:
    """The model's final answer as written, and which rule found it."""

    text: str
    method: Method


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer as the model wrote it
    method: Method | None
    value: str | None  # the normalised number ("18", "0.75", "-3", "1/3"), when there is one
    correct: bool
    judged_by: JudgedBy


# ---- extraction -----------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last complete, non-empty ``\\boxed{...}`` (nested braces kept whole).

    ``\\boxed 18`` (no braces) gives the next word. Unclosed or empty boxes are passed over.
    """
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        rest = text[match.end():]
        stripped = rest.lstrip()
        if not stripped:
            continue
        if stripped[0] != "{":
            word = stripped.split(maxsplit=1)[0].rstrip(".,;$")
            if word and rest[:1].isspace():
                return word
            continue
        content = _balanced(stripped)
        if content is not None and content.strip():
            return content.strip()
    return None


def _balanced(text: str) -> str | None:
    """``{...}`` at the start of ``text`` → its content; None when it never closes."""
    depth = 0
    for position, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:position]
    return None


def numbers_in(text: str) -> list[str]:
    """Every number in ``text`` as written (``1,000``, ``-3``, ``3/4``, ``.5``), in order."""
    found = []
    for match in _NUMBER_IN_TEXT.finditer(_plain(text)):
        sign, number, denominator = match.groups()
        found.append(f"{sign}{number}" + (f"/{denominator}" if denominator else ""))
    return found


def _first_number(text: str) -> str | None:
    found = numbers_in(text)
    return found[0] if found else None


def extract_answer(text: str) -> Extraction | None:
    """The model's final answer (see the module doc for the rules), or None when it gave none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    for pattern, method in ((_HASH, "hash"), (_ANSWER_IS, "answer_is")):
        for match in reversed(list(pattern.finditer(text))):
            number = _first_number(match.group(1))
            if number is not None:
                return Extraction(number, method)  # type: ignore[arg-type]
    found = numbers_in(text)
    return Extraction(found[-1], "last_number") if found else None


# ---- normalisation --------------------------------------------------------------------------


def _plain(text: str) -> str:
    """LaTeX and typography reduced to plain text: ``\\text{..}`` unwrapped, ``\\$`` and ``\\%``
    dropped, ``1{,}000`` and ``1\\,000`` joined, a Unicode minus made ASCII."""
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("{,}", ",")
    for _ in range(3):  # \text{\textbf{..}} nests rarely deeper
        text = _TEXT_COMMAND.sub(r" \1 ", text)
    text = _FRAC.sub(r"(\1)/(\2)", text)
    text = _FRAC_SHORT.sub(r"\1/\2", text)
    text = re.sub(r"(?<=\d)\\[,;! ](?=\d{3})", "", text)
    text = re.sub(r"\\left|\\right|\\[,;!:]|\\quad|\\qquad|\\ ", " ", text)
    text = text.replace("\\$", "$").replace("\\%", "%")
    text = re.sub(r"\((-?[\d.,]+)\)/\((-?[\d.,]+)\)", r"\1/\2", text)
    return text


def to_number(answer: str) -> Fraction | None:
    """An answer that is one number, exactly: ``$1,234.50`` → 2469/2, ``50%`` → 50, ``18.0 cm``
    → 18, ``\\frac{3}{4}`` → 3/4, ``x = 18`` → 18, ``-7`` → -7. None for anything else."""
    text = _plain(answer)
    for sep in ("=", "\\approx", "≈"):
        if sep in text:
            text = text.rsplit(sep, 1)[1]
    text = text.replace("$", " ").replace("%", " ").strip()
    text = text.strip("{}()[] ").rstrip(".,;:!").strip()
    text = re.sub(r"^(?:\\cdot|\\times)\s*", "", text)
    match = _CLEAN_NUMBER.match(text)
    if not match:
        return None
    sign, number, denominator, _unit = match.groups()
    try:
        value = Fraction(number.replace(",", ""))
        if denominator is not None:
            divisor = Fraction(denominator.replace(",", ""))
            if divisor == 0:
                return None
            value /= divisor
    except (ValueError, ZeroDivisionError):
        return None
    return -value if sign == "-" else value


def canonical(value: Fraction) -> str:
    """A number for people and CSV: ``18``, ``-3``, ``0.75``, ``1/3`` (no trailing ``.0``)."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # a terminating decimal
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return f"{value.numerator}/{value.denominator}"


def numbers_match(a: Fraction, b: Fraction, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    """Equal within ``max(abs_tol, rel_tol × the larger magnitude)``, in exact arithmetic (a model
    may write a number with hundreds of digits, which no float holds)."""
    tolerance = max(Fraction(abs_tol), Fraction(rel_tol) * max(abs(a), abs(b)))
    return abs(a - b) <= tolerance


# ---- math-verify ------------------------------------------------------------------------------

_math_verify: tuple[Callable[..., Any], Callable[..., Any]] | Literal[False] | None = None


def _load_math_verify() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    global _math_verify
    if _math_verify is None:
        try:
            from math_verify import parse, verify  # type: ignore[import-untyped]
        except Exception:  # not installed, or its antlr runtime is broken
            _math_verify = False
        else:
            logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every failed parse
            _math_verify = (parse, verify)
    return _math_verify or None


def math_verify_equal(answer: str, gold: str) -> bool | None:
    """Whether math-verify finds ``answer`` (LaTeX or plain) equal to ``gold``; None when it cannot
    settle it (not installed, not the main thread, nothing parsed, an error, a timeout)."""
    loaded = _load_math_verify()
    if loaded is None or len(answer) > MATH_VERIFY_MAX_CHARS:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    parse, verify = loaded
    try:
        gold_parsed = parse(gold, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        answer_parsed = parse(f"$\\boxed{{{answer}}}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        if not gold_parsed or not answer_parsed:
            return None
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception:  # math-verify or sympy failing on odd input must not stop an evaluation
        return None


# ---- grading --------------------------------------------------------------------------------


def grade(completion: str, gold: str) -> Grade:
    """Extract the final answer from ``completion`` and compare it with ``gold``."""
    extraction = extract_answer(completion)
    if extraction is None:
        return Grade(None, None, None, False, "none")
    return judge(extraction, gold)


def judge(extraction: Extraction, gold: str) -> Grade:
    """Compare an extracted answer with the gold one (see the module doc)."""
    text, method = extraction.text, extraction.method
    gold_value = to_number(gold)
    value = to_number(text)
    if value is not None and gold_value is not None:
        return Grade(text, method, canonical(value), numbers_match(value, gold_value), "numeric")
    if value is None and not _has_words(text):
        verdict = math_verify_equal(text, gold if gold_value is None else canonical(gold_value))
        if verdict is not None:
            return Grade(text, method, None, verdict, "math_verify")
    if value is None:
        inner = numbers_in(text)
        value = to_number(inner[-1]) if inner else None
    if value is not None and gold_value is not None:
        return Grade(text, method, canonical(value), numbers_match(value, gold_value), "numeric")
    same = _squash(text) == _squash(gold)
    return Grade(text, method, None if value is None else canonical(value), same, "text")


def _has_words(text: str) -> bool:
    """Prose (a word of two or more letters outside LaTeX commands) is no formula for math-verify."""
    return re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", _TEXT_COMMAND.sub(r" \1 ", text)) is not None


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", _plain(text)).lower().strip("$.")
