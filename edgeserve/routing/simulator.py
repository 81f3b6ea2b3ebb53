"""Replay arrivals through the real policy and the server's batching model, with no model and no clock.

The simulated board is the server's: every candidate is a local variant with ``parallel`` places
in its batch, one CPU runs one variant's batch per step, and `routing.batching.Timeline` keeps
what has been admitted (the same timeline admission predicts with). At each arrival the timeline
is advanced to the arrival (a step under way finishes first: newcomers join between steps), the
policy is given that moment's `Board` — exactly what the stepping loop would publish — and
decides with `choose(..., board)` as the server does (`fit_budget`: the largest budget that
finishes in time while every admitted request still meets its deadline); an admitted request
joins its variant's batch or waits for a place, earliest deadline first.

Each admitted request may run slower or faster than predicted: with ``noise`` its steps cost a
lognormal factor (drawn from ``random.Random(seed)``) times what its profile says, a batch step
the mean factor of its members; the policy never sees the factor, only where the requests stand.
Like the runtime, a sequence leaves its batch before a step that would end after its deadline:
it then counts as a miss and its realized accuracy is the curve's value at the tokens it had.

``accuracy_vs_deadline``, ``crossover_deadline`` and ``choice_spans`` answer the study's question
for one request shape on an empty board: which variant wins at which deadline, and from which
deadline on the slower, better one wins. (On an empty board the timeline's prediction is the
closed form of routing.costs, so these call the policy without a board.)

Results name a variant by its label (``variant_label``): the name in its variant id
(``fam:q8_0`` → ``q8_0``), which is its curve name except for a speculative pair
(``fam:q8_0+q2_k`` → ``q8_0+q2_k``, whose curve is its target's): a pair and its target must not
be counted as one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Annotated

import msgspec

from edgeserve.routing.batching import EPSILON_MS, Board, SeqLoad, Timeline, UnservedDemand, VariantLoad
from edgeserve.routing.costs import predict_ms
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
    """One request's fate. ``queue_estimate_ms``: the wait the policy predicted from the arrival
    until the request joins its variant's batch (for a refusal: until the next step boundary).
    ``start_ms`` / ``finish_ms``: when it joined its batch and when it left it (its last token,
    or its cut at the deadline), on the trace's clock."""

    arrival: Arrival
    variant: str | None  # label (see the module docstring); None when refused
    refusal_code: str | None
    budget_tokens: int
    expected_accuracy: float  # at the decision (0 when refused)
    realized_accuracy: float  # after a cut at the deadline (0 when refused)
    queue_estimate_ms: float
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


class _Admitted(msgspec.Struct, frozen=True):
    arrival: Arrival
    decision: Decision
    wait_ms: float  # predicted, from the arrival until it joins its batch
    deadline_at: float | None  # on the trace's clock


def variant_label(variant_id: str) -> str:
    """What results call a variant: the part of its id after the last ":" (module docstring)."""
    return variant_id.rpartition(":")[2]


def parallel_of(parallel: int | Mapping[str, int], variant_id: str) -> int:
    """A variant's places in its batch: one number for all, or per variant_id (missing: 1)."""
    places = parallel if isinstance(parallel, int) else parallel.get(variant_id, 1)
    if places < 1:
        raise ValueError(f"parallel must be at least 1 ({variant_id}: {places})")
    return places


def simulate(
    trace: Sequence[Arrival],
    candidates: Sequence[VariantCandidate],
    policy: PolicyFile,
    *,
    parallel: int | Mapping[str, int] = 1,
    chunk_tokens: int = 64,
    noise: float = 0.0,
    seed: int = 0,
    style: str | None = None,
    hint: bool | None = None,
) -> SimulationResult:
    """Replay ``trace`` (any order; sorted by arrival) through ``choose`` and the batching timeline.

    ``parallel``: how many sequences share a variant's batch (models.toml's ``parallel``), one
    number for every variant or a mapping variant_id → places; ``chunk_tokens``: the prompt
    tokens evaluated per step (``edgeserve serve --prefill-chunk``). ``noise`` is the sigma of the
    lognormal cost factor of each admitted request (0: every step costs exactly its prediction,
    and every admitted request with a deadline meets it).
    """
    rng = random.Random(seed)
    variants = {c.variant_id: VariantLoad(c.profile, parallel_of(parallel, c.variant_id))
                for c in candidates}
    order = sorted(range(len(trace)), key=lambda i: (trace[i].arrival_ms, i))
    start = trace[order[0]].arrival_ms if order else 0.0
    timeline = Timeline(dict(variants), chunk_tokens, now_ms=start, cut_at_deadline=True)
    admitted: dict[int, _Admitted] = {}
    outcomes: dict[int, Outcome] = {}
    unserved = UnservedDemand()

    def settle(keys: list[int]) -> None:
        for key in keys:
            outcomes[key] = _outcome(admitted.pop(key), key, timeline, policy)

    for i in order:
        item = trace[i]
        settle(timeline.advance_to(item.arrival_ms))
        lag = timeline.now_ms - item.arrival_ms  # the step under way when it arrived
        board = _as_published(timeline.board(), variants, unserved, timeline.now_ms)
        request = RoutingRequest(prompt_tokens=item.prompt_tokens,
                                 requested_max_tokens=item.max_tokens,
                                 deadline_ms=None if item.deadline_ms is None else item.deadline_ms - lag,
                                 style=style, hint=hint)
        decision = choose(request, candidates, policy, 0.0, board)
        if isinstance(decision, Refusal):
            if item.deadline_ms is not None:
                unserved.note(decision.crowded, item.arrival_ms + item.deadline_ms, lambda v: variants[v].parallel)
            outcomes[i] = Outcome(arrival=item, variant=None, refusal_code=decision.code,
                                  budget_tokens=0, expected_accuracy=0.0, realized_accuracy=0.0,
                                  queue_estimate_ms=lag, start_ms=None, finish_ms=None,
                                  met_deadline=None)
            continue
        factor = rng.lognormvariate(0.0, noise) if noise > 0 else 1.0
        deadline_at = None if item.deadline_ms is None else item.arrival_ms + item.deadline_ms
        admitted[i] = _Admitted(item, decision, lag + decision.queue_wait_ms, deadline_at)
        timeline.add(SeqLoad(i, decision.variant_id, decision.max_tokens,
                             prompt_left=item.prompt_tokens, context=0, deadline_ms=deadline_at,
                             running=False, cost_factor=factor, join_width=decision.join_width))
    settle(timeline.advance_to(math.inf))
    return _summarise([outcomes[i] for i in range(len(trace))])


def _as_published(board: Board, variants: dict[str, VariantLoad], unserved: UnservedDemand,
                  now_ms: float) -> Board:
    """The board as the server's admission sees it: the profiles (and the recent loads, with the
    requests turned away for want of room), not how each request really runs."""
    sequences = tuple(replace(s, cost_factor=1.0) for s in board.sequences)
    published = {name: replace(v, load=board.variants[name].load + unserved.count(name, now_ms))
                 for name, v in variants.items()}
    return replace(board, variants=published, sequences=sequences)


def _outcome(done: _Admitted, key: int, timeline: Timeline, policy: PolicyFile) -> Outcome:
    """How an admitted request went: its tokens, and whether it was cut at its deadline."""
    decision = done.decision
    finish = timeline.finish_ms[key]
    cut = key in timeline.cut
    met: bool | None = None
    if done.deadline_at is not None:
        met = not cut and finish <= done.deadline_at + EPSILON_MS
    if met is False:
        curve = policy.curve_for(decision.variant_name, decision.style,
                                 decision.hint_tokens is not None, forced=decision.forcing)
        tokens = timeline.cut.get(key, decision.max_tokens)
        realized = curve.accuracy(tokens) if curve is not None else 0.0
    else:
        realized = decision.expected_accuracy
    return Outcome(arrival=done.arrival, variant=variant_label(decision.variant_id),
                   refusal_code=None,
                   budget_tokens=decision.max_tokens, expected_accuracy=decision.expected_accuracy,
                   realized_accuracy=realized, queue_estimate_ms=done.wait_ms,
                   start_ms=timeline.start_ms.get(key, finish), finish_ms=finish, met_deadline=met)


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
    promise there (``per_variant``: expected accuracy when pinned, 0 if it cannot fit). Variants
    by label (see the module docstring)."""

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
            per_variant[variant_label(c.variant_id)] = (
                pinned.expected_accuracy if isinstance(pinned, Decision) else 0.0)
        if isinstance(decision, Decision):
            rows.append(DeadlineRow(deadline_ms=deadline,
                                    variant=variant_label(decision.variant_id),
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

    ``fast``/``slow`` are labels (curve names; ``target+draft`` for a pair); by default the
    fastest and the slowest available variant for this request shape. A geometric grid over
    ``deadline_range`` finds the first switch, bisection pins it down to ``resolution_ms`` (whole
    ms by default).
    """
    cap = max_tokens or policy.routing.default_max_tokens
    ordered = _speed_order(candidates, prompt_tokens, cap)
    if len(ordered) < 2:
        return None
    fast = fast or variant_label(ordered[0].variant_id)
    slow = slow or variant_label(ordered[-1].variant_id)

    def picks(deadline: float) -> str | None:
        decision = _decide(policy, candidates, prompt_tokens, deadline, max_tokens, style, hint)
        return variant_label(decision.variant_id) if isinstance(decision, Decision) else None

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


class ChoiceSpan(msgspec.Struct, frozen=True, kw_only=True):
    """The deadlines from ``from_ms`` (inclusive) to ``to_ms`` (exclusive; None: every longer one)
    at which the policy picks ``variant`` (a label; None: it refuses) on an empty board."""

    variant: str | None
    from_ms: float
    to_ms: float | None


def choice_spans(
    policy: PolicyFile,
    candidates: Sequence[VariantCandidate],
    prompt_tokens: int,
    *,
    max_tokens: int | None = None,
    style: str | None = None,
    hint: bool | None = None,
    grid_points: int = 400,
    resolution_ms: float = 1.0,
) -> list[ChoiceSpan]:
    """Which variant the policy picks at every deadline (empty queue), as consecutive spans.

    With more than two candidates (a speculative pair beside its two halves) one crossover
    deadline is not the whole story. A geometric grid over ``deadline_range`` finds the switches
    and bisection pins each to ``resolution_ms`` (whole ms by default). The first span starts at
    0 (the range starts below the fastest useful answer: a refusal) and the last never ends (past
    the range every variant gets its whole budget, so nothing changes).
    """

    def picks(deadline: float) -> str | None:
        decision = _decide(policy, candidates, prompt_tokens, deadline, max_tokens, style, hint)
        return variant_label(decision.variant_id) if isinstance(decision, Decision) else None

    lo, hi = deadline_range(policy, candidates, prompt_tokens, max_tokens=max_tokens)
    spans: list[ChoiceSpan] = []
    current, start, previous = picks(lo), 0.0, lo
    for deadline in deadline_grid(lo, hi, grid_points):
        chosen = picks(deadline)
        low = previous
        while chosen != current:  # one or more switches in (low, deadline]
            switch = _first_change(picks, low, deadline, resolution_ms)
            now = picks(switch)
            if now != current:
                spans.append(ChoiceSpan(variant=current, from_ms=start, to_ms=switch))
                current, start = now, switch
            low = switch
        previous = deadline
    spans.append(ChoiceSpan(variant=current, from_ms=start, to_ms=None))
    return spans


def _first_change(picks: Callable[[float], str | None], low: float, high: float,
                  resolution_ms: float) -> float:
    """The first deadline in (low, high], in whole ms where it can be, at which ``picks`` differs
    from ``picks(low)`` (``picks(high)`` must differ)."""
    before = picks(low)
    while high - low > resolution_ms:
        middle = (low + high) / 2
        if picks(middle) == before:
            low = middle
        else:
            high = middle
    whole = math.ceil(low)
    return float(whole if low < whole <= high and picks(whole) != before else math.ceil(high))


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
