"""The routing decision: which variant, how many tokens, and why. Pure: values in, a value out.

For every variant the largest token budget that fits the time left (deadline − queue wait −
safety margin) is found from its cost profile, capped by the request's max_tokens and the
variant's context; the variant whose quality curve promises the highest accuracy at that budget
wins, ties (within 1e-9) going to the faster prediction and then to the earlier candidate.
A budget under the policy's ``min_useful_tokens`` is not worth starting; when no variant reaches
it the request is refused at once, with the time after which the queue will have drained enough.

A variant without any quality curve in the policy is expected to score 0: the policy does not
invent quality it has not measured. Such a variant is chosen only when pinned or when no variant
has a curve (then the fastest one wins on the tie rule); ``uncovered_variants`` lists them so the
server can warn at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec

from edgeserve.routing.batching import Board, fit_budget
from edgeserve.routing.costs import CostProfile, max_new_tokens_within, predict_ms
from edgeserve.routing.hints import hint_tokens_for
from edgeserve.routing.policy_file import PolicyFile

TIE_EPSILON = 1e-9

RefusalCode = Literal["deadline_infeasible", "context_length_exceeded", "variant_unavailable"]


class RoutingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What routing needs to know about a request (all variants of a family share a tokenizer).

    ``requested_max_tokens`` None → the policy's default; ``deadline_ms`` (from arrival) None →
    best quality; ``pinned`` is a variant_id; ``style`` None → the policy's default style;
    ``hint`` None → the policy's ``hint.enabled`` (X-Budget-Hint overrides it).

    ``style_choices`` (X-Prompt-Style: auto): the router picks the style among these, the first
    winning ties; ``style_prompt_tokens`` gives the prompt's length shaped with each of them
    (``prompt_tokens`` for any not listed). ``forcing``: answer forcing on or off; None lets
    the router turn it on where a measured ``<style>-forced`` curve beats the plain one.
    """

    prompt_tokens: int
    requested_max_tokens: int | None = None
    deadline_ms: float | None = None
    pinned: str | None = None
    style: str | None = None
    hint: bool | None = None
    style_choices: tuple[str, ...] = ()
    style_prompt_tokens: dict[str, int] = {}
    forcing: bool | None = False


class VariantCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """One variant as routing sees it: ``name`` is its key in the policy's curves (e.g. q8_0).

    ``wait_ms`` None: it waits in the request's queue (a local CPU slot); a remote variant that
    queues elsewhere gives its own. ``load_ms``: time to load it before it can start (0 when
    resident), part of its prediction. ``unavailable_reason`` says why ``available`` is False
    (a remote's open circuit), and the decision's reason repeats it.
    """

    variant_id: str
    name: str
    profile: CostProfile
    n_ctx: int
    available: bool = True
    wait_ms: float | None = None
    load_ms: float = 0.0
    unavailable_reason: str | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Run ``variant_id`` for at most ``max_tokens`` new tokens; tell the model ``hint_tokens``
    (None: no hint) and shape the prompt with ``style``."""

    variant_id: str
    variant_name: str
    max_tokens: int
    hint_tokens: int | None
    predicted_ms: float
    expected_accuracy: float
    reason: str
    style: str
    deadline_ms: float | None
    queue_wait_ms: float
    join_width: int | None = None  # batched: join only a batch narrower than this (None: at once)
    forcing: bool = False  # answer forcing (the request's, or the router's choice)


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Not started. ``deadline_infeasible`` → 429 with Retry-After: ``retry_after_s`` (>= 1) is
    when the queue will have drained enough for the same deadline to fit (or, if even an empty
    queue is not enough, when it will be empty); ``min_deadline_ms`` is the smallest deadline that
    would be accepted right now. The other codes carry no retry time. ``crowded``: the variants
    it would have fitted on alone, turned away only because of what they already run (unmet
    demand: the board prices later newcomers for it)."""

    reason: str
    code: RefusalCode = "deadline_infeasible"
    retry_after_s: int | None = None
    min_deadline_ms: float | None = None
    crowded: tuple[str, ...] = ()


class _Option(msgspec.Struct, frozen=True):
    candidate: VariantCandidate
    budget: int
    accuracy: float
    predicted_ms: float
    limit: str | None  # what capped the budget, if not the deadline
    wait_ms: float = 0.0  # before it starts: the queue, or when it joins its batch
    join_width: int | None = None
    style: str = ""
    forcing: bool = False


def safety_margin_ms(deadline_ms: float, policy: PolicyFile) -> float:
    """max(fixed margin, ratio × deadline): the slack kept for prediction error."""
    routing = policy.routing
    return max(routing.safety_margin_ms, routing.safety_margin_ratio * deadline_ms)


def available_ms(deadline_ms: float, queue_wait_ms: float, policy: PolicyFile) -> float:
    """Time a generation may take: deadline − queue wait − safety margin."""
    return deadline_ms - max(queue_wait_ms, 0.0) - safety_margin_ms(deadline_ms, policy)


def format_ms(ms: float) -> str:
    """A duration for people: 850 ms, 4.1 s, 12 min 5 s, 2 h 34 min."""
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    seconds = round(ms / 1000)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    minutes = round(ms / 60_000)
    return f"{minutes // 60} h {minutes % 60} min"


def uncovered_variants(policy: PolicyFile, names: Sequence[str]) -> list[str]:
    """Variant names that have no quality curve in this policy (they would score 0)."""
    return [name for name in names if not policy.curves.get(name)]


def choose(
    request: RoutingRequest,
    candidates: Sequence[VariantCandidate],
    policy: PolicyFile,
    queue_wait_ms: float,
    board: Board | None = None,
) -> Decision | Refusal:
    """The variant and budget with the best expected accuracy that fit the request's deadline.

    Guarantee: for a Decision with a deadline, ``predicted_ms + queue_wait_ms <= deadline_ms``
    (``predicted_ms`` includes the chosen variant's load time, ``queue_wait_ms`` is its wait).

    A candidate whose variant is on ``board`` (a local variant of the batched runtime) is
    judged by the board's timeline instead of ``queue_wait_ms``: its budget is the largest that
    lets it finish in time while every sequence already admitted still meets its deadline
    (routing.batching.fit_budget), and its wait is when it would join its variant's batch.
    """
    if request.requested_max_tokens is not None and request.requested_max_tokens < 1:
        raise ValueError("requested_max_tokens must be at least 1")
    style = request.style or policy.default_style
    hint_on = policy.hint.enabled if request.hint is None else request.hint
    max_tokens = request.requested_max_tokens or policy.routing.default_max_tokens
    queue = max(queue_wait_ms, 0.0)
    deadline = request.deadline_ms
    prompt = max(request.prompt_tokens, 0)

    pool = list(candidates)
    if request.pinned is not None:
        pool = [c for c in pool if c.variant_id == request.pinned]
        if not pool:
            return Refusal(reason=f"pinned variant {request.pinned} is not configured",
                           code="variant_unavailable")
    live = [c for c in pool if c.available]
    excluded = [c for c in pool if not c.available]
    if not live:
        which = "; ".join(_excluded(c) for c in pool) or "none configured"
        return Refusal(reason=f"no variant is available ({which})", code="variant_unavailable")
    fitting = [c for c in live if c.n_ctx - prompt >= 1]
    if not fitting:
        largest = max(c.n_ctx for c in live)
        return Refusal(
            reason=f"the prompt has {prompt} tokens; the largest context is {largest} tokens",
            code="context_length_exceeded",
        )

    styles = request.style_choices or (style,)
    options: list[_Option] = []
    for c in fitting:
        choices: list[_Option] = []
        for name in styles:
            timing = _timing(c, request.style_prompt_tokens.get(name, prompt), board, policy, deadline,
                             queue, max_tokens)
            if timing is None:
                continue
            for forcing in _forcings(request, policy, c.name, name, hint_on):
                curve = policy.curve_for(c.name, name, hint_on, forced=forcing)
                accuracy = curve.accuracy(timing.budget) if curve is not None else 0.0
                choices.append(msgspec.structs.replace(timing, accuracy=accuracy, style=name, forcing=forcing))
        if choices:
            options.append(_preferred(choices))

    if not options:
        assert deadline is not None  # without a deadline every fitting variant is an option
        return _refuse(request, fitting, policy, deadline, queue, max_tokens, excluded, board)

    best = options[0]
    for option in options[1:]:
        if option.accuracy > best.accuracy + TIE_EPSILON or (
            abs(option.accuracy - best.accuracy) <= TIE_EPSILON
            and option.predicted_ms < best.predicted_ms
        ):
            best = option
    chosen = best.candidate
    return Decision(
        variant_id=chosen.variant_id,
        variant_name=chosen.name,
        max_tokens=best.budget,
        hint_tokens=hint_tokens_for(best.budget, policy) if hint_on else None,
        predicted_ms=best.predicted_ms,
        expected_accuracy=best.accuracy,
        reason=_reason(best, options, request, policy, best.wait_ms, hint_on, excluded),
        style=best.style,
        deadline_ms=deadline,
        queue_wait_ms=best.wait_ms,
        join_width=best.join_width,
        forcing=best.forcing,
    )


def _forcings(request: RoutingRequest, policy: PolicyFile, variant: str, style: str, hint_on: bool) -> tuple[bool, ...]:
    """Forcing as asked, or (None: the router's choice) off, and on where it was measured."""
    if request.forcing is not None:
        return (request.forcing,)
    return (False, True) if policy.has_forced_curve(variant, style, hint_on) else (False,)


def _preferred(choices: list[_Option]) -> _Option:
    """One variant's best style and forcing: a later choice must promise more (the first, the
    request's default style without forcing, wins ties: same cost, nothing measured better)."""
    best = choices[0]
    for choice in choices[1:]:
        if choice.accuracy > best.accuracy + TIE_EPSILON:
            best = choice
    return best


def _timing(c: VariantCandidate, prompt: int, board: Board | None, policy: PolicyFile,
            deadline: float | None, queue: float, max_tokens: int) -> _Option | None:
    """The candidate's budget and predicted time for a prompt of `prompt` tokens (accuracy not
    yet filled in); None when not even the policy's useful minimum fits."""
    if c.n_ctx - prompt < 1:
        return None
    if board is not None and c.variant_id in board.variants:
        return _batched_option(c, board, prompt, deadline, policy, max_tokens)
    wait = _wait(c, queue)
    avail = math.inf if deadline is None else available_ms(deadline, wait, policy)
    avail -= c.load_ms
    cap = min(max_tokens, c.n_ctx - prompt)
    minimum = min(policy.routing.min_useful_tokens, cap)
    budget = cap if math.isinf(avail) else max_new_tokens_within(c.profile, prompt, avail, limit=cap)
    predicted = c.load_ms + predict_ms(c.profile, prompt, budget)
    while deadline is not None and budget > 0 and predicted + wait > deadline:
        budget -= 1  # float rounding guard for the invariant; practically never runs
        predicted = c.load_ms + predict_ms(c.profile, prompt, budget)
    if budget < minimum:
        return None
    return _Option(c, budget, 0.0, predicted, _limit(budget, max_tokens, c.n_ctx - prompt), wait)


def _batched_option(c: VariantCandidate, board: Board, prompt: int, deadline: float | None,
                    policy: PolicyFile, max_tokens: int) -> _Option | None:
    avail = math.inf if deadline is None else deadline - safety_margin_ms(deadline, policy) - c.load_ms
    cap = min(max_tokens, c.n_ctx - prompt)
    minimum = min(policy.routing.min_useful_tokens, cap)
    fit = fit_budget(board, c.variant_id, prompt, cap, minimum, avail)
    if fit is None:
        return None
    limit = _limit(fit.tokens, max_tokens, c.n_ctx - prompt, fit.blocked_by)
    predicted = c.load_ms + fit.finish_ms - fit.start_ms
    return _Option(c, fit.tokens, 0.0, predicted, limit, fit.start_ms, fit.join_width)


def _limit(budget: int, max_tokens: int, room: int, otherwise: str | None = None) -> str | None:
    """What capped the budget, if not the deadline: max_tokens, the context, or `otherwise`."""
    if budget == max_tokens:
        return "max_tokens"
    if budget == room:
        return "the context"
    return otherwise


def _board_wait(board: Board | None) -> float:
    """Until the first admitted sequence on the board finishes (0 when nothing runs)."""
    if board is None or not board.sequences:
        return 0.0
    return min(board.finishes().values(), default=0.0)


def _wait(candidate: VariantCandidate, queue: float) -> float:
    return queue if candidate.wait_ms is None else max(candidate.wait_ms, 0.0)


def _excluded(candidate: VariantCandidate) -> str:
    return f"{candidate.variant_id} {candidate.unavailable_reason or 'is not available'}"


def _reason(best: _Option, options: list[_Option], request: RoutingRequest, policy: PolicyFile,
            queue: float, hint_on: bool, excluded: list[VariantCandidate]) -> str:
    name = best.candidate.name
    pinned = "pinned " if request.pinned is not None else ""
    if policy.curve_for(name, best.style, hint_on, forced=best.forcing) is None:
        head = f"{pinned}{name}: no quality curve, {best.budget} tokens"
    else:
        head = f"{pinned}{name}: {best.accuracy:.2f} expected accuracy at {best.budget} tokens"
    choice = []
    if len(request.style_choices) > 1:
        choice.append(f"style {best.style}")
    if request.forcing is None and policy.has_forced_curve(name, best.style, hint_on):
        choice.append("answer forcing " + ("on" if best.forcing else "off"))
    if choice:
        head += f" ({', '.join(choice)}: chosen by the curves)"
    deadline = request.deadline_ms
    if deadline is None:
        text = f"{head} in {format_ms(best.predicted_ms)} (no deadline)"
    else:
        margin = safety_margin_ms(deadline, policy)
        text = (f"{head} in {format_ms(best.predicted_ms)} ≤ {format_ms(deadline)} − "
                f"{format_ms(queue)} queue − {format_ms(margin)} margin")
    if best.candidate.load_ms > 0:
        text += f" (including {format_ms(best.candidate.load_ms)} to load it)"
    if best.limit is not None and deadline is not None:
        text += f" (capped by {best.limit})"
    others = [o for o in options if o is not best]
    if others:
        text += "; " + ", ".join(
            f"{o.candidate.name} {o.accuracy:.2f} at {o.budget}" for o in others[:3])
    if excluded:
        text += "; excluded: " + "; ".join(_excluded(c) for c in excluded)
    return text


def _refuse(request: RoutingRequest, fitting: list[VariantCandidate], policy: PolicyFile,
            deadline: float, queue: float, max_tokens: int,
            excluded: list[VariantCandidate], board: Board | None = None) -> Refusal:
    """Why nothing fits, the smallest deadline that would, and when to retry."""
    prompt = max(request.prompt_tokens, 0)
    routing = policy.routing
    margin = safety_margin_ms(deadline, policy)
    needs: list[tuple[float, float, VariantCandidate, int]] = []  # (wait + need, need, candidate, tokens)
    busy_ms = _board_wait(board)
    for c in fitting:
        minimum = min(routing.min_useful_tokens, max_tokens, c.n_ctx - prompt)
        need = c.load_ms + predict_ms(c.profile, prompt, minimum)
        wait = busy_ms if board is not None and c.variant_id in board.variants else _wait(c, queue)
        needs.append((wait + need, need, c, minimum))
    total, need, fastest, minimum = min(needs, key=lambda item: item[0])
    wait = total - need
    if board is not None and fastest.variant_id in board.variants and board.sequences \
            and need <= deadline - margin:
        # It would fit on its own; joining now would make sequences already admitted miss.
        pinned = "pinned " if request.pinned is not None else ""
        crowded = tuple(c.variant_id for _, alone, c, _ in needs
                        if c.variant_id in board.variants and alone <= deadline - margin)
        return Refusal(
            reason=(f"deadline {format_ms(deadline)} is infeasible now: the fastest useful answer "
                    f"({pinned}{fastest.name}, {minimum} tokens) needs {format_ms(need)} alone, but the "
                    f"requests already admitted leave it too little time, or would miss their own "
                    f"deadlines if it joined; the first of them ends in about {format_ms(wait)}"),
            code="deadline_infeasible",
            retry_after_s=max(1, math.ceil(wait / 1000)),
            min_deadline_ms=None,
            crowded=crowded,
        )
    # D is feasible iff D - q - max(m, r*D) >= need  <=>  D >= q + m + need and D*(1-r) >= q + need
    min_deadline = math.ceil(max(wait + routing.safety_margin_ms + need,
                                 (wait + need) / (1 - routing.safety_margin_ratio)))
    max_wait = deadline - margin - need  # the longest queue wait this deadline could absorb
    if max_wait >= 0:
        retry_after = max(1, math.ceil((wait - max_wait) / 1000))
        why = f"the queue ({format_ms(wait)}) must first drain to {format_ms(max_wait)}"
    else:
        retry_after = max(1, math.ceil(wait / 1000))
        why = "even with an empty queue it does not fit"
    pinned = "pinned " if request.pinned is not None else ""
    gone = f"; excluded: {'; '.join(_excluded(c) for c in excluded)}" if excluded else ""
    return Refusal(
        reason=(f"deadline {format_ms(deadline)} is infeasible: the fastest useful answer "
                f"({pinned}{fastest.name}, {minimum} tokens) needs {format_ms(need)} + "
                f"{format_ms(wait)} queue + {format_ms(margin)} margin; {why}; the smallest "
                f"deadline accepted now is {format_ms(min_deadline)}{gone}"),
        code="deadline_infeasible",
        retry_after_s=retry_after,
        min_deadline_ms=float(min_deadline),
    )
