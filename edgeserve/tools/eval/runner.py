"""Ask the pending work items with K requests in flight, append each answer as it comes, and show
progress with the running accuracy on stderr."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Protocol, TextIO

from edgeserve.tools.eval.plan import WorkItem
from edgeserve.tools.eval.records import AnswerRecord, ResultsWriter


class Answerer(Protocol):
    async def answer(self, item: WorkItem, family: str) -> AnswerRecord: ...


class Progress:
    """``[ 37/900] acc 2/37 5.4% | refused 3 | errors 0 | 1m12s, eta 27m`` on stderr: rewritten in
    place on a terminal, one line per ~5 % otherwise (logs, CI)."""

    def __init__(self, total: int, done: int = 0, correct: int = 0, refused: int = 0, errors: int = 0,
                 stream: TextIO | None = None) -> None:
        self.total, self.done, self.correct = total, done, correct
        self.refused, self.errors = refused, errors
        self._resumed = done
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._started = time.monotonic()
        self._every = max(1, (total - done) // 20)

    def add(self, record: AnswerRecord) -> None:
        self.done += 1
        self.correct += record.correct
        self.refused += record.status == "refused"
        self.errors += record.status in ("http_error", "timeout")
        if self._tty or (self.done - self._resumed) % self._every == 0 or self.done == self.total:
            self._show()

    def line(self) -> str:
        width = len(str(self.total))
        share = self.correct / self.done if self.done else 0.0
        elapsed = time.monotonic() - self._started
        fresh = self.done - self._resumed
        eta = elapsed / fresh * (self.total - self.done) if fresh else 0.0
        return (f"[{self.done:>{width}}/{self.total}] acc {self.correct}/{self.done} {share:.1%} | "
                f"refused {self.refused} | errors {self.errors} | {_duration(elapsed)}, eta {_duration(eta)}")

    def _show(self) -> None:
        end = "" if self._tty and self.done < self.total else "\n"
        prefix = "\r\x1b[2K" if self._tty else ""
        print(prefix + self.line(), end=end, file=self._stream, flush=True)

    def finish(self) -> None:
        if self._tty and self.done < self.total:
            print(file=self._stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ServerGoneError(RuntimeError):
    """Too many requests in a row failed without any reply from the server."""


async def run_items(client: Answerer, items: Sequence[WorkItem], family: str, writer: ResultsWriter,
                    concurrency: int, progress: Progress | None = None,
                    max_consecutive_failures: int = 10) -> list[AnswerRecord]:
    """Ask every item, ``concurrency`` at a time, in order of ``items``; each record is written the
    moment it arrives. Returns the records in arrival order.

    After ``max_consecutive_failures`` requests in a row got no HTTP reply at all (connection
    refused, timeout), the run stops with ServerGoneError instead of failing every remaining item;
    what was recorded stays, and a rerun resumes."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    queue: asyncio.Queue[WorkItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    records: list[AnswerRecord] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while failures < max_consecutive_failures:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            record = await client.answer(item, family)
            writer.write(record)
            records.append(record)
            no_reply = record.status == "timeout" or (record.status == "http_error" and record.http_status is None)
            failures = failures + 1 if no_reply else 0
            if progress is not None:
                progress.add(record)

    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, len(items))))))
    finally:
        if progress is not None:
            progress.finish()
    if failures >= max_consecutive_failures:
        last = records[-1].error if records else ""
        raise ServerGoneError(f"{failures} requests in a row got no reply (last: {last}); stopped. "
                              "Rerun the same command to resume.")
    return records
