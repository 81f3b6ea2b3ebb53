"""edgeserve/routing/queue.py: the EDF queue arithmetic the scheduler and the simulator share."""

from __future__ import annotations

import math

import pytest

from edgeserve.routing.queue import remaining_ms, slack_ms, wait_estimate_ms

NOW = 10_000.0


def test_remaining_counts_what_the_running_jobs_still_take() -> None:
    assert remaining_ms(NOW, [(NOW - 400, 1000.0), (NOW - 2000, 1000.0)]) == 600.0  # an overrun counts 0


def test_a_free_slot_and_an_empty_queue_mean_no_wait() -> None:
    assert wait_estimate_ms(NOW, None, [], [], slots=1, free_slots=1) == 0.0


def test_the_wait_is_what_runs_and_what_edf_serves_first_spread_over_the_slots() -> None:
    running = [(NOW - 200, 1000.0)]
    waiting = [(NOW + 5000, 300.0), (math.inf, 500.0)]
    assert wait_estimate_ms(NOW, NOW + 1000, running, waiting, 1, 0) == 800.0  # served before both
    assert wait_estimate_ms(NOW, NOW + 9000, running, waiting, 1, 0) == 1100.0
    assert wait_estimate_ms(NOW, None, running, waiting, 1, 0) == 1600.0
    assert wait_estimate_ms(NOW, None, running, waiting, 2, 0) == 800.0


def test_slack_protects_the_queued_requests_with_later_deadlines() -> None:
    running = [(NOW, 1000.0)]
    waiting = [(NOW + 3000, 500.0)]  # finishes at 1500 when nothing cuts in: 1500 to spare
    assert slack_ms(NOW, NOW + 1000, running, waiting, 1) == pytest.approx(1500.0)
    assert slack_ms(NOW, NOW + 5000, running, waiting, 1) is None  # it is served after it
    assert slack_ms(NOW, None, running, waiting, 1) is None  # no deadline: after everything


def test_slack_ignores_requests_late_already_and_those_without_a_deadline() -> None:
    running = [(NOW, 1000.0)]
    waiting = [(NOW + 800, 500.0), (math.inf, 100.0)]  # the first cannot make it anyway
    assert slack_ms(NOW, NOW + 100, running, waiting, 1) is None


def test_slack_is_the_tightest_of_the_queued_ones() -> None:
    waiting = [(NOW + 1500, 100.0), (NOW + 2000, 900.0)]  # 1400 and 1000 ms to spare
    assert slack_ms(NOW, NOW + 100, [], waiting, 1) == pytest.approx(1000.0)
