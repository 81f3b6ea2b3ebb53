"""Numbers from answer records: accuracy with its Wilson interval, per condition, and token costs.

Accuracy counts every asked question: a refusal, an HTTP error or a timeout is a wrong answer
(each is also counted on its own). The deadline-hit rate is over answered requests: the share the
server finished within the deadline by its own clock (``edgeserve.actual_ms``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import fmean, median

from edgeserve.routing.stats import percentile
from edgeserve.tools.eval.records import AnswerRecord

Z_95 = 1.959963984540054

GroupKey = tuple[str, str, int | None, int | None, str, bool, bool | None]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Exact at the ends (float rounding would leave 1e-17 or 0.9999999999999999) and around p.
    low = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes == n else max(p, min(1.0, centre + half))
    return low, high


@dataclass(frozen=True)
class GroupStats:
    """One condition: a policy at a deadline (run) or a variant at a budget (sweep)."""

    mode: str
    policy: str
    deadline_ms: int | None
    budget: int | None
    style: str
    hint: bool
    forcing: bool | None
    n: int
    correct: int
    answered: int
    refused: int
    errors: int
    timeouts: int
    cut: int  # answers that ended on their token budget or deadline, not on their own
    mean_completion_tokens: float | None
    mean_budget_tokens: float | None  # the server's budget (max new tokens) for the answered ones
    deadline_hits: int
    mean_latency_ms: float | None
    p95_latency_ms: float | None
    variants: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def deadline_hit_rate(self) -> float | None:
        if self.deadline_ms is None or not self.answered:
            return None
        return self.deadline_hits / self.answered

    @property
    def variant_shares(self) -> str:
        """``q4_1 80%, q2_k 20%`` (variant names without the family)."""
        total = sum(self.variants.values())
        if not total:
            return ""
        ordered = sorted(self.variants.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{name.split(':')[-1]} {count / total:.0%}" for name, count in ordered)


def group_key(record: AnswerRecord) -> GroupKey:
    return (record.mode, record.policy, record.deadline_ms, record.budget, record.style, record.hint,
            record.forcing)


def summarize(records: Iterable[AnswerRecord]) -> list[GroupStats]:
    """One GroupStats per condition, sorted by mode, style, hint, deadline/budget, policy."""
    groups: dict[GroupKey, list[AnswerRecord]] = {}
    for record in records:
        groups.setdefault(group_key(record), []).append(record)
    stats = [_stats(key, members) for key, members in groups.items()]
    return sorted(stats, key=_order)


def _order(s: GroupStats) -> tuple[object, ...]:
    policy_rank = (0, "") if s.policy == "routed" else (1, s.policy)
    return (s.mode, s.style, not s.hint, s.forcing is not None, s.forcing or False,
            s.deadline_ms or 0, s.budget or 0, policy_rank)


def _stats(key: GroupKey, members: list[AnswerRecord]) -> GroupStats:
    mode, policy, deadline_ms, budget, style, hint, forcing = key
    answered = [r for r in members if r.status == "ok"]
    tokens = [r.completion_tokens for r in answered if r.completion_tokens is not None]
    budgets = [r.budget_tokens for r in answered if r.budget_tokens is not None]
    latencies = [r.latency_ms for r in answered if r.latency_ms is not None]
    return GroupStats(
        mode=mode, policy=policy, deadline_ms=deadline_ms, budget=budget, style=style, hint=hint,
        forcing=forcing, n=len(members), correct=sum(r.correct for r in members), answered=len(answered),
        refused=sum(r.status == "refused" for r in members),
        errors=sum(r.status == "http_error" for r in members),
        timeouts=sum(r.status == "timeout" for r in members),
        cut=sum(r.finish in ("length", "deadline") for r in answered),
        mean_completion_tokens=fmean(tokens) if tokens else None,
        mean_budget_tokens=fmean(budgets) if budgets else None,
        deadline_hits=sum(r.deadline_hit is True for r in answered),
        mean_latency_ms=fmean(latencies) if latencies else None,
        p95_latency_ms=percentile(latencies, 95) if latencies else None,
        variants=dict(Counter(r.variant for r in answered if r.variant)),
    )


def decode_ms_per_token(records: Iterable[AnswerRecord]) -> dict[str, float]:
    """Measured decode cost per variant name (``q8_0``): total decode ms / total generated tokens
    over every answered request (the server's own ``timings``)."""
    ms: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for r in records:
        if r.status != "ok" or not r.variant or r.decode_ms is None or not r.completion_tokens:
            continue
        name = r.variant.split(":")[-1]
        ms[name] = ms.get(name, 0.0) + r.decode_ms
        tokens[name] = tokens.get(name, 0) + r.completion_tokens
    return {name: ms[name] / tokens[name] for name in ms if tokens[name] > 0}


@dataclass(frozen=True)
class HintHonesty:
    """How a variant's answers kept to the budget hint: tokens produced ÷ hinted tokens."""

    variant: str
    n: int
    median_ratio: float
    over_share: float  # answers longer than the hint
    over_budget_share: float  # answers cut by max_tokens (finish `length`) despite the hint


def hint_honesty(records: Iterable[AnswerRecord]) -> list[HintHonesty]:
    """Per variant, over answered requests that carried a hint (`hint_tokens`): the median of
    completion tokens ÷ hint tokens, and how often the answer ran past the hint and to the budget."""
    ratios: dict[str, list[float]] = {}
    cut: dict[str, int] = {}
    for r in records:
        if r.status != "ok" or not r.hint_tokens or r.completion_tokens is None or r.variant is None:
            continue
        ratios.setdefault(r.variant, []).append(r.completion_tokens / r.hint_tokens)
        cut[r.variant] = cut.get(r.variant, 0) + (r.finish == "length")
    return [HintHonesty(variant, len(values), median(values),
                        sum(v > 1 for v in values) / len(values), cut[variant] / len(values))
            for variant, values in sorted(ratios.items())]
