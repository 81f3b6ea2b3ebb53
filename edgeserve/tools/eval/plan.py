"""What to ask: evaluation policies (routed or pinned) and the work items of a run or a sweep."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgeserve.tools.eval.dataset import Problem
from edgeserve.tools.eval.records import Mode, WorkKey

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class EvalPolicy:
    """``routed`` (the server picks the variant) or ``pin:<variant>`` (one variant, always)."""

    variant: str | None = None  # None: routed

    @property
    def name(self) -> str:
        return "routed" if self.variant is None else f"pin:{self.variant}"

    def model(self, family: str) -> str:
        """The request's `model`: the family (routed) or ``family:variant`` (pinned)."""
        return family if self.variant is None else f"{family}:{self.variant}"


def parse_eval_policy(text: str) -> EvalPolicy:
    """``routed`` or ``pin:<variant>`` (e.g. ``pin:q2_k``); ValueError otherwise."""
    text = text.strip()
    if text == "routed":
        return EvalPolicy()
    if text.startswith("pin:") and _VARIANT_NAME.match(text[4:]):
        return EvalPolicy(text[4:])
    raise ValueError(f"unknown policy {text!r}: use `routed` or `pin:<variant>` (e.g. pin:q2_k)")


def parse_policies(text: str) -> list[EvalPolicy]:
    """A comma-separated list of policies, without duplicates, in the order given."""
    policies = [parse_eval_policy(part) for part in text.split(",") if part.strip()]
    if not policies:
        raise ValueError("give at least one policy (routed, pin:<variant>)")
    return list(dict.fromkeys(policies))


def parse_int_list(text: str, what: str, low: int, high: int) -> list[int]:
    """``1000,3000,10000`` → [1000, 3000, 10000], each in low..high, sorted, no duplicates."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = int(part.strip())
        except ValueError:
            raise ValueError(f"{what}: {part.strip()!r} is not an integer") from None
        if not low <= value <= high:
            raise ValueError(f"{what}: {value} is not in {low}..{high}")
        values.append(value)
    if not values:
        raise ValueError(f"{what}: give at least one value")
    return sorted(set(values))


@dataclass(frozen=True)
class WorkItem:
    """One question asked one way."""

    problem: Problem
    mode: Mode
    policy: EvalPolicy
    deadline_ms: int | None
    style: str
    hint: bool
    budget: int | None  # max_tokens to send (None: let the server decide)
    forcing: bool | None = None

    @property
    def key(self) -> WorkKey:
        return (self.problem.index, self.policy.name, self.deadline_ms, self.style, self.hint,
                self.budget, self.forcing)


def deadline_items(problems: Sequence[Problem], policies: Sequence[EvalPolicy], deadlines: Sequence[int],
                   styles: Sequence[str], hints: Sequence[bool], max_tokens: int | None,
                   forcing: bool | None = None) -> list[WorkItem]:
    """Every question under every policy × deadline × style × hint. Questions are the outer loop,
    so a run stopped half-way has every condition measured on the same questions."""
    return [
        WorkItem(problem, "deadline", policy, deadline, style, hint, max_tokens, forcing)
        for problem in problems for style in styles for hint in hints
        for deadline in deadlines for policy in policies
    ]


def sweep_items(problems: Sequence[Problem], variants: Sequence[str], budgets: Sequence[int],
                styles: Sequence[str], hints: Sequence[bool], forcing: bool | None = None) -> list[WorkItem]:
    """Every question on every pinned variant at every fixed max_tokens, with no deadline."""
    return [
        WorkItem(problem, "sweep", EvalPolicy(variant), None, style, hint, budget, forcing)
        for problem in problems for style in styles for hint in hints
        for budget in budgets for variant in variants
    ]


def pending(items: Iterable[WorkItem], done: set[WorkKey]) -> list[WorkItem]:
    """The items a (re)run still has to ask."""
    return [item for item in items if item.key not in done]
