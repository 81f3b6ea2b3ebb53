"""Stop sequences over a stream of text pieces.

Text that could still turn into a stop sequence is held back until the next piece decides;
nothing after a stop sequence is ever sent.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text that is now safe to send."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        self._pending += piece
        hit = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            safe, self._pending = self._pending[:hit], ""
            return safe
        keep = self._held_suffix_length()
        safe = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return safe

    def flush(self) -> str:
        """The generation ended without a stop: release what was held back."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest

    def _held_suffix_length(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop."""
        text = self._pending
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
