"""edgeserve/runtime/breaker.py: exclusion after a failure, backed-off checks, recovery."""

from __future__ import annotations

from edgeserve.runtime.breaker import CircuitBreaker


def test_a_failure_opens_the_circuit_and_checks_back_off_up_to_the_maximum() -> None:
    breaker = CircuitBreaker(first_backoff_s=1.0, max_backoff_s=5.0)
    assert breaker.allows() and not breaker.check_due(0.0)
    assert breaker.record_failure(10.0, "cannot connect") is True  # it opened
    assert not breaker.allows()
    assert not breaker.check_due(10.5) and breaker.check_due(11.0)
    checks = []
    now = 11.0
    for _ in range(5):
        assert breaker.record_failure(now, "cannot connect") is False  # already open
        checks.append(breaker.next_check_at - now)
        now = breaker.next_check_at
    assert checks == [2.0, 4.0, 5.0, 5.0, 5.0]
    assert "cannot connect; 6 failures in a row, next check in 5 s" in breaker.describe(now - 5.0)


def test_a_success_closes_it_and_resets_the_back_off() -> None:
    breaker = CircuitBreaker(first_backoff_s=1.0)
    breaker.record_failure(0.0, "HTTP 503")
    breaker.record_failure(1.0, "HTTP 503")
    assert breaker.record_success() is True
    assert breaker.allows() and breaker.describe(2.0) == "is up" and breaker.failures == 0
    assert breaker.record_success() is False  # nothing to close
    breaker.record_failure(5.0, "timed out")
    assert breaker.next_check_at == 6.0  # back to the first back-off
