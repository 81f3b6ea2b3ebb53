"""The soak's mixed requests and how each one's outcome is judged.

Every request ends in exactly one outcome, so none can be lost without being counted:
`ok` (a full answer; a stream that ended with [DONE]), `refused` (429/503, or a stream's error
event with a refusal code), `rejected` (the 4xx a deliberately bad request must get),
`disconnected` (the client left mid-stream on purpose), `error` (5xx, a 4xx to a good request,
an error event that is not a refusal) and `lost` (no status, a timeout, a stream cut before
[DONE]). A sound server has no `error` and no `lost`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal

import httpx

Outcome = Literal["ok", "refused", "rejected", "disconnected", "error", "lost"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "refused", "rejected", "disconnected", "error", "lost")
REFUSAL_CODES = frozenset({"queue_full", "deadline_infeasible", "shutting_down", "not_ready"})
TIMEOUT_S = 120.0

QUESTIONS = [
    "What is 7 * 6?",
    "Name three colours of the rainbow.",
    "A pen costs 3 dollars. How much do 4 pens cost?",
    "Write one sentence about the sea.",
    "Say hello in French.",
]
STORY = "Write a long story about a lighthouse keeper and a storm."


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix; `weight` is its share of the draws."""

    name: str
    weight: int
    stream: bool = False
    bad: bool = False
    leave_after_first_piece: bool = False


KINDS = (
    Kind("chat-loose", 3),  # routed, a loose deadline
    Kind("stream-pinned", 3, stream=True),  # pinned variant, no deadline
    Kind("chat-tight", 2),  # a tight deadline: often a 429 or finish "deadline"
    Kind("text", 1),  # /v1/completions
    Kind("stream-leave", 1, stream=True, leave_after_first_piece=True),
    Kind("bad", 1, bad=True),  # malformed JSON, unknown model, bad header, bad field
)


@dataclass(frozen=True)
class Sent:
    request_id: str
    kind: str
    outcome: Outcome
    status: int | None
    detail: str = ""


def draw(rng: random.Random) -> Kind:
    return rng.choices(KINDS, weights=[k.weight for k in KINDS])[0]


def build(kind: Kind, rng: random.Random, family: str, variants: list[str]) -> tuple[str, dict[str, str], bytes]:
    """The path, headers and body of one request of `kind`."""
    messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    headers: dict[str, str] = {"Content-Type": "application/json"}
    body: dict[str, Any] = {"model": family, "messages": messages, "max_tokens": 24}
    if kind.name == "chat-loose":
        headers["X-Deadline-Ms"] = "30000"
    elif kind.name == "chat-tight":
        headers["X-Deadline-Ms"] = str(rng.randint(150, 3000))
        body["max_tokens"] = 64
    elif kind.name == "stream-pinned":
        body.update(model=rng.choice(variants), stream=True)
    elif kind.name == "stream-leave":
        body.update(model=rng.choice(variants), stream=True, max_tokens=200,
                    messages=[{"role": "user", "content": STORY}])
    elif kind.name == "text":
        return "/v1/completions", headers, json.dumps(
            {"model": family, "prompt": "The capital of France is", "max_tokens": 16}).encode()
    elif kind.bad:
        return _bad(rng, family, headers, body)
    return "/v1/chat/completions", headers, json.dumps(body).encode()


def _bad(rng: random.Random, family: str, headers: dict[str, str],
         body: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    flaw = rng.randrange(4)
    if flaw == 0:
        return "/v1/chat/completions", headers, b'{"model": "' + family.encode() + b'", "messages": ['
    if flaw == 1:
        body["model"] = "no-such-model"
    elif flaw == 2:
        headers["X-Deadline-Ms"] = "soon"
    else:
        body["max_tokens"] = -5
    return "/v1/chat/completions", headers, json.dumps(body).encode()


async def send(client: httpx.AsyncClient, kind: Kind, request_id: str, path: str, headers: dict[str, str],
               body: bytes) -> Sent:
    headers = {**headers, "X-Request-Id": request_id}
    try:
        if kind.stream:
            return await _send_stream(client, kind, request_id, path, headers, body)
        response = await client.post(path, headers=headers, content=body, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Sent(request_id, kind.name, "lost", None, f"{type(exc).__name__}: {exc}")
    except ValueError as exc:  # an event that is not JSON
        return Sent(request_id, kind.name, "error", 200, f"bad event: {exc}")
    return Sent(request_id, kind.name, judge_status(kind, response.status_code, response.content),
                response.status_code, response.text[:200] if response.status_code != 200 else "")


def judge_status(kind: Kind, status: int, content: bytes) -> Outcome:
    if kind.bad:
        return "rejected" if 400 <= status < 500 and status != 429 else "error"
    if status in (429, 503):
        return "refused"
    if status != 200:
        return "error"
    try:
        reply = json.loads(content)
    except json.JSONDecodeError:
        return "error"
    return "ok" if reply.get("choices") else "error"


async def _send_stream(client: httpx.AsyncClient, kind: Kind, request_id: str, path: str,
                       headers: dict[str, str], body: bytes) -> Sent:
    async with client.stream("POST", path, headers=headers, content=body, timeout=TIMEOUT_S) as response:
        if response.status_code != 200:
            content = await response.aread()
            return Sent(request_id, kind.name, judge_status(kind, response.status_code, content),
                        response.status_code, content[:200].decode(errors="replace"))
        outcome: Outcome | None = None
        detail = ""
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return Sent(request_id, kind.name, outcome or "ok", 200, detail)
            event = json.loads(data)
            if "error" in event:
                code = event["error"].get("code")
                outcome, detail = ("refused" if code in REFUSAL_CODES else "error"), str(event["error"])[:200]
            elif kind.leave_after_first_piece and _has_text(event):
                return Sent(request_id, kind.name, "disconnected", 200)  # leaving closes the connection
        return Sent(request_id, kind.name, "lost", 200, "the stream ended without [DONE]")


def _has_text(event: dict[str, Any]) -> bool:
    choices = event.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))
