"""The HTTP side: one question → one chat completion on a running edgeserve → one AnswerRecord.

Headers carry the experiment: ``X-Deadline-Ms``, ``X-Budget-Hint``, ``X-Prompt-Style`` and
optionally ``X-Answer-Forcing``; the server adds the style instruction and the budget hint to the
question itself. Temperature 0 (greedy), so a rerun asks the same thing and gets the same answer.
A 429 ``deadline_infeasible`` is a refusal; any other error status, a dropped connection or a
timeout is recorded as such, never dropped. A patient client (``retry_refused``) waits the
refusal's ``Retry-After`` and asks again with what is left of the same deadline, as long as some
of it is left: the way to measure several requests in flight, where a client that takes the
first 429 as final would run through its questions while one answer is being made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from edgeserve.errors import EdgeserveError
from edgeserve.tools.eval.grading import grade
from edgeserve.tools.eval.plan import WorkItem
from edgeserve.tools.eval.records import AnswerRecord

DEADLINE_SLACK_S = 60.0  # how long past its deadline a request may take before the client gives up


class ServerError(EdgeserveError):
    """The server is unreachable, not ready, or does not serve what the evaluation asks for."""


@dataclass(frozen=True)
class ServedModels:
    """Families and their variants (``family`` → variant names) from ``GET /v1/models``."""

    families: dict[str, list[str]]

    def family(self, wanted: str | None) -> str:
        if wanted is not None:
            if wanted not in self.families:
                raise ServerError(f"the server does not serve family {wanted!r}; it serves "
                                  f"{sorted(self.families)}")
            return wanted
        if len(self.families) != 1:
            raise ServerError(f"the server serves several families {sorted(self.families)}; pick one "
                              "with --model")
        return next(iter(self.families))


def request_for(item: WorkItem, family: str,
                deadline_left_ms: int | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The headers and JSON body of one question (``deadline_left_ms``: what is left of its
    deadline when it is asked again after a refusal)."""
    headers = {"X-Prompt-Style": item.style, "X-Budget-Hint": "on" if item.hint else "off"}
    if item.deadline_ms is not None:
        headers["X-Deadline-Ms"] = str(item.deadline_ms if deadline_left_ms is None else deadline_left_ms)
    if item.forcing is not None:
        headers["X-Answer-Forcing"] = "on" if item.forcing else "off"
    elif item.mode == "sweep":  # a curve says what was measured: not what a policy's `auto` chose
        headers["X-Answer-Forcing"] = "off"
    body: dict[str, Any] = {
        "model": item.policy.model(family),
        "messages": [{"role": "user", "content": item.problem.question}],
        "temperature": 0,
        "seed": 0,
    }
    if item.budget is not None:
        body["max_tokens"] = item.budget
    return headers, body


class EvalClient:
    """An async client of one edgeserve; ``timeout_s`` bounds any one request."""

    def __init__(self, base_url: str, timeout_s: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None, *, retry_refused: bool = False,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.timeout_s = timeout_s
        self.retry_refused = retry_refused
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> EvalClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._http.aclose()

    async def served_models(self) -> ServedModels:
        """Checks the server is ready and lists what it serves (ServerError otherwise)."""
        try:
            ready = await self._http.get("/ready", timeout=10)
            if ready.status_code != 200:
                raise ServerError(f"{self._http.base_url} is not ready ({ready.status_code}: {ready.text[:200]})")
            listing = (await self._http.get("/v1/models", timeout=10)).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServerError(f"cannot reach edgeserve at {self._http.base_url}: {exc}") from exc
        families: dict[str, list[str]] = {}
        for card in listing.get("data", []):
            if card.get("kind") == "family":
                families[card["id"]] = [v.split(":", 1)[1] for v in card.get("variants") or []]
        if not families:
            raise ServerError(f"{self._http.base_url}/v1/models lists no model family")
        return ServedModels(families)

    async def answer(self, item: WorkItem, family: str) -> AnswerRecord:
        """Ask one question and grade the reply; never raises for a server or network failure.
        With ``retry_refused`` a refusal is asked again after its Retry-After, with the rest of
        the deadline, while at least 1 ms of it would be left (``attempts`` counts the asks;
        ``latency_ms`` runs from the first)."""
        started, started_at = time.perf_counter(), round(time.time(), 3)
        left_ms = item.deadline_ms
        attempts = 1
        while True:
            record = await self._ask(item, family, left_ms, started)
            if not self.retry_refused or record.status != "refused" or item.deadline_ms is None:
                break
            wait_s = record.retry_after_s or 1
            left_ms = int(item.deadline_ms - _ms_since(started) - wait_s * 1000)
            if left_ms < 1:
                break
            await self._sleep(wait_s)
            left_ms = int(item.deadline_ms - _ms_since(started))
            attempts += 1
        return _with(record, attempts=attempts, started_at=started_at)

    async def _ask(self, item: WorkItem, family: str, deadline_left_ms: int | None, started: float) -> AnswerRecord:
        headers, body = request_for(item, family, deadline_left_ms)
        timeout = self.timeout_s
        if item.deadline_ms is not None:
            timeout = min(timeout, item.deadline_ms / 1000 + DEADLINE_SLACK_S)
        base = _base_record(item, body["model"])
        try:
            response = await self._http.post("/v1/chat/completions", json=body, headers=headers,
                                             timeout=timeout)
        except httpx.TimeoutException as exc:
            return _with(base, status="timeout", latency_ms=_ms_since(started),
                         error=f"no reply within {timeout:.0f} s ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return _with(base, status="http_error", latency_ms=_ms_since(started),
                         error=f"{type(exc).__name__}: {exc}")
        latency_ms = _ms_since(started)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 200 or not isinstance(payload, dict):
            return _failure(base, response, payload, latency_ms)
        return _success(base, payload, latency_ms, item.problem.gold)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _base_record(item: WorkItem, model: str) -> AnswerRecord:
    return AnswerRecord(
        index=item.problem.index, mode=item.mode, policy=item.policy.name, model=model,
        deadline_ms=item.deadline_ms, style=item.style, hint=item.hint, budget=item.budget,
        forcing=item.forcing, status="http_error", gold=item.problem.gold, started_at=round(time.time(), 3),
    )


def _with(record: AnswerRecord, **changes: Any) -> AnswerRecord:
    return msgspec.structs.replace(record, **changes)


def _failure(base: AnswerRecord, response: httpx.Response, payload: object, latency_ms: float) -> AnswerRecord:
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else response.text[:300]
    if response.status_code == 429 and code == "deadline_infeasible":
        min_deadline = response.headers.get("X-Edgeserve-Min-Deadline-Ms")
        retry_after = response.headers.get("Retry-After")
        return _with(base, status="refused", http_status=429, latency_ms=latency_ms, error=message,
                     min_deadline_ms=float(min_deadline) if min_deadline else None,
                     retry_after_s=int(retry_after) if retry_after and retry_after.isdigit() else None)
    return _with(base, status="http_error", http_status=response.status_code, latency_ms=latency_ms,
                 error=f"{response.status_code} {code or ''}: {message}".replace("  ", " "))


def _success(base: AnswerRecord, payload: dict[str, Any], latency_ms: float, gold: str) -> AnswerRecord:
    try:
        text = payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return _with(base, status="http_error", http_status=200, latency_ms=latency_ms,
                     error=f"a 200 reply without choices[0].message.content: {str(payload)[:300]}")
    info = payload.get("edgeserve") or {}
    usage = payload.get("usage") or {}
    timings = payload.get("timings") or {}
    graded = grade(text, gold)
    return _with(
        base, status="ok", http_status=200, latency_ms=latency_ms, text=text,
        variant=info.get("variant"), budget_tokens=info.get("budget_tokens"), hint_tokens=info.get("hint_tokens"),
        prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        actual_ms=info.get("actual_ms"), queue_ms=info.get("queue_ms"), predicted_ms=info.get("predicted_ms"),
        prefill_ms=timings.get("prompt_ms"), decode_ms=timings.get("predicted_ms"),
        finish=info.get("finish"), reason=info.get("reason"),
        applied_style=info.get("style"), forced=info.get("answer_forcing"),
        extracted=graded.extracted, extracted_value=graded.value, method=graded.method,
        judged_by=graded.judged_by, correct=graded.correct,
    )
