"""One JSON line per answer in OUT/results.jsonl, and what a rerun may skip.

A work item is identified by ``(index, policy, deadline_ms, style, hint, budget, forcing)``;
``budget`` is the max_tokens sent (None: the server decides from the deadline). A rerun skips every
item that already has an ``ok`` or ``refused`` line; items that ended in ``http_error`` or
``timeout`` are tried again and the newest line for a key is the one reports use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

Status = Literal["ok", "refused", "http_error", "timeout"]
Mode = Literal["deadline", "sweep"]
DONE_STATUSES: frozenset[str] = frozenset({"ok", "refused"})
RESULTS_FILE = "results.jsonl"

WorkKey = tuple[int, str, int | None, str, bool, int | None, bool | None]


class AnswerRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Everything measured about one answer (times in ms; ``latency_ms`` is the client's clock)."""

    index: int
    mode: Mode
    policy: str  # "routed" or "pin:<variant>"
    model: str  # what was sent as `model`
    deadline_ms: int | None
    style: str
    hint: bool
    budget: int | None  # max_tokens sent
    forcing: bool | None = None  # X-Answer-Forcing sent (None: the server's default)
    status: Status
    error: str | None = None
    http_status: int | None = None
    variant: str | None = None
    budget_tokens: int | None = None
    hint_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    actual_ms: float | None = None
    queue_ms: float | None = None
    predicted_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    finish: str | None = None
    reason: str | None = None
    applied_style: str | None = None  # the style instruction the server added (X-Prompt-Style: auto picks one)
    forced: bool | None = None  # whether the server forced the answer (its policy may decide)
    min_deadline_ms: float | None = None
    retry_after_s: int | None = None
    attempts: int = 1  # asks of this question (a patient client asks again after a refusal)
    text: str | None = None
    extracted: str | None = None
    extracted_value: str | None = None
    method: str | None = None
    judged_by: str | None = None
    gold: str
    correct: bool = False
    started_at: float = 0.0  # unix time

    @property
    def key(self) -> WorkKey:
        return (self.index, self.policy, self.deadline_ms, self.style, self.hint, self.budget, self.forcing)

    @property
    def deadline_hit(self) -> bool | None:
        """Answered within its deadline (server-side time); None without a deadline or answer."""
        if self.deadline_ms is None or self.status != "ok" or self.actual_ms is None:
            return None
        return self.actual_ms <= self.deadline_ms


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnswerRecord)


def encode(record: AnswerRecord) -> bytes:
    return _encoder.encode(record) + b"\n"


def read_records(path: Path) -> list[AnswerRecord]:
    """Every valid line of ``path`` (none when it does not exist). A line that does not decode
    (a run killed mid-write) is skipped with a note on stderr."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                print(f"edgeserve eval: {path}:{number}: skipping a malformed line ({exc})", file=sys.stderr)
    return records


def latest(records: Iterable[AnswerRecord]) -> list[AnswerRecord]:
    """The newest record of every key, in first-seen key order; a done line beats a later error."""
    chosen: dict[WorkKey, AnswerRecord] = {}
    for record in records:
        previous = chosen.get(record.key)
        if previous is not None and previous.status in DONE_STATUSES and record.status not in DONE_STATUSES:
            continue
        chosen[record.key] = record
    return list(chosen.values())


def done_keys(records: Iterable[AnswerRecord]) -> set[WorkKey]:
    """Keys a rerun skips: those with an ``ok`` or ``refused`` line."""
    return {r.key for r in records if r.status in DONE_STATUSES}


class ResultsWriter:
    """Appends records to results.jsonl, flushed line by line so a killed run loses nothing."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as handle:
                handle.seek(-1, 2)
                needs_newline = handle.read(1) != b"\n"
        else:
            needs_newline = False
        self._handle = path.open("ab")
        if needs_newline:  # a torn last line stays on its own line, skipped by read_records
            self._handle.write(b"\n")

    def write(self, record: AnswerRecord) -> None:
        self._handle.write(encode(record))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
