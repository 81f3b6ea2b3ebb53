"""The domain request: what a client asked for, after the wire format and the headers are parsed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeserve.runtime.sequence import SamplingParams


@dataclass(frozen=True)
class InferenceRequest:
    """One chat (`messages`) or text (`prompt`) completion, as the domain sees it."""

    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    deadline_ms: int | None = None
    hint: bool | None = None  # None: the policy's default, when the budget means something
    style: str | None = None  # a prompt style of the family's policy (boxed, aav), `auto`, or none
    answer_forcing: Literal["on", "off", "auto"] | None = None  # None: the policy's setting
    structured: bool = False  # response_format json_object / json_schema: JSON under a grammar, closed if cut short
    schema: dict[str, Any] | None = None  # json_schema's schema (None: any JSON object)
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def deadline_at(self) -> float | None:
        return None if self.deadline_ms is None else self.arrived + self.deadline_ms / 1000

    @property
    def param(self) -> str:
        """The body field an error about the prompt names."""
        return "messages" if self.messages is not None else "prompt"
