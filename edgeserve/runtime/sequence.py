"""One request's per-token rules, apart from any model: what to feed next, and what a sampled
token means (text, stops, end of generation, max tokens, answer forcing, deadline, cancel, timings).

A `Sequence` never touches llama.cpp and never reads a clock: the stepping loop asks it for its
next input (`take_input`), runs the step, and hands it the sampled token with the token's bytes,
whether it ends generation, and `now` (time.perf_counter() seconds). Before every step the loop
calls `before_step(now)`, which applies the cancel flag and the deadline. Text comes out in
`pieces` (drain them); once `finish` is set, `result()` has the timings.

Inputs are one queue per sequence: first the prompt (less the `cache_n` tokens whose KV was
copied from another sequence), later the last sampled token, followed by the forced prefix when
answer forcing starts. `take_input(limit)` hands out up to `limit` of them at the next positions;
logits are wanted when the queue is empty afterwards (the end of the prompt, or of the prefix).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeserve.runtime.json_closer import closing
from edgeserve.runtime.stops import StopMatcher

Finish = Literal["stop", "length", "deadline", "cancelled"]

# Time kept after the last token for detokenizing, the final chunk and the write to the client.
# 10 ms was too little when the client shares a busy core: a load test saw a response finished
# 11.3 ms before its deadline arrive 0.4 ms after it.
TAIL_RESERVE_S = 0.025

# How many recent step durations the deadline rule looks at (it takes the slowest of them).
RECENT_STEPS = 4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # log-probabilities of each sampled token and of this many most likely ones (None: none)
    logprobs: int | None = None
    grammar: str | None = None  # GBNF the sampled text must follow (llama.cpp's grammar sampler)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (the softmax of its raw logits, before
    temperature and the other sampling filters, as OpenAI reports them) and the `top` most likely
    tokens at that point, most likely first; tokens as their bytes."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class AnswerForcing:
    """When only `reserve` tokens of the budget are left and `marker` has not appeared, feed
    `prefix` (for example "\\nFinal answer: \\boxed{") so the model closes an answer in time.

    Time counts as well as tokens: with a deadline, the prefix is fed as soon as waiting one
    more step would leave too little time to evaluate it (`prefix_s`, predicted from the cost
    profile) and sample `reserve` tokens after it at the pace of the recent steps, so a
    generation that runs slower than predicted still closes its answer before the deadline
    instead of being cut inside it."""

    prefix_tokens: tuple[int, ...]
    prefix_text: str
    reserve: int
    marker: str = "\\boxed{"
    prefix_s: float = 0.0


@dataclass(frozen=True)
class GenerationJob:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # calibration and benchmarks need a fixed number of tokens
    deadline_at: float | None = None  # time.perf_counter() by which the last token must be out
    forcing: AnswerForcing | None = None
    # join the variant's batch only when it holds fewer sequences than this (None: any free
    # place): admission's way to let a newcomer wait instead of slowing requests already running
    join_width: int | None = None
    # a JSON answer (sampled under a JSON grammar): when it ends before the JSON does (max
    # tokens, deadline, a stop string), it is finished with the shortest closing (json_closer)
    structured: bool = False
    schema: dict[str, Any] | None = None  # the JSON schema it follows (None: any JSON object)


@dataclass
class GenerationResult:
    """What happened, with llama-server-style timings (milliseconds)."""

    finish: Finish
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    token_ms: list[float] = field(default_factory=list)
    prompt_evaluated: int = 0  # prompt tokens actually decoded (the rest came from the KV cache)
    cache_n: int = 0  # prompt tokens whose KV was reused
    mean_batch: float = 1.0  # mean batch width of the request's decode steps
    step_ms: float = 0.0  # llama.cpp time of the decode steps it took part in (no waits between them)
    prefill_step_ms: float = 0.0  # llama.cpp time of its prompt chunks (no waits between them)
    queue_ms: float = 0.0  # waiting for a place in its variant's batch
    drafted_n: int = 0  # speculative decoding: tokens the draft proposed
    closed_early: bool = False  # a structured answer cut short and closed into valid JSON
    accepted_n: int = 0  # of which the target agreed with (each saved one target step)


@dataclass(frozen=True)
class StepInput:
    """Tokens to feed at positions pos, pos + 1, ...; `logits`: sample after the last one."""

    tokens: tuple[int, ...]
    pos: int
    logits: bool


def forcing_depth(forcing: AnswerForcing | None) -> int:
    """Braces the forced prefix leaves open (1 for "\\boxed{")."""
    if forcing is None:
        return 0
    return max(0, forcing.prefix_text.count("{") - forcing.prefix_text.count("}"))


def until_closed(text: str, depth: int) -> tuple[str, int]:
    """Cut `text` where `depth` open braces close; returns the kept text and the depth left."""
    for i, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[: i + 1], 0
    return text, depth


def common_prefix(a: Seq[int], b: Seq[int]) -> int:
    """How many leading tokens two token lists share (a cached prompt prefix, or the drafts the
    target would have chosen too)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_prompt(job: GenerationJob, n_ctx: int) -> None:
    """ValueError unless the job's prompt fits a context of `n_ctx` with room for a token."""
    prompt = job.prompt_tokens
    if not prompt:
        raise ValueError("a sequence needs at least one prompt token")
    if len(prompt) >= n_ctx:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in a context of {n_ctx}")


class Sequence:
    """One request being generated. Not thread-safe, except `cancel()` (a flag read before a step)."""

    def __init__(self, job: GenerationJob, n_ctx: int, *, cache_n: int = 0) -> None:
        check_prompt(job, n_ctx)
        prompt = job.prompt_tokens
        self.job = job
        self.max_tokens = min(job.max_tokens, n_ctx - len(prompt))
        # The last prompt token is always evaluated: its logits give the first sampled token.
        self.cache_n = max(0, min(cache_n, len(prompt) - 1))
        self.n_past = self.cache_n  # positions of this sequence already in the KV cache
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # of the tokens sampled since the last drain
        self._emitted: list[str] = []  # every piece so far, for a structured answer's closing
        self.closed_early = False
        self.finish: Finish | None = None
        self.n_generated = 0
        self.prompt_ms = 0.0
        self.token_ms: list[float] = []
        self._step_ms: list[float] = []  # between steps (a speculative step yields several tokens)
        self._pending: list[int] = list(prompt[self.cache_n :])
        self._n_forced = 0  # how many of the pending tokens are the forced prefix (at the end)
        self._cancelled = False
        self._started: float | None = None
        self._last: float | None = None  # when the last token was sampled
        self._widths: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(list(job.stop))
        self._forcing = job.forcing
        self._window = ""  # recent text, to notice the forcing marker across pieces
        self._open_braces = 0  # after forcing: the answer is complete when these close
        if self.max_tokens <= 0:
            self.end("length")

    # ---- state -----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def prefilling(self) -> bool:
        """No token sampled yet: the prompt is (still) being evaluated."""
        return self._last is None

    @property
    def pending(self) -> tuple[int, ...]:
        """Every token to evaluate before the next sample, in order."""
        return tuple(self._pending)

    @property
    def forced(self) -> tuple[int, ...]:
        """The part of `pending` that is a forced answer prefix (fed instead of sampled)."""
        return tuple(self._pending[len(self._pending) - self._n_forced :]) if self._n_forced else ()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """The client left: the sequence ends as "cancelled" before its next step."""
        self._cancelled = True

    def expected_step_s(self, step_s: float | None = None, extra_s: float = 0.0) -> float:
        """What the next step will likely cost: the larger of the caller's prediction `step_s`
        and the slowest of the last few token intervals (they include other variants' steps in
        between; a step a little slower than the one before must not overrun the deadline),
        plus `extra_s`, what rides along in this step that the others did not carry (another
        sequence's prompt chunk)."""
        recent = self._step_ms[-RECENT_STEPS:]
        history = (max(recent) if recent else 0.0) / 1000
        return (history if step_s is None else max(step_s, history)) + extra_s

    def fits(self, now: float, step_s: float | None = None, extra_s: float = 0.0) -> bool:
        """Whether one more step (expected as above) ends in time for the deadline."""
        deadline = self.job.deadline_at
        return deadline is None or now + self.expected_step_s(step_s, extra_s) + TAIL_RESERVE_S <= deadline

    # ---- the step protocol -----------------------------------------------------------------

    def before_step(self, now: float, step_s: float | None = None, extra_s: float = 0.0) -> bool:
        """Call before every step this sequence would take part in; False: it has ended
        (cancelled, or its deadline cannot be met after one more step) and must leave the batch."""
        if self._started is None:
            self._started = now
        if self.finished:
            return False
        if self._cancelled:
            self.end("cancelled")
        elif not self.fits(now, step_s, extra_s):
            self.end("deadline")
        return not self.finished

    def take_input(self, limit: int | None = None) -> StepInput:
        """The next tokens to evaluate (at most `limit`): they count as in the KV cache from now."""
        if self.finished:
            raise RuntimeError("the sequence has finished")
        if not self._pending:
            raise RuntimeError("nothing to evaluate: the sampled token has not been reported")
        n = len(self._pending) if limit is None else max(1, min(limit, len(self._pending)))
        tokens, self._pending = tuple(self._pending[:n]), self._pending[n:]
        self._n_forced = min(self._n_forced, len(self._pending))
        step = StepInput(tokens, self.n_past, logits=not self._pending)
        self.n_past += n
        return step

    def on_token(self, token: int, piece: bytes, *, eog: bool, now: float, batch: int = 1,
                 same_step: bool = False, logprob: TokenLogprob | None = None) -> None:
        """The token sampled after the last input; `piece` its bytes, `eog` whether it ends
        generation, `batch` how many sequences the step decoded. `same_step`: a further token of
        the step that gave the previous one (speculative decoding: an accepted draft, fed
        already): it took no time of its own, and the deadline rule's pace is per step."""
        if self.finished:
            raise RuntimeError("the sequence has finished")
        if self._started is None:
            self._started = now
        if self._last is None:
            self.prompt_ms = (now - self._started) * 1000  # prefill + first sample
        else:
            self.token_ms.append((now - self._last) * 1000)
            self._widths.append(batch)
            if not same_step:
                self._step_ms.append((now - self._last) * 1000)
        self._last = now
        if eog and not self.job.ignore_eos:
            self.end("stop")
            return
        self.n_generated += 1
        if logprob is not None:
            self.logprobs.append(logprob)
        self._pending = [token]
        text = self._utf8.decode(piece)
        closed = False
        if self._open_braces:
            text, self._open_braces = until_closed(text, self._open_braces)
            closed = not self._open_braces
        text = self._maybe_force(text, now)
        released = self._stops.feed(text)
        if released:
            self._emit(released)
        if self._stops.stopped or closed:
            self.end("stop")
        elif self.n_generated >= self.max_tokens:
            self.end("length")

    def _maybe_force(self, text: str, now: float) -> str:
        forcing = self._forcing
        if forcing is None:
            return text
        self._window = (self._window + text)[-64:]
        if forcing.marker in self._window:
            self._forcing = None
        elif (self.max_tokens - self.n_generated - len(forcing.prefix_tokens) <= forcing.reserve
              or self._short_of_time(forcing, now)):
            self._pending.extend(forcing.prefix_tokens)
            self._n_forced = len(forcing.prefix_tokens)
            self.n_generated += len(forcing.prefix_tokens)
            self._forcing = None
            self._open_braces = forcing_depth(forcing)
            text += forcing.prefix_text
        return text

    def _short_of_time(self, forcing: AnswerForcing, now: float) -> bool:
        """Whether, after one more ordinary step, the prefix and `reserve` tokens after it would
        no longer fit before the deadline (at the pace of the recent steps)."""
        deadline = self.job.deadline_at
        if deadline is None:
            return False
        step_s = self.expected_step_s()
        needed = step_s + forcing.prefix_s + step_s * (forcing.reserve + 1) + TAIL_RESERVE_S
        return now + needed > deadline

    def end(self, finish: Finish) -> None:
        """End now (the rules above call it; so may the loop, e.g. "cancelled" on shutdown)."""
        if self.finished:
            return
        self.finish = finish
        self._pending, self._n_forced = [], 0
        # bytes of an unfinished character go through the stop matcher too: after a stop, none
        tail = self._stops.feed(self._utf8.decode(b"", final=True)) + self._stops.flush()
        if tail and finish != "cancelled":
            self._emit(tail)
        if self.job.structured and finish != "cancelled":
            suffix = closing("".join(self._emitted), self.job.schema)
            if suffix:
                self._emit(suffix)
                self.closed_early = True

    def _emit(self, text: str) -> None:
        self.pieces.append(text)
        if self.job.structured:
            self._emitted.append(text)

    # ---- output ----------------------------------------------------------------------------

    def drain(self) -> list[str]:
        """The text pieces produced since the last drain."""
        pieces, self.pieces = self.pieces, []
        return pieces

    def drain_logprobs(self) -> list[TokenLogprob]:
        """The sampled tokens' log-probabilities since the last drain (asked for, else none)."""
        logprobs, self.logprobs = self.logprobs, []
        return logprobs

    def result(self) -> GenerationResult:
        if self.finish is None:
            raise RuntimeError("the sequence has not finished")
        prompt_n = len(self.job.prompt_tokens)
        return GenerationResult(
            finish=self.finish,
            prompt_n=prompt_n,
            prompt_ms=self.prompt_ms,
            predicted_n=self.n_generated,
            predicted_ms=sum(self.token_ms),
            token_ms=list(self.token_ms),
            prompt_evaluated=min(self.n_past, prompt_n) - self.cache_n,
            cache_n=self.cache_n,
            mean_batch=sum(self._widths) / len(self._widths) if self._widths else 1.0,
            closed_early=self.closed_early,
        )
