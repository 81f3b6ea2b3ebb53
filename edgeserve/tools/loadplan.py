"""Load-test scenarios, their arrival plans, outcome classes and the summary (pure: no I/O
beyond reading a scenarios or questions file, no clock).

A scenario is a piecewise-constant arrival rate, in multiples of the server's *capacity* (1 / the
time one request takes alone at its max_tokens, measured before the run), and a mix of deadline
classes, each a multiple of that same service time or an absolute number of milliseconds.
Arrivals are Poisson and come from a seed, so edgeserve and the baseline get exactly the same
requests at the same moments.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from edgeserve.routing.stats import percentile

Outcome = Literal["met", "missed", "refused", "error"]
OUTCOMES: tuple[Outcome, ...] = ("met", "missed", "refused", "error")
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class DeadlineClass(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`service_x` × the measured service time, or `ms` (absolute); `send = false` is a client
    that has the deadline but does not tell the server (no X-Deadline-Ms header)."""

    name: str
    weight: PositiveFloat = 1.0
    service_x: PositiveFloat | None = None
    ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    send: bool = True

    def __post_init__(self) -> None:
        if (self.service_x is None) == (self.ms is None):
            raise ValueError(f"deadline class {self.name!r}: give exactly one of service_x and ms")

    def deadline_ms(self, service_ms: float) -> int:
        return self.ms if self.ms is not None else max(1, round((self.service_x or 0) * service_ms))


class Phase(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Until `until` (a fraction of the run time) arrivals come at `load` × capacity."""

    until: Annotated[float, msgspec.Meta(gt=0, le=1)]
    load: NonNegativeFloat


class Scenario(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    description: str
    phases: list[Phase]
    deadlines: list[DeadlineClass]

    def __post_init__(self) -> None:
        if not self.phases or not self.deadlines:
            raise ValueError("a scenario needs at least one phase and one deadline class")
        ends = [p.until for p in self.phases]
        if ends != sorted(ends) or ends[-1] != 1:
            raise ValueError("phases must end in increasing order, the last at until = 1")

    @property
    def peak_load(self) -> float:
        return max(p.load for p in self.phases)

    def max_deadline_ms(self, service_ms: float) -> int:
        return max(c.deadline_ms(service_ms) for c in self.deadlines)


class ScenariosFile(msgspec.Struct, forbid_unknown_fields=True):
    scenarios: dict[str, Scenario]


def load_scenarios(path: Path) -> dict[str, Scenario]:
    try:
        return msgspec.toml.decode(path.read_bytes(), type=ScenariosFile).scenarios
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def read_questions(path: Path) -> list[str]:
    """The `question` of every line of a JSONL file (GSM8K's format; loadtests/questions.jsonl)."""
    questions = [str(json.loads(line)["question"]) for line in path.read_text().splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"{path} has no questions (JSONL with a `question` field)")
    return questions


def first_model(models: Any) -> str | None:
    """The first model a /v1/models answer lists (edgeserve lists its first family first)."""
    cards = models.get("data") if isinstance(models, dict) else None
    if cards and isinstance(cards[0], dict) and cards[0].get("id"):
        return str(cards[0]["id"])
    return None


# ---- the plan ----------------------------------------------------------------------------------


class Arrival(msgspec.Struct, frozen=True):
    index: int
    at_s: float  # seconds after the start of the run
    deadline_class: str
    deadline_ms: int
    send_deadline: bool
    question: int  # index into the questions file (modulo its length)


def plan_arrivals(scenario: Scenario, run_s: float, service_ms: float, seed: int) -> list[Arrival]:
    """Poisson arrivals over [0, run_s) at load × capacity (capacity = 1000 / service_ms per s)."""
    rng = random.Random(seed)
    capacity = 1000.0 / service_ms
    weights = [c.weight for c in scenario.deadlines]
    arrivals: list[Arrival] = []
    start = 0.0
    for phase in scenario.phases:
        end = phase.until * run_s
        rate = phase.load * capacity
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            chosen = rng.choices(scenario.deadlines, weights)[0]
            arrivals.append(Arrival(len(arrivals), t, chosen.name, chosen.deadline_ms(service_ms),
                                    chosen.send, len(arrivals)))
        start = end
    return arrivals


def users_needed(scenario: Scenario, service_ms: float, grace_s: float) -> int:
    """Locust users enough for open-loop arrivals: at peak rate, every user busy for at most the
    longest deadline plus the grace the client waits beyond it (Little's law, with room)."""
    peak_rps = scenario.peak_load * 1000.0 / service_ms
    busy_s = scenario.max_deadline_ms(service_ms) / 1000 + grace_s
    return max(4, math.ceil(peak_rps * busy_s * 1.5) + 4)


# ---- outcomes ----------------------------------------------------------------------------------


def classify(status: int | None, elapsed_ms: float, deadline_ms: int, *, timed_out: bool = False) -> Outcome:
    """met: a complete 200 response within its deadline (client-side: send to last byte);
    missed: a 200 after it, or no answer before the client gave up (`timed_out`); refused: 429;
    error: any other status, or a connection that broke (status None without a time-out)."""
    if status is None:
        return "missed" if timed_out else "error"
    if status == 200:
        return "met" if elapsed_ms <= deadline_ms else "missed"
    if status == 429:
        return "refused"
    return "error"


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One request as the load generator saw it (a JSON line)."""

    index: int
    deadline_class: str
    deadline_ms: int
    outcome: Outcome
    elapsed_ms: float
    status: int | None  # None: timed out or the connection broke
    lag_ms: float = 0.0  # how late it was sent against the plan (all users were busy)
    code: str | None = None  # the error code of a 4xx/5xx
    variant: str | None = None  # X-Edgeserve-Variant
    finish: str | None = None  # edgeserve.finish
    completion_tokens: int | None = None
    timed_out: bool = False
    predicted_ms: float | None = None  # edgeserve.predicted_ms: the whole budget, once it runs
    actual_ms: float | None = None  # edgeserve.actual_ms: arrival to last token, server-side
    queue_ms: float | None = None  # edgeserve.queue_ms: the wait for a place in a batch


class Summary(msgspec.Struct, frozen=True):
    target: str
    scenario: str
    run_s: float
    service_ms: float
    sent: int
    counts: dict[str, int]
    refusals: dict[str, int]  # by code
    goodput_rps: float  # met responses per second of the arrival window
    offered_rps: float
    hit_rate: float | None  # met / admitted (met + missed)
    p50_ms: float | None  # latency of the 200 responses
    p99_ms: float | None
    timeouts: int
    max_lag_ms: float
    variants: dict[str, int]
    finishes: dict[str, int]
    by_class: dict[str, dict[str, int]]
    # |predicted − actual| / actual (mean) of the answers that ran their whole budget
    # (finish `length`), actual = actual_ms − queue_ms: the cost model's error, edgeserve only
    whole_budget_error: float | None = None
    whole_budget_n: int = 0


def prediction_errors(events: Iterable[Event]) -> list[float]:
    """|predicted − actual| / actual of every answer that ran its whole budget (finish `length`),
    actual being the server's actual_ms less its queue_ms (predicted_ms covers the generation
    from the moment the request joins a batch, as `edgeserve bench-routing` measures it). An
    answer that stopped early (end of sequence, deadline) ends before its prediction by design."""
    errors = []
    for e in events:
        if e.finish != "length" or e.status != 200 or e.predicted_ms is None or e.actual_ms is None:
            continue
        actual = e.actual_ms - (e.queue_ms or 0.0)
        if actual > 0:
            errors.append(abs(e.predicted_ms - actual) / actual)
    return errors


def summarize(events: Iterable[Event], *, target: str, scenario: str, run_s: float,
              service_ms: float) -> Summary:
    events = list(events)
    counts: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
    counts.update(e.outcome for e in events)
    admitted = counts["met"] + counts["missed"]
    answered = [e.elapsed_ms for e in events if e.status == 200]
    by_class: dict[str, Counter[str]] = {}
    for e in events:
        by_class.setdefault(e.deadline_class, Counter())[e.outcome] += 1
    errors = prediction_errors(events)
    return Summary(
        target=target, scenario=scenario, run_s=run_s, service_ms=service_ms, sent=len(events),
        counts=dict(counts),
        refusals=dict(Counter(e.code or "?" for e in events if e.outcome == "refused")),
        goodput_rps=counts["met"] / run_s,
        offered_rps=len(events) / run_s,
        hit_rate=counts["met"] / admitted if admitted else None,
        p50_ms=percentile(answered, 50) if answered else None,
        p99_ms=percentile(answered, 99) if answered else None,
        timeouts=sum(e.timed_out for e in events),
        max_lag_ms=max((e.lag_ms for e in events), default=0.0),
        variants=dict(Counter(e.variant for e in events if e.variant)),
        finishes=dict(Counter(e.finish for e in events if e.finish)),
        by_class={name: dict(c) for name, c in sorted(by_class.items())},
        whole_budget_error=sum(errors) / len(errors) if errors else None,
        whole_budget_n=len(errors),
    )


def read_events(path: Path) -> list[Event]:
    decoder = msgspec.json.Decoder(Event)
    if not path.exists():
        return []
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]
