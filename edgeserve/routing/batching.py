"""The board's future under continuous batching: when will each admitted sequence finish?

Pure (no clock, no I/O): the stepping loop (runtime/stepper.py) publishes what it runs as a
`Board`, admission asks `fit_budget` how many tokens a newcomer may have so that it *and every
sequence already admitted* finish by their deadlines, and the simulator (routing/simulator.py)
replays traces through the same `Timeline`: it advances one to each arrival (`advance_to`),
hands the policy that moment's `Board` (`Timeline.board`) and adds what the policy admits. The
timeline follows the stepping loop's rules exactly:

* each step runs ONE variant's batch, the variant whose running sequences hold the most urgent
  deadline (no deadline sorts last; among equals, the earliest arrival: first come, first
  served across variants for requests without a deadline);
* every running sequence of that variant that has finished its prompt decodes one token; the
  most urgent one still prefilling evaluates one chunk of at most ``chunk_tokens`` prompt tokens
  in the same step (the step that finishes its prompt also gives its first token);
* at most ``parallel`` sequences of a variant run at once; the others wait, earliest deadline
  first, and join when one leaves.

Costs come from each variant's CostProfile: a step of ``w`` decoding sequences costs
``step_ms(profile, w, mean context)``, a prefill chunk costs the prefill curve's increment (the
fixed part charged with the first chunk). Sequences are assumed to use their whole budget: one
that stops early only frees time, so predictions err on the safe side.

Two knobs exist for the simulator's "what really happened" timeline and are off in admission's
predictions: a sequence's ``cost_factor`` scales what its steps cost (a request that runs slower
or faster than its profile says), and ``Timeline.cut_at_deadline`` applies the runtime's deadline
rule (runtime.sequence: a sequence leaves its batch before a step that would end after its
deadline, with the tokens it has).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from edgeserve.routing.costs import CostProfile, prefill_ms, step_ms

K = TypeVar("K")


@dataclass(frozen=True)
class VariantLoad:
    """What the timeline needs of a variant: its costs, how many sequences share a batch, and
    how many it has been running lately (`LoadMeter`): a busy variant's batch fills again as
    sequences leave, so its steps are priced at no fewer than that many sequences (0: priced
    at the sequences on the board only)."""

    profile: CostProfile
    parallel: int = 1
    load: float = 0.0

    def priced_width(self, width: int) -> float:
        """The batch width a step of `width` sequences is priced at."""
        return max(float(width), min(self.load, float(self.parallel)))


LOAD_HALF_LIFE_MS = 2000.0


@dataclass
class LoadMeter:
    """How many sequences a variant has been running lately: the running count's average,
    weighted by time and fading with a half-life of a few seconds (so an idle spell brings it
    back to 0). Pure: the caller says when (ms on any clock) the count changed."""

    half_life_ms: float = LOAD_HALF_LIFE_MS
    _average: float = 0.0
    _level: int = 0
    _at_ms: float | None = None

    def observe(self, now_ms: float, running: int) -> None:
        """From `now_ms` on, `running` sequences run."""
        self._average = self.value(now_ms)
        self._level, self._at_ms = running, now_ms

    def value(self, now_ms: float) -> float:
        if self._at_ms is None:
            return 0.0
        fade: float = 0.5 ** (max(now_ms - self._at_ms, 0.0) / self.half_life_ms)
        return self._level + (self._average - self._level) * fade


@dataclass
class UnservedDemand:
    """Requests turned away only because a variant was busy (`Refusal.crowded`): each counts as
    one more sequence in that variant's load until its deadline, so newcomers are priced for
    the demand and not only for what was admitted. Without it the first of several requests
    that arrive together is priced alone, takes the whole batch for its deadline, and the
    others are refused. At most ``parallel`` count per variant (its load is capped there
    anyway): the latest replace the ones that end first. Pure: ms on any clock."""

    _until: dict[str, list[float]] = field(default_factory=dict)

    def note(self, variants: Iterable[str], until_ms: float, parallel: Callable[[str], int]) -> None:
        for name in variants:
            wanted = self._until.setdefault(name, [])
            wanted.append(until_ms)
            wanted.sort()
            del wanted[:-max(parallel(name), 1)]

    def count(self, variant: str, now_ms: float) -> int:
        wanted = self._until.get(variant)
        if not wanted:
            return 0
        wanted[:] = [until for until in wanted if until > now_ms]
        return len(wanted)


@dataclass(frozen=True)
class SeqLoad:
    """One admitted sequence as the timeline sees it. Times are ms from the board's "now";
    ``deadline_ms`` None: no deadline (served after every sequence with one)."""

    key: int
    variant: str
    tokens_left: int  # new tokens still to produce (the rest of its budget)
    prompt_left: int = 0  # prompt tokens still to evaluate (0: decoding)
    context: int = 0  # tokens in its KV cache now (evaluated prompt + generated)
    deadline_ms: float | None = None
    running: bool = True  # in its variant's batch; False: waiting for a free place
    cost_factor: float = 1.0  # its steps cost this many times what the profile says (simulated noise)
    join_width: int | None = None  # waiting: joins only when its batch has fewer sequences than this


EPSILON_MS = 1e-6  # float slack when a finish is compared with a deadline (sums split differently)


@dataclass
class _Seq:
    load: SeqLoad
    tokens_left: int
    prompt_left: int
    context: int
    prefilled_any: bool

    @property
    def urgency(self) -> Urgency:
        return (math.inf if self.load.deadline_ms is None else self.load.deadline_ms, self.load.key)

    @property
    def produced(self) -> int:
        return self.load.tokens_left - self.tokens_left

    def now_load(self, now_ms: float, running: bool) -> SeqLoad:
        """This sequence as it stands, times from ``now_ms``."""
        deadline = self.load.deadline_ms
        return replace(self.load, tokens_left=self.tokens_left, prompt_left=self.prompt_left,
                       context=self.context, running=running,
                       deadline_ms=None if deadline is None else deadline - now_ms)


Urgency = tuple[float, int]  # (deadline, inf for none; the sequence's key: earlier arrivals first)


def most_urgent(batches: Iterable[tuple[K, Iterable[Urgency]]]) -> K | None:
    """The batch the next step runs (the stepping loop and the Timeline share this rule): the
    one holding the most urgent sequence, by deadline and, among equal deadlines (or none), by
    arrival, so that requests without a deadline are served first come, first served across
    variants instead of the first variant's starving the others; empty batches never run.
    None when every batch is empty."""
    best: Urgency | None = None
    chosen: K | None = None
    for key, urgencies in batches:
        urgency = min(urgencies, default=None)
        if urgency is not None and (best is None or urgency < best):
            best, chosen = urgency, key
    return chosen


@dataclass
class Timeline:
    """Steps the board forward in whole segments (a run of identical steps) until every
    sequence has finished; ``finish_ms`` / ``start_ms`` say when each did and when it joined.

    ``cut_at_deadline``: the runtime's deadline rule, for the simulator (see the module
    docstring); ``cut`` then holds, per sequence that left at its deadline, the tokens it had
    produced (its ``finish_ms`` is when it left)."""

    variants: dict[str, VariantLoad]
    chunk_tokens: int = 64
    now_ms: float = 0.0
    running: dict[str, list[_Seq]] = field(default_factory=dict)
    waiting: dict[str, list[_Seq]] = field(default_factory=dict)
    finish_ms: dict[int, float] = field(default_factory=dict)
    start_ms: dict[int, float] = field(default_factory=dict)
    cut_at_deadline: bool = False
    cut: dict[int, int] = field(default_factory=dict)
    # how many sequences each variant has been running (for `board`, as the stepping loop
    # publishes it); this timeline's own steps are priced at its variants' `load`. None: not
    # tracked (admission's trial timelines, which never publish a board)
    meters: dict[str, LoadMeter] | None = field(default_factory=dict)

    def add(self, load: SeqLoad) -> None:
        if load.variant not in self.variants:
            raise KeyError(f"unknown variant {load.variant}")
        seq = _Seq(load, load.tokens_left, load.prompt_left, load.context,
                   prefilled_any=load.context > 0 or load.prompt_left == 0)
        if load.tokens_left <= 0:
            self.finish_ms[load.key] = self.now_ms
            return
        if load.running:
            self.running.setdefault(load.variant, []).append(seq)
            self.start_ms[load.key] = self.now_ms
        else:
            self.waiting.setdefault(load.variant, []).append(seq)
        self._fill()

    def _fill(self) -> None:
        for name, queue in self.waiting.items():
            batch = self.running.setdefault(name, [])
            queue.sort(key=lambda s: s.urgency)
            while queue and len(batch) < min(self.variants[name].parallel, queue[0].load.join_width or math.inf):
                seq = queue.pop(0)
                batch.append(seq)
                self.start_ms[seq.load.key] = self.now_ms

    def _next_variant(self) -> str | None:
        return most_urgent((name, [s.urgency for s in batch]) for name, batch in self.running.items())

    def step_segment(self) -> bool:
        """Run one segment: one prefill-carrying step, or the identical decode steps up to the
        next sequence's end. False when nothing is left to run."""
        return self._segment(math.inf)

    def advance_to(self, until_ms: float) -> list[int]:
        """Run every step that starts before ``until_ms``, then idle up to it if nothing runs.

        A step under way at ``until_ms`` runs to its end (sequences join and leave only between
        steps, as in the stepping loop), so afterwards ``now_ms >= until_ms``: the state is the
        one a newcomer arriving at ``until_ms`` can first join. Returns the keys of the sequences
        that finished meanwhile, in the order they did (their times are in ``finish_ms``).
        ``until_ms`` inf runs until every sequence has finished (``now_ms`` is then the last
        finish)."""
        before = len(self.finish_ms)
        while self.now_ms < until_ms and self._segment(until_ms):
            pass
        if not math.isinf(until_ms):
            self.now_ms = max(self.now_ms, until_ms)
        return list(self.finish_ms)[before:]

    def board(self) -> Board:
        """What runs and waits now, as the stepping loop publishes it for admission: every
        sequence still to finish, with its times in ms from ``now_ms``. Its timeline predicts
        the same finishes as this one (less ``now_ms``, and without ``cut_at_deadline``) when
        its variants' loads are left out."""
        loads: list[SeqLoad] = []
        for name in dict.fromkeys([*self.running, *self.waiting]):  # lane order: ties follow it
            loads += [s.now_load(self.now_ms, True) for s in self.running.get(name, [])]
            loads += [s.now_load(self.now_ms, False) for s in self.waiting.get(name, [])]
        meters = self.meters or {}
        variants = {name: replace(v, load=meters[name].value(self.now_ms)) if name in meters else v
                    for name, v in self.variants.items()}
        return Board(variants, tuple(loads), self.chunk_tokens)

    def _observe(self) -> None:
        if self.meters is None:
            return
        for name, batch in self.running.items():
            self.meters.setdefault(name, LoadMeter()).observe(self.now_ms, len(batch))

    def _leave(self, seq: _Seq, batch: list[_Seq], cut: bool) -> None:
        batch.remove(seq)
        self.finish_ms[seq.load.key] = self.now_ms
        if cut:
            self.cut[seq.load.key] = seq.produced

    def _segment(self, until_ms: float) -> bool:
        """One segment, of which only the steps that start before ``until_ms`` run."""
        self._observe()
        name = self._next_variant()
        if name is None:
            return False
        variant = self.variants[name]
        profile = variant.profile
        batch = self.running[name]
        decoding = [s for s in batch if s.prompt_left == 0]
        prefilling = [s for s in batch if s.prompt_left > 0]
        factor = _mean_factor(decoding)
        seq: _Seq | None = None
        chunk = 0
        if prefilling:
            seq = min(prefilling, key=lambda s: s.urgency)
            chunk = min(self.chunk_tokens, seq.prompt_left)
            cost = max(prefill_ms(profile, seq.context + chunk) - prefill_ms(profile, seq.context), 0.0)
            if not seq.prefilled_any:  # the fixed part is charged once, with the first chunk
                cost += profile.prefill_fixed_ms
            cost *= seq.load.cost_factor
            if decoding:
                cost += step_ms(profile, variant.priced_width(len(decoding)), _mean_context(decoding)) * factor
        else:
            cost = step_ms(profile, variant.priced_width(len(decoding)), _mean_context(decoding) + 1) * factor
        if self.cut_at_deadline:
            members = [*decoding, *([seq] if seq is not None else [])]
            late = [s for s in members if s.load.deadline_ms is not None
                    and self.now_ms + cost > s.load.deadline_ms + EPSILON_MS]
            if late:  # they leave before the step; the rest is planned again without them
                for s in late:
                    self._leave(s, batch, cut=True)
                self._fill()
                return True
        if seq is not None:
            seq.prefilled_any = True
            self.now_ms += cost
            seq.prompt_left -= chunk
            seq.context += chunk
            for s in decoding:
                s.tokens_left -= 1
                s.context += 1
            if seq.prompt_left == 0:
                seq.tokens_left -= 1  # the step that ends the prompt samples its first token
                seq.context += 1
        else:
            width = variant.priced_width(len(decoding))
            base = _mean_context(decoding)
            first = step_ms(profile, width, base + 1)

            def run_ms(steps: int) -> float:
                """sum over j = 1..steps of step_ms(width, base + j): linear in the context"""
                return steps * (first + step_ms(profile, width, base + steps)) / 2 * factor

            steps = min(s.tokens_left for s in decoding)
            if not math.isinf(until_ms):  # the steps that start before until_ms
                steps = _largest(steps - 1, lambda k: self.now_ms + run_ms(k) < until_ms) + 1
            deadlines = [s.load.deadline_ms for s in decoding if s.load.deadline_ms is not None]
            if self.cut_at_deadline and deadlines:  # no one decodes past its deadline (step 1 fits)
                limit = min(deadlines) + EPSILON_MS
                steps = _largest(steps, lambda k: self.now_ms + run_ms(k) <= limit)
            self.now_ms += run_ms(steps)
            for s in decoding:
                s.tokens_left -= steps
                s.context += steps
        for s in [s for s in batch if s.tokens_left <= 0]:
            self._leave(s, batch, cut=False)
        self._fill()
        return True

    def run(self) -> dict[int, float]:
        while self.step_segment():
            pass
        return self.finish_ms


def _mean_context(seqs: Sequence[_Seq]) -> float:
    return sum(s.context for s in seqs) / len(seqs)


def _mean_factor(seqs: Sequence[_Seq]) -> float:
    """What a step of these sequences costs relative to the profile: their mean cost factor."""
    if not seqs:
        return 1.0
    return sum(s.load.cost_factor for s in seqs) / len(seqs)


def _largest(high: int, ok: Callable[[int], bool]) -> int:
    """The largest k in [0, high] with ok(k), for ok true up to some k and false after (0 if
    only ok(0), which is not asked)."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if ok(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Board:
    """A snapshot of what runs and waits, published by the stepping loop for admission."""

    variants: dict[str, VariantLoad]
    sequences: tuple[SeqLoad, ...] = ()
    chunk_tokens: int = 64

    def timeline(self, extra: Iterable[SeqLoad] = ()) -> Timeline:
        timeline = Timeline(dict(self.variants), self.chunk_tokens, meters=None)
        for load in (*self.sequences, *extra):
            timeline.add(load)
        return timeline

    def finishes(self, extra: Iterable[SeqLoad] = ()) -> dict[int, float]:
        return self.timeline(extra).run()

    def unloaded(self) -> Board:
        """This board with its steps priced at the sequences on it only (no recent load)."""
        if all(v.load == 0.0 for v in self.variants.values()):
            return self
        return replace(self, variants={n: replace(v, load=0.0) for n, v in self.variants.items()})

    def with_profile(self, variant: str, profile: CostProfile) -> Board:
        variants = dict(self.variants)
        variants[variant] = replace(variants[variant], profile=profile)
        return replace(self, variants=variants)


NEWCOMER = sys.maxsize  # the key of the sequence being admitted: it arrives after every other


@dataclass(frozen=True)
class Fit:
    """The newcomer's budget, when it would join its batch and when it would finish (ms from
    now); ``blocked_by`` names what capped the budget below the deadline's own limit."""

    tokens: int
    start_ms: float
    finish_ms: float
    blocked_by: str | None = None
    join_width: int | None = None  # join only when the batch has fewer sequences (None: at once)


def fit_budget(board: Board, variant: str, prompt_tokens: int, cap: int, minimum: int,
               available_ms: float) -> Fit | None:
    """The largest budget in [minimum, cap] such that the newcomer finishes within
    ``available_ms`` (inf: no deadline) and no admitted sequence that would meet its deadline
    without the newcomer misses it with it. None when not even ``minimum`` tokens fit.

    Joining at once slows every sequence of the batch; when that would make one of them miss,
    the newcomer may instead wait until the batch has fewer than ``w`` sequences (its
    `Fit.join_width`, for w = parallel - 1 down to 1): the widest wait that gives the largest
    budget wins (ties: the earliest finish)."""
    if cap < 1:
        return None
    minimum = max(1, min(minimum, cap))
    base = board.unloaded().finishes()
    on_time = {s.key for s in board.sequences
               if s.deadline_ms is not None and base.get(s.key, math.inf) <= s.deadline_ms}
    parallel = board.variants[variant].parallel
    best: Fit | None = None
    for width in [None, *range(parallel - 1, 0, -1)]:
        fit = _fit_at(board, variant, prompt_tokens, cap, minimum, available_ms, on_time, width)
        if fit is not None and (best is None or (fit.tokens, -fit.finish_ms) > (best.tokens, -best.finish_ms)):
            best = fit
        if best is not None and best.tokens == cap:
            break
    return best


def _fit_at(board: Board, variant: str, prompt_tokens: int, cap: int, minimum: int, available_ms: float,
            on_time: set[int], join_width: int | None) -> Fit | None:
    """`fit_budget` for a newcomer that joins only when its batch has fewer than `join_width`
    sequences (None: as soon as a place is free). Binary search: more tokens never make anyone
    finish sooner."""

    unloaded = board.unloaded()

    def trial(tokens: int) -> tuple[bool, bool, float, float]:
        """(fits its own deadline, keeps the others', start, finish). Its own finish is priced
        at the variants' recent loads (what it will most likely see: places that free up fill
        again); the others' promise is kept against the board as it stands (their deadlines
        were admitted on it, and every later newcomer is checked the same way)."""
        newcomer = SeqLoad(NEWCOMER, variant, tokens, prompt_left=prompt_tokens, context=0,
                           deadline_ms=None if math.isinf(available_ms) else available_ms, running=False,
                           join_width=join_width)
        timeline = board.timeline([newcomer])
        finishes = timeline.run()
        plain = finishes if unloaded is board else unloaded.finishes([newcomer])
        own = finishes[NEWCOMER] <= available_ms
        others = all(plain[s.key] <= s.deadline_ms for s in board.sequences
                     if s.key in on_time and s.deadline_ms is not None)
        return own, others, timeline.start_ms.get(NEWCOMER, 0.0), finishes[NEWCOMER]

    own, others, start, finish = trial(minimum)
    if not (own and others):
        return None
    own_hi, others_hi, start_hi, finish_hi = trial(cap)
    if own_hi and others_hi:
        return Fit(cap, start_hi, finish_hi, join_width=join_width)
    low, high = minimum, cap  # trial(low) fits; trial(high) does not
    best = (start, finish)
    blocked: str | None = None if not own_hi else "requests already running"
    while high - low > 1:
        middle = (low + high) // 2
        own_m, others_m, start_m, finish_m = trial(middle)
        if own_m and others_m:
            low, best = middle, (start_m, finish_m)
        else:
            high = middle
            if own_m:
                blocked = "requests already running"
    return Fit(low, best[0], best[1], blocked, join_width)
