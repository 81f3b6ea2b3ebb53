"""Quality curves from a budget sweep, written into a policy file the router reads.

A sweep measures each pinned variant at fixed max_tokens with no deadline. Per variant, style,
hint and forcing setting, the accuracies at the budgets become ``[curves.<variant>.<style>]``
(hint on) or ``[curves.<variant>.<style>-nohint]`` (hint off), with ``-forced`` appended when
answer forcing was on, with ``budgets``, ``accuracy`` and ``unlimited`` when the sweep shows it:
hint off and no answer at the largest budget cut short, so a larger budget could not have changed
any answer (with the hint on, a larger budget changes the prompt itself).
Requests that failed (HTTP error, timeout) say nothing about the model and are left out of a curve
(the report still counts them).

A policy belongs to one model family (its curves are keyed by that family's variant names): the
evaluated family is written into the file's ``family`` field (a new file, or one that names no
family yet), and a file whose ``family`` names another family is refused, untouched.

Updating a file keeps everything else in it: each curve table that is rewritten keeps its place,
new ones go at the end, other tables and comments stay as they were. If the file defines curves in
a shape this text edit cannot see (inline tables, dotted keys), the file is regenerated from its
parsed content instead (its comments are then lost). Either way the result is validated with the
server's own ``parse_policy`` before it replaces the file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeserve.errors import ConfigError
from edgeserve.routing.policy_file import FORCED_SUFFIX, NOHINT_SUFFIX, PolicyFile, parse_policy
from edgeserve.routing.quality import QualityCurve, make_curve
from edgeserve.tools.eval.records import AnswerRecord

_HEADER = re.compile(r"^\s*\[(?!\[)\s*(?P<key>[^\]]+?)\s*\]\s*(?:#.*)?$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class PolicyWriteError(ConfigError):
    """The sweep cannot be written as a valid policy file."""


@dataclass(frozen=True)
class MeasuredCurve:
    variant: str  # the variant's name in models.toml (q8_0), the curve's key
    key: str  # the style, with -nohint when measured without the budget hint
    curve: QualityCurve
    questions: int  # the fewest questions behind any point
    left_out: int  # failed requests not counted


def curve_key(style: str, hint: bool, forcing: bool | None = None) -> str:
    """The policy's key of a curve: the style, `-nohint` without the hint, then `-forced` when
    answer forcing was on (None: the server's default, which a sweep leaves off)."""
    return (style if hint else style + NOHINT_SUFFIX) + (FORCED_SUFFIX if forcing else "")


def curves_from_records(records: Iterable[AnswerRecord]) -> list[MeasuredCurve]:
    """One curve per (variant, style, hint) from the sweep records (``mode == "sweep"``)."""
    points: dict[tuple[str, str], dict[int, list[AnswerRecord]]] = {}
    left_out: dict[tuple[str, str], int] = {}
    for r in records:
        if r.mode != "sweep" or r.budget is None or not r.policy.startswith("pin:"):
            continue
        where = (r.policy.removeprefix("pin:"), curve_key(r.style, r.hint, r.forcing))
        if r.status != "ok":
            left_out[where] = left_out.get(where, 0) + 1
            continue
        points.setdefault(where, {}).setdefault(r.budget, []).append(r)
    curves = []
    for (variant, key), by_budget in sorted(points.items()):
        budgets = sorted(by_budget)
        accuracy = [round(sum(r.correct for r in by_budget[b]) / len(by_budget[b]), 4) for b in budgets]
        largest = by_budget[budgets[-1]]
        settled = key.endswith(NOHINT_SUFFIX) and all(r.finish == "stop" for r in largest)
        curve = make_curve(budgets, accuracy, accuracy[-1] if settled else None)
        curves.append(MeasuredCurve(variant, key, curve, min(len(v) for v in by_budget.values()),
                                    left_out.get((variant, key), 0)))
    return curves


# ---- TOML text ------------------------------------------------------------------------------


def _number(value: float) -> str:
    return repr(round(value, 4))


def curve_table(measured: MeasuredCurve, note: str) -> str:
    """``[curves.<variant>.<key>]`` with its keys, under one ``# measured {note}; ...`` line."""
    c = measured.curve
    lines = [
        f"# measured {note}; {measured.questions} questions per budget"
        + (f", {measured.left_out} failed requests left out" if measured.left_out else ""),
        f"[curves.{_key(measured.variant)}.{_key(measured.key)}]",
        "budgets  = [" + ", ".join(str(b) for b in c.budgets) + "]",
        "accuracy = [" + ", ".join(_number(a) for a in c.accuracies) + "]",
    ]
    if c.unlimited is not None:
        lines.append(f"unlimited = {_number(c.unlimited)}")
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _header_path(key: str) -> tuple[str, ...]:
    """``curves.q8_0."boxed-nohint"`` → ("curves", "q8_0", "boxed-nohint") (simple quoting only)."""
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^.\s]+)', key)
    return tuple(next(p for p in groups if p) if any(groups) else "" for groups in parts)


def _is_comment_or_blank(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def update_text(original: str, curves: Sequence[MeasuredCurve], note: str) -> str:
    """``original`` with each measured curve table replaced in place (its comment lines above kept
    only if they are not ours) or appended at the end."""
    lines = original.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    wanted: dict[tuple[str, ...], MeasuredCurve] = {("curves", m.variant, m.key): m for m in curves}
    headers = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    replaced: set[tuple[str, ...]] = set()
    for position in reversed(range(len(headers))):
        start = headers[position]
        match = _HEADER.match(lines[start])
        assert match is not None
        path = _header_path(match.group("key"))
        measured = wanted.get(path)
        if measured is None:
            continue
        end = headers[position + 1] if position + 1 < len(headers) else len(lines)
        while end > start + 1 and _is_comment_or_blank(lines[end - 1]):
            end -= 1  # comments just above the next table belong to it
        first = start
        if first > 0 and lines[first - 1].startswith("# measured"):
            first -= 1  # our own note from an earlier sweep
        lines[first:end] = [curve_table(measured, note)]
        replaced.add(path)
    missing = [m for path, m in wanted.items() if path not in replaced]
    text = "".join(lines)
    if missing:
        text = text.rstrip("\n") + "\n\n" + "\n".join(curve_table(m, note) for m in missing)
    return text


def dump_toml(data: dict[str, Any]) -> str:
    """A plain TOML writer for what a policy file holds: strings, numbers, booleans, lists of
    those, and nested tables."""
    out: list[str] = []
    _emit(out, [], data)
    return "".join(out).lstrip("\n")


def _emit(out: list[str], path: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        out.append("\n[" + ".".join(_key(p) for p in path) + "]\n")
    for key, value in scalars.items():
        out.append(f"{_key(key)} = {_value(value)}\n")
    for key, value in tables.items():
        _emit(out, [*path, key], value)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a policy file")


def _curve_dict(curve: QualityCurve) -> dict[str, Any]:
    data: dict[str, Any] = {"budgets": list(curve.budgets), "accuracy": [round(a, 4) for a in curve.accuracies]}
    if curve.unlimited is not None:
        data["unlimited"] = round(curve.unlimited, 4)
    return data


def set_family(text: str, family: str) -> str:
    """``text`` with a top-level ``family = "..."`` line: after the top-level ``name`` line if
    there is one, else before the first table (the file has no ``family`` key yet)."""
    lines = text.splitlines(keepends=True)
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    name_line = next((i for i in range(first_table) if re.match(r"^\s*name\s*=", lines[i])), None)
    at = first_table if name_line is None else name_line + 1
    if name_line is None:
        while at > 0 and _is_comment_or_blank(lines[at - 1]) and lines[at - 1].strip():
            at -= 1  # keep the comments just above the first table with it
    if at > 0 and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines.insert(at, f"family = {_value(family)}\n")
    return "".join(lines)


def regenerate(original: str, curves: Sequence[MeasuredCurve], family: str | None = None) -> str:
    """The file rebuilt from its parsed content with the curves (and ``family``, when given) set
    (comments are lost)."""
    data = tomllib.loads(original)
    if family is not None:
        data["family"] = family  # dump_toml writes the top-level keys before the tables
    by_variant = data.setdefault("curves", {})
    for m in curves:
        by_variant.setdefault(m.variant, {})[m.key] = _curve_dict(m.curve)
    return "# regenerated by `edgeserve eval gsm8k --write-policy` (earlier comments were not kept)\n" + dump_toml(data)


def new_policy_text(name: str, family: str | None, curves: Sequence[MeasuredCurve], note: str) -> str:
    head: dict[str, Any] = {
        "name": name[:64],
        "description": f"quality curves measured by edgeserve eval gsm8k ({note})",
    }
    if family:
        head["family"] = family
    return ("# Routing policy written by `edgeserve eval gsm8k --sweep-budgets ... --write-policy`.\n"
            + dump_toml(head) + "\n" + "\n".join(curve_table(m, note) for m in curves))


def _check(text: str, source: str, curves: Sequence[MeasuredCurve],
           before: PolicyFile | None, family: str | None = None) -> PolicyFile | None:
    """The parsed policy if ``text`` is valid and holds exactly the intended curves (and family),
    else None."""
    try:
        policy = parse_policy(text.encode(), source)
    except ConfigError:
        return None
    if policy.family != (family or (before.family if before is not None else None)):
        return None
    for m in curves:
        if policy.curves.get(m.variant, {}).get(m.key) != m.curve:
            return None
    if before is not None:
        written = {(m.variant, m.key) for m in curves}
        for variant, by_style in before.curves.items():
            for key, curve in by_style.items():
                if (variant, key) not in written and policy.curves.get(variant, {}).get(key) != curve:
                    return None
    return policy


def policy_text(path: Path, curves: Sequence[MeasuredCurve], family: str | None, note: str) -> str:
    """The new content of the policy file at ``path`` (new or updated), validated. ``family`` is
    the evaluated model family (None when unknown): written into the file's ``family`` field, and
    a file that belongs to another family is refused."""
    if not curves:
        raise PolicyWriteError("the sweep measured no curve to write (no answered sweep request)")
    source = str(path)
    if not path.exists():
        text = new_policy_text(path.stem, family, curves, note)
        if _check(text, source, curves, None, family) is None:
            parse_policy(text.encode(), source)  # raises with the reason
            raise PolicyWriteError(f"{path}: the generated policy does not hold the measured curves")
        return text
    original = path.read_text(encoding="utf-8")
    try:
        before = parse_policy(original.encode(), source)
    except ConfigError as exc:
        raise PolicyWriteError(f"{path} is not a valid policy file, not touching it: {exc.message}") from exc
    if family is not None and before.family is not None and before.family != family:
        raise PolicyWriteError(
            f"{path} is the policy of family '{before.family}', not touching it: these curves were measured "
            f"on family '{family}' (its variant names mean other models there); write them to "
            f"policies/{family}.toml or the file models.toml names as the `policy` of '{family}'"
        )
    new_family = family if before.family is None else None
    text = update_text(original, curves, note)
    if new_family is not None:
        text = set_family(text, new_family)
    if _check(text, source, curves, before, new_family) is None:
        text = regenerate(original, curves, new_family)
        if _check(text, source, curves, before, new_family) is None:
            raise PolicyWriteError(f"{path}: could not write the curves without changing the rest of the file")
    return text


def write_policy(path: Path, curves: Sequence[MeasuredCurve], family: str | None, note: str) -> PolicyFile:
    """Write (or update) the policy file of ``family`` atomically; returns the policy as the server
    will read it. A file that names another family is a PolicyWriteError and stays as it was."""
    text = policy_text(path, curves, family, note)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return parse_policy(text.encode(), str(path))
