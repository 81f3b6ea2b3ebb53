"""Replay arrivals through the real policy and a simulated queue, with no model and no clock.

The simulated server has one CPU slot served earliest-deadline-first (requests without a deadline
after those with one, in arrival order); the policy is told the same queue wait and slack (the
longest a newcomer may run without making a queued request miss) as the server's scheduler,
computed by the same functions (routing.queue). Each admitted request takes its predicted time, optionally
multiplied by a lognormal noise factor drawn from ``random.Random(seed)``. Like the runner, a
generation that would overrun its deadline is cut at the deadline: it then counts as a miss and its
realized accuracy is the curve's value at the tokens it managed to produce.

``accuracy_vs_deadline`` and ``crossover_deadline`` answer the study's question for one request
shape: which variant wins at which deadline, and from which deadline on the slower, better one wins.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from typing import Annotated

import msgspec

from edgeserve.routing import queue as queue_model
from edgeserve.routing.costs import CostProfile, max_new_tokens_within, predict_ms
from edgeserve.routing.policy import (
    Decision,
    Refusal,
    RoutingRequest,
    VariantCandidate,
    choose,
)
from edgeserve.routing.policy_file import PolicyFile


class Arrival(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a trace (JSONL): times in ms; ``deadline_ms`` is relative to the arrival."""

    arrival_ms: float
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    deadline_ms: float | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    arrival: Arrival
    variant: str | None  # curve name; None when refused
    refusal_code: str | None
    budget_tokens: int
    expected_accuracy: float  # at the decision (0 when refused)
    realized_accuracy: float  # after a cut at the deadline (0 when refused)
    queue_estimate_ms: float  # what the policy was told
    start_ms: float | None
    finish_ms: float | None
    met_deadline: bool | None  # None: no deadline or refused


class SimulationResult(msgspec.Struct, frozen=True, kw_only=True):
    """``hit_rate``: share of admitted requests with a deadline that finished in full by it.
    ``served_rate``: the same over all requests with a deadline (refusals count as misses).
    Accuracies: ``mean_expected_accuracy`` over admitted requests; ``*_all`` over every request,
    refusals counting 0. ``variant_shares``: fraction of admitted requests per variant."""

    requests: int
    admitted: int
    refused: int
    refusals_by_code: dict[str, int]
    with_deadline: int
    met: int
    hit_rate: float | None
    served_rate: float | None
    mean_expected_accuracy: float | None
    mean_expected_accuracy_all: float
    mean_realized_accuracy_all: float
    variant_shares: dict[str, float]
    outcomes: list[Outcome]


class _Job(msgspec.Struct):
    index: int
    arrival: Arrival
    decision: Decision
    profile: CostProfile
    factor: float
    key: float  # absolute deadline, inf without one


def _scaled(profile: CostProfile, factor: float) -> CostProfile:
    return msgspec.structs.replace(
        profile,
        prefill_fixed_ms=profile.prefill_fixed_ms * factor,
        prefill_ms_per_token=profile.prefill_ms_per_token * factor,
        prefill_growth_ms_per_token_per_1k_ctx=profile.prefill_growth_ms_per_token_per_1k_ctx * factor,
        decode_ms_per_token=profile.decode_ms_per_token * factor,
        decode_growth_ms_per_token_per_1k_ctx=profile.decode_growth_ms_per_token_per_1k_ctx
        * factor,
    )


def simulate(
    trace: Sequence[Arrival],
    candidates: Sequence[VariantCandidate],
    policy: PolicyFile,
    *,
    noise: float = 0.0,
    seed: int = 0,
    style: str | None = None,
    hint: bool | None = None,
) -> SimulationResult:
    """Replay ``trace`` (any order; sorted by arrival) through ``choose`` and one EDF slot.

    ``noise`` is the sigma of the lognormal factor applied to each service time (0: services
    take exactly their predicted time). The queue wait told to the policy is the predicted time
    left of the running job plus the predicted times of the queued jobs that EDF puts ahead, and
    its run limit the slack before a queued job with a later deadline would miss
    (routing.queue, as in the server).
    """
    rng = random.Random(seed)
    by_id = {c.variant_id: c for c in candidates}
    order = sorted(range(len(trace)), key=lambda i: (trace[i].arrival_ms, i))
    outcomes: dict[int, Outcome] = {}
    queue: list[tuple[float, int, _Job]] = []
    running: tuple[_Job, float, float] | None = None  # job, start, predicted end
    running_end = 0.0

    def run_next(now: float) -> None:
        nonlocal running, running_end
        if not queue:
            running = None
            return
        _, _, job = heapq.heappop(queue)
        start = max(now, job.arrival.arrival_ms)
        end, outcome = _serve(job, start, policy)
        outcomes[job.index] = outcome
        running = (job, start, start + job.decision.predicted_ms)
        running_end = end

    def advance(to: float) -> None:
        while running is not None and running_end <= to:
            run_next(running_end)

    for seq, i in enumerate(order):
        item = trace[i]
        now = item.arrival_ms
        advance(now)
        key = math.inf if item.deadline_ms is None else now + item.deadline_ms
        deadline_at = None if item.deadline_ms is None else key
        on_cpu = [] if running is None else [(running[1], running[0].decision.predicted_ms)]
        waiting = [(k, job.decision.predicted_ms) for k, _, job in sorted(queue)]
        wait = queue_model.wait_estimate_ms(now, deadline_at, on_cpu, waiting, 1, 0 if running else 1)
        request = RoutingRequest(prompt_tokens=item.prompt_tokens,
                                 requested_max_tokens=item.max_tokens,
                                 deadline_ms=item.deadline_ms, style=style, hint=hint,
                                 run_limit_ms=queue_model.slack_ms(now, deadline_at, on_cpu, waiting, 1))
        decision = choose(request, candidates, policy, wait)
        if isinstance(decision, Refusal):
            outcomes[i] = Outcome(arrival=item, variant=None, refusal_code=decision.code,
                                  budget_tokens=0, expected_accuracy=0.0, realized_accuracy=0.0,
                                  queue_estimate_ms=wait, start_ms=None, finish_ms=None,
                                  met_deadline=None)
            continue
        factor = rng.lognormvariate(0.0, noise) if noise > 0 else 1.0
        job = _Job(i, item, decision, by_id[decision.variant_id].profile, factor, key)
        outcomes[i] = Outcome(arrival=item, variant=decision.variant_name, refusal_code=None,
                              budget_tokens=decision.max_tokens,
                              expected_accuracy=decision.expected_accuracy,
                              realized_accuracy=0.0, queue_estimate_ms=wait, start_ms=None,
                              finish_ms=None, met_deadline=None)
        heapq.heappush(queue, (key, seq, job))  # EDF, then arrival order
        if running is None:
            run_next(now)
    advance(math.inf)
    return _summarise([outcomes[i] for i in range(len(trace))])


def _serve(job: _Job, start: float, policy: PolicyFile) -> tuple[float, Outcome]:
    """When the job ends and how it went, cutting it at its deadline like the runner does."""
    decision, item = job.decision, job.arrival
    actual = _scaled(job.profile, job.factor)
    tokens = decision.max_tokens
    end = start + predict_ms(actual, item.prompt_tokens, tokens)
    met: bool | None = None
    if item.deadline_ms is not None:
        met = end <= job.key
        if not met:
            tokens = max_new_tokens_within(actual, item.prompt_tokens, job.key - start,
                                           limit=decision.max_tokens)
            end = max(start + predict_ms(actual, item.prompt_tokens, tokens), start)
    curve = policy.curve_for(decision.variant_name, decision.style,
                             decision.hint_tokens is not None)
    realized = decision.expected_accuracy if met is not False else (
        curve.accuracy(tokens) if curve is not None else 0.0)
    outcome = Outcome(arrival=item, variant=decision.variant_name, refusal_code=None,
                      budget_tokens=decision.max_tokens,
                      expected_accuracy=decision.expected_accuracy, realized_accuracy=realized,
                      queue_estimate_ms=decision.queue_wait_ms, start_ms=start, finish_ms=end,
                      met_deadline=met)
    return end, outcome


def _summarise(outcomes: list[Outcome]) -> SimulationResult:
    admitted = [o for o in outcomes if o.variant is not None]
    refused = [o for o in outcomes if o.variant is None]
    codes: dict[str, int] = {}
    for o in refused:
        codes[o.refusal_code or "?"] = codes.get(o.refusal_code or "?", 0) + 1
    timed = [o for o in outcomes if o.arrival.deadline_ms is not None]
    admitted_timed = [o for o in admitted if o.arrival.deadline_ms is not None]
    met = sum(1 for o in admitted_timed if o.met_deadline)
    shares: dict[str, float] = {}
    for o in admitted:
        assert o.variant is not None
        shares[o.variant] = shares.get(o.variant, 0.0) + 1 / len(admitted)
    n = len(outcomes)
    return SimulationResult(
        requests=n,
        admitted=len(admitted),
        refused=len(refused),
        refusals_by_code=codes,
        with_deadline=len(timed),
        met=met,
        hit_rate=met / len(admitted_timed) if admitted_timed else None,
        served_rate=met / len(timed) if timed else None,
        mean_expected_accuracy=(sum(o.expected_accuracy for o in admitted) / len(admitted)
                                if admitted else None),
        mean_expected_accuracy_all=sum(o.expected_accuracy for o in outcomes) / n if n else 0.0,
        mean_realized_accuracy_all=sum(o.realized_accuracy for o in outcomes) / n if n else 0.0,
        variant_shares=dict(sorted(shares.items())),
        outcomes=outcomes,
    )


# ---- one request shape across deadlines ------------------------------------------------------


class DeadlineRow(msgspec.Struct, frozen=True, kw_only=True):
    """The policy's choice at one deadline (empty queue), and what each variant alone would
    promise there (``per_variant``: expected accuracy when pinned, 0 if it cannot fit)."""

    deadline_ms: float
    variant: str | None
    max_tokens: int | None
    predicted_ms: float | None
    expected_accuracy: float
    per_variant: dict[str, float]


def _decide(policy: PolicyFile, candidates: Sequence[VariantCandidate], prompt_tokens: int,
            deadline_ms: float | None, max_tokens: int | None, style: str | None,
            hint: bool | None, pinned: str | None = None) -> Decision | Refusal:
    request = RoutingRequest(prompt_tokens=prompt_tokens, requested_max_tokens=max_tokens,
                             deadline_ms=deadline_ms, pinned=pinned, style=style, hint=hint)
    return choose(request, candidates, policy, 0.0)


def accuracy_vs_deadline(
    policy: PolicyFile,
    candidates: Sequence[VariantCandidate],
    prompt_tokens: int,
    deadlines: Sequence[float],
    *,
    max_tokens: int | None = None,
    style: str | None = None,
    hint: bool | None = None,
) -> list[DeadlineRow]:
    """One row per deadline: the chosen variant, its budget and expected accuracy."""
    rows = []
    for deadline in deadlines:
        decision = _decide(policy, candidates, prompt_tokens, deadline, max_tokens, style, hint)
        per_variant = {}
        for c in candidates:
            pinned = _decide(policy, candidates, prompt_tokens, deadline, max_tokens, style, hint,
                             c.variant_id)
            per_variant[c.name] = (pinned.expected_accuracy if isinstance(pinned, Decision)
                                   else 0.0)
        if isinstance(decision, Decision):
            rows.append(DeadlineRow(deadline_ms=deadline, variant=decision.variant_name,
                                    max_tokens=decision.max_tokens,
                                    predicted_ms=decision.predicted_ms,
                                    expected_accuracy=decision.expected_accuracy,
                                    per_variant=per_variant))
        else:
            rows.append(DeadlineRow(deadline_ms=deadline, variant=None, max_tokens=None,
                                    predicted_ms=None, expected_accuracy=0.0,
                                    per_variant=per_variant))
    return rows


def deadline_range(
    policy: PolicyFile,
    candidates: Sequence[VariantCandidate],
    prompt_tokens: int,
    *,
    max_tokens: int | None = None,
) -> tuple[float, float]:
    """Deadlines worth looking at: from a little under the fastest useful answer to a little over
    the deadline at which the slowest variant gets its whole budget (nothing changes beyond)."""
    cap = max_tokens or policy.routing.default_max_tokens
    live = [c for c in candidates if c.available and c.n_ctx > prompt_tokens] or list(candidates)
    if not live:
        raise ValueError("no candidates")
    ratio = policy.routing.safety_margin_ratio
    fixed = policy.routing.safety_margin_ms

    def deadline_for(c: VariantCandidate, tokens: int) -> float:
        need = predict_ms(c.profile, prompt_tokens, max(1, min(tokens, c.n_ctx - prompt_tokens)))
        return max(fixed + need, need / (1 - ratio))

    lo = min(deadline_for(c, min(policy.routing.min_useful_tokens, cap)) for c in live)
    hi = max(deadline_for(c, cap) for c in live)
    return max(1.0, math.floor(lo * 0.8)), math.ceil(hi * 1.1)


def deadline_grid(lo_ms: float, hi_ms: float, n: int) -> list[float]:
    """``n`` deadlines spaced geometrically from ``lo_ms`` to ``hi_ms`` (whole ms)."""
    if n < 2 or lo_ms <= 0 or hi_ms <= lo_ms:
        return [float(round(hi_ms))]
    step = (hi_ms / lo_ms) ** (1 / (n - 1))
    return sorted({float(round(lo_ms * step**i)) for i in range(n)})


def _speed_order(candidates: Sequence[VariantCandidate], prompt_tokens: int,
                 tokens: int) -> list[VariantCandidate]:
    live = [c for c in candidates if c.available]
    return sorted(live, key=lambda c: predict_ms(c.profile, prompt_tokens, tokens))


def crossover_deadline(
    policy: PolicyFile,
    candidates: Sequence[VariantCandidate],
    prompt_tokens: int,
    *,
    fast: str | None = None,
    slow: str | None = None,
    max_tokens: int | None = None,
    style: str | None = None,
    hint: bool | None = None,
    grid_points: int = 400,
    resolution_ms: float = 1.0,
) -> float | None:
    """The smallest deadline (ms, empty queue) at which the policy picks the slow variant after
    having picked the fast one at a shorter deadline; None if that never happens.

    ``fast``/``slow`` are curve names; by default the fastest and the slowest available variant
    for this request shape. A geometric grid over ``deadline_range`` finds the first switch,
    bisection pins it down to ``resolution_ms`` (whole ms by default).
    """
    cap = max_tokens or policy.routing.default_max_tokens
    ordered = _speed_order(candidates, prompt_tokens, cap)
    if len(ordered) < 2:
        return None
    fast = fast or ordered[0].name
    slow = slow or ordered[-1].name

    def picks(deadline: float) -> str | None:
        decision = _decide(policy, candidates, prompt_tokens, deadline, max_tokens, style, hint)
        return decision.variant_name if isinstance(decision, Decision) else None

    lo, hi = deadline_range(policy, candidates, prompt_tokens, max_tokens=max_tokens)
    seen_fast = False
    previous = lo
    for deadline in deadline_grid(lo, hi, grid_points):
        chosen = picks(deadline)
        if chosen == fast:
            seen_fast = True
        elif chosen == slow and seen_fast:
            low, high = previous, deadline  # picks(low) != slow, picks(high) == slow
            while high - low > resolution_ms:
                middle = (low + high) / 2
                if picks(middle) == slow:
                    high = middle
                else:
                    low = middle
            whole = math.ceil(low)  # the answer in whole ms: ceil(low) or else ceil(high)
            return float(whole if whole <= high and picks(whole) == slow else math.ceil(high))
        previous = deadline
    return None


def sweep_trace(
    policy: PolicyFile,
    candidates: Sequence[VariantCandidate],
    prompt_tokens: int,
    n: int,
    *,
    max_tokens: int | None = None,
    gap_ms: float | None = None,
) -> list[Arrival]:
    """``n`` requests with deadlines spread over ``deadline_range``, arriving ``gap_ms`` apart
    (default: the longest deadline, so no request waits for another)."""
    lo, hi = deadline_range(policy, candidates, prompt_tokens, max_tokens=max_tokens)
    deadlines = deadline_grid(lo, hi, n)
    gap = hi if gap_ms is None else gap_ms
    return [Arrival(arrival_ms=i * gap, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                    deadline_ms=d) for i, d in enumerate(deadlines)]
