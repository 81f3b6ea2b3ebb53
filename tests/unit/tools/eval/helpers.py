"""Records for tests, with every field a test does not care about filled in."""

from __future__ import annotations

from typing import Any

from edgeserve.tools.eval.records import AnswerRecord


def record(**fields: Any) -> AnswerRecord:
    base: dict[str, Any] = {
        "index": 0, "mode": "deadline", "policy": "routed", "model": "fam", "deadline_ms": 1000,
        "style": "boxed", "hint": True, "budget": None, "status": "ok", "gold": "18",
        "variant": "fam:q4_1", "completion_tokens": 10, "decode_ms": 100.0, "actual_ms": 500.0,
        "latency_ms": 510.0, "finish": "stop", "budget_tokens": 50,
    }
    base.update(fields)
    return AnswerRecord(**base)
