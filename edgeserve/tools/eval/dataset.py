"""GSM8K-style datasets: JSONL lines with ``question`` and ``answer`` (the answer ends ``#### n``).

Read from a path the user gives; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import ConfigError


class DatasetError(ConfigError):
    """The dataset file is missing or a line is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    """One question; ``index`` is its 0-based position among the file's problems."""

    index: int
    question: str
    solution: str  # the dataset's full answer text
    gold: str  # what follows the final ``####``


def gold_of(answer: str) -> str | None:
    """The final answer of a GSM8K solution (the text after the last ``####``), or None."""
    if "####" not in answer:
        return None
    tail = answer.rsplit("####", 1)[1].strip()
    return tail or None


def load_problems(path: Path, limit: int | None = None, skip: int = 0) -> list[Problem]:
    """``limit`` problems of ``path`` (all of them when None) after the first ``skip``, so that
    curves and evaluations can use disjoint questions; a problem's index is its place in the
    file (0-based, blank lines skipped), whatever was skipped."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    if skip < 0:
        raise DatasetError(f"--skip must be 0 or more, got {skip}")
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset ({exc.strerror or exc})") from exc
    problems: list[Problem] = []
    seen = 0
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            problems.append(_parse_line(path, number, line, seen - 1))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise DatasetError(f"{path}: no problems in the file" + (f" after the first {skip}" if skip else ""))
    return problems


def _parse_line(path: Path, number: int, line: str, index: int) -> Problem:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object with `question` and `answer`")
    question, answer = item.get("question"), item.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: `question` must be a non-empty string")
    if not isinstance(answer, str):
        raise DatasetError(f"{where}: `answer` must be a string ending with `#### <number>`")
    gold = gold_of(answer)
    if not gold:
        raise DatasetError(f"{where}: `answer` must end with `#### <number>`, got {answer[-60:]!r}")
    return Problem(index=index, question=question, solution=answer, gold=gold)
