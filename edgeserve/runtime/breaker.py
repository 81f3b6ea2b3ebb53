"""A circuit breaker for a remote variant: after a failure the remote is excluded from routing
until a health check succeeds; checks back off (1 s, 2 s, 4 s … up to a maximum) so a dead
remote costs almost nothing. Time is passed in (``now``, seconds), so this is plain logic."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    first_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    open: bool = False
    reason: str = ""
    failures: int = 0  # consecutive
    next_check_at: float = 0.0
    _backoff_s: float = field(default=0.0, repr=False)

    def allows(self) -> bool:
        """Whether routing may send requests there now."""
        return not self.open

    def record_success(self) -> bool:
        """A request or health check succeeded; returns True when this closed an open circuit."""
        was_open = self.open
        self.open, self.reason, self.failures, self._backoff_s = False, "", 0, 0.0
        return was_open

    def record_failure(self, now: float, reason: str) -> bool:
        """Open (or keep open) the circuit; returns True when this opened it."""
        was_open = self.open
        self.failures += 1
        self._backoff_s = self.first_backoff_s if not was_open else min(self._backoff_s * 2, self.max_backoff_s)
        self.open, self.reason, self.next_check_at = True, reason, now + self._backoff_s
        return not was_open

    def check_due(self, now: float) -> bool:
        """An open circuit wants a health check now."""
        return self.open and now >= self.next_check_at

    def describe(self, now: float) -> str:
        """For decision reasons and logs: why it is excluded and when it is checked again."""
        if not self.open:
            return "is up"
        wait = max(0.0, self.next_check_at - now)
        return (f"is down ({self.reason}; {self.failures} failure{'s' if self.failures != 1 else ''} "
                f"in a row, next check in {wait:.0f} s)")
