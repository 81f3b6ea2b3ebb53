"""The queue model: earliest-deadline-first CPU slots, as arithmetic. Pure: no clock, no I/O.

The server's scheduler (runtime/scheduler.py) and the simulator (routing/simulator.py) both ask
these two questions of their queue, so the estimates the policy is given cannot drift apart:

- `wait_estimate_ms`: how long a newcomer with this deadline would wait for a slot;
- `slack_ms`: how long it may run without making a request already queued behind it (a later
  deadline) miss its predicted finish.

Times are milliseconds on the caller's clock (``now_ms``); a deadline of None sorts after every
deadline (``math.inf``). ``running`` is ``(started_ms, predicted_ms)`` per running job,
``waiting`` is ``(deadline_ms, predicted_ms)`` per queued job in the order the queue serves them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def remaining_ms(now_ms: float, running: Iterable[tuple[float, float]]) -> float:
    """Predicted time the running jobs still take, summed."""
    return sum(max(0.0, predicted - (now_ms - started)) for started, predicted in running)


def wait_estimate_ms(now_ms: float, deadline_ms: float | None, running: Iterable[tuple[float, float]],
                     waiting: Sequence[tuple[float, float]], slots: int, free_slots: int) -> float:
    """What runs now plus what would be served before the newcomer, spread over the slots;
    0 when a slot is free and nobody waits."""
    if free_slots > 0 and not waiting:
        return 0.0
    key = math.inf if deadline_ms is None else deadline_ms
    ahead = sum(predicted for queued_deadline, predicted in waiting if queued_deadline <= key)
    return (remaining_ms(now_ms, running) + ahead) / slots


def slack_ms(now_ms: float, deadline_ms: float | None, running: Iterable[tuple[float, float]],
             waiting: Sequence[tuple[float, float]], slots: int) -> float | None:
    """The longest a newcomer with this deadline may run without making a request already
    queued behind it miss its predicted finish; None when nothing is queued behind it (or it
    has no deadline: it sorts after everything). Queued requests that are late already are left
    out: refusing the newcomer cannot save them (the scheduler refuses them at their turn)."""
    if deadline_ms is None:
        return None
    busy = remaining_ms(now_ms, running)
    slack: float | None = None
    for queued_deadline, predicted in waiting:
        busy += predicted  # everything up to and including this one
        if queued_deadline <= deadline_ms or math.isinf(queued_deadline):
            continue
        own = queued_deadline - now_ms - busy / slots
        if own >= 0:
            slack = own * slots if slack is None else min(slack, own * slots)
    return slack
