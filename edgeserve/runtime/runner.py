"""One llama.cpp context per variant, driven by its own thread.

`submit` returns a `Generation`: an async iterator of text pieces fed from the variant's thread.
llama.cpp releases the GIL while decoding, so the event loop stays free. The token loop checks
the cancel flag before every decode step, so a cancelled generation stops within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from edgeserve.config import VariantConfig
from edgeserve.errors import (
    ContextLengthExceededError,
    GenerationFailedError,
    ModelPreparationError,
)
from edgeserve.runtime.faults import InjectedFault, fault_marker
from edgeserve.runtime.gguf_check import diagnose
from edgeserve.runtime.stops import StopMatcher

Finish = Literal["stop", "length", "deadline", "cancelled"]

# Time kept after the last token for detokenizing, the final chunk and the write to the client.
# 10 ms was too little when the client shares a busy core: a load test saw a response finished
# 11.3 ms before its deadline arrive 0.4 ms after it.
TAIL_RESERVE_S = 0.025


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


@dataclass(frozen=True)
class GenerationJob:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # calibration and benchmarks need a fixed number of tokens
    deadline_at: float | None = None  # time.perf_counter() by which the last token must be out
    forcing: AnswerForcing | None = None


@dataclass(frozen=True)
class AnswerForcing:
    """When only `reserve` tokens of the budget are left and `marker` has not appeared, feed
    `prefix` (for example "\\nFinal answer: \\boxed{") so the model closes an answer in time."""

    prefix_tokens: tuple[int, ...]
    prefix_text: str
    reserve: int
    marker: str = "\\boxed{"


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


class Generation:
    """A running generation. Iterate for text pieces; `result` is set once iteration ends.

    Pieces are handed to the event loop at most once per `flush_interval_s` (the first one at
    once): each hand-off wakes the loop, whose thread then competes with llama.cpp's for the
    board's few cores. 25 ms of batching is invisible to a reader and cuts wake-ups several-fold.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, flush_interval_s: float = 0.025) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | GenerationResult | BaseException] = asyncio.Queue()
        self._cancel = threading.Event()
        self._pending: list[str] = []
        self._flush_interval_s = flush_interval_s
        self._last_flush = -math.inf
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit_text(self, piece: str) -> None:
        """Called from the variant's thread for every piece of text."""
        self._pending.append(piece)
        now = time.perf_counter()
        if now - self._last_flush >= self._flush_interval_s:
            self._flush(now)

    def _emit_end(self, item: GenerationResult | BaseException) -> None:
        """Called from the variant's thread once: the text still pending, then the outcome."""
        self._flush(time.perf_counter())
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _flush(self, now: float) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._loop.call_soon_threadsafe(self._queue.put_nowait, text)
        self._last_flush = now

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, GenerationResult):
                self.result = item
                return
            else:
                raise GenerationFailedError(f"generation failed: {item}") from item

    async def text(self) -> str:
        return "".join([piece async for piece in self])


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading prompt tokens llama-cpp-python will reuse from the KV cache."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)


def forcing_depth(forcing: AnswerForcing | None) -> int:
    """Braces the forced prefix leaves open (1 for "\\boxed{")."""
    if forcing is None:
        return 0
    return max(0, forcing.prefix_text.count("{") - forcing.prefix_text.count("}"))


def _until_closed(text: str, depth: int) -> tuple[str, int]:
    """Cut `text` where `depth` open braces close; returns the kept text and the depth left."""
    for i, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[: i + 1], 0
    return text, depth


def _next_token_s(token_ms: list[float]) -> float:
    """What the next token will likely cost: the slowest of the last few, so a deadline is
    not overrun by a token that takes a little longer than the one before."""
    recent = token_ms[-4:]
    return (max(recent) if recent else 0.0) / 1000


class LlamaRunner:
    """A loaded GGUF variant and the one thread that touches its context."""

    def __init__(self, variant_id: str, path: Path, config: VariantConfig) -> None:
        self.variant_id = variant_id
        self.path = path
        self.config = config
        self.loaded = False
        self.load_ms: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"runner-{variant_id}")
        self._llm: Any = None
        self._formatter: Any = None
        # Residency (issue 7): after `unload`, a vocabulary-only Llama (no weights, a few MB)
        # keeps tokenize() working, so admission can count and shape prompts of a variant that
        # is not resident. The lock keeps a tokenize() in another thread off a model being freed.
        self._vocab: Any = None
        self._swap_lock = threading.Lock()
        self._active = 0  # generations submitted and not finished: such a variant is not evicted
        self.unload_ms: float | None = None
        self._fault_marker = fault_marker()  # tests only (see runtime.faults); None in service

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    async def load(self) -> None:
        await asyncio.wrap_future(self._executor.submit(self._load))

    @property
    def usable(self) -> bool:
        """Loaded, or unloaded after a first load: its prompts can be tokenized either way."""
        return self.loaded or self._vocab is not None

    @property
    def generating(self) -> bool:
        return self._active > 0

    async def unload(self) -> None:
        """Free the weights but stay usable: a later `load()` brings them back (unlike `close`).
        Runs on the variant's thread, so it never overlaps a generation of this variant."""
        await asyncio.wrap_future(self._executor.submit(self._unload))

    def _unload(self) -> None:
        from llama_cpp import Llama

        if self._llm is None:
            return
        started = time.perf_counter()
        if self._vocab is None:
            self._vocab = Llama(model_path=str(self.path), vocab_only=True, n_ctx=64, verbose=False)
        with self._swap_lock:
            llm, self._llm = self._llm, None
            self.loaded = False
        llm.close()
        self.unload_ms = (time.perf_counter() - started) * 1000

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._llm is not None:
            return
        started = time.perf_counter()
        try:
            llm = Llama(
                model_path=str(self.path),
                n_ctx=self.config.n_ctx,
                n_batch=self.config.n_batch,
                n_threads=self.config.threads,
                n_threads_batch=self.config.threads,
                use_mlock=self.config.use_mlock,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            # llama.cpp could not read the file (say why), or failed later (its context: say that)
            detail = diagnose(self.path) if str(exc).startswith("Failed to load model") else str(exc)
            raise ModelPreparationError(f"variant {self.variant_id}: cannot load {self.path}: {detail}") from exc
        template = self.config.chat_template or llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelPreparationError(
                f"variant {self.variant_id}: {self.path} has no chat template in its metadata; "
                "set `chat_template` for this variant in models.toml"
            )
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )
        with self._swap_lock:
            self._llm = llm
            self.load_ms = (time.perf_counter() - started) * 1000
            self.loaded = True

    # ---- prompts ---------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The exact prompt text the model sees for these messages (its chat template)."""
        try:
            return str(self._formatter(messages=messages).prompt)
        except Exception as exc:  # jinja raise_exception in templates, e.g. role order rules
            from edgeserve.errors import InvalidRequestError

            raise InvalidRequestError(
                f"the chat template of {self.variant_id} rejected the messages: {exc}", param="messages"
            ) from exc

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Chat prompts carry their own special tokens; raw completions get a BOS like llama.cpp."""
        with self._swap_lock:
            model = self._llm if self._llm is not None else self._vocab
            if model is None:
                from edgeserve.errors import NotReadyError

                raise NotReadyError(f"{self.variant_id} is not loaded yet")
            tokens: list[int] = model.tokenize(text.encode("utf-8"), add_bos=not chat, special=chat)
        return tokens

    def check_fits(self, prompt_n: int, param: str = "messages") -> None:
        if prompt_n + 1 > self.n_ctx:
            raise ContextLengthExceededError(prompt_n, self.n_ctx, self.variant_id, param)

    # ---- generation ------------------------------------------------------------------------

    def submit(self, job: GenerationJob, on_done: Callable[[], object] | None = None) -> Generation:
        """Queue a job on this variant's thread; `on_done` runs (in that thread) when it ends."""
        generation = Generation(asyncio.get_running_loop())
        with self._swap_lock:
            self._active += 1
        try:
            future = self._executor.submit(self._generate, job, generation)
        except BaseException:
            with self._swap_lock:
                self._active -= 1
            raise
        if on_done is not None:
            future.add_done_callback(lambda _: on_done())
        return generation

    def _generate(self, job: GenerationJob, generation: Generation) -> None:
        outcome: GenerationResult | BaseException
        try:
            outcome = self._token_loop(job, generation)
        except BaseException as exc:
            outcome = exc
        with self._swap_lock:  # before the end is reported: whoever sees it sees us idle
            self._active -= 1
        generation._emit_end(outcome)

    def _token_loop(self, job: GenerationJob, generation: Generation) -> GenerationResult:
        import llama_cpp

        llm, s = self._llm, job.sampling
        if llm is None:  # evicted: the residency manager loads a variant before starting it
            raise GenerationFailedError(f"{self.variant_id} is not loaded")
        llm.set_seed(s.seed if s.seed is not None else random.getrandbits(32))
        max_tokens = min(job.max_tokens, self.n_ctx - len(job.prompt_tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(list(job.stop))
        vocab = llm._model.vocab
        started = last = time.perf_counter()
        prompt_ms = 0.0
        token_ms: list[float] = []
        n_generated = 0
        finish: Finish = "length"
        if generation.cancelled:
            return GenerationResult("cancelled", len(job.prompt_tokens), 0.0, 0, 0.0)
        cached = _common_prefix(llm.input_ids[: llm.n_tokens].tolist(), job.prompt_tokens)
        context = list(job.prompt_tokens)
        fail = self._fault_marker is not None and self._fault_marker in llm.detokenize(
            job.prompt_tokens).decode("utf-8", "replace")

        def generate_from(context: list[int]) -> Generator[int, None, None]:
            return cast(Generator[int, None, None], llm.generate(
                context,
                top_k=s.top_k,
                top_p=s.top_p,
                min_p=s.min_p,
                temp=s.temperature,
                repeat_penalty=s.repeat_penalty,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
            ))

        tokens = generate_from(context)
        forcing, window = job.forcing, ""
        restart = False
        open_braces = 0  # after forcing: the answer is complete when the \\boxed{ closes
        token = next(tokens, None)
        while token is not None:
            now = time.perf_counter()
            if last == started:
                prompt_ms = (now - started) * 1000  # prefill + first sample
            else:
                token_ms.append((now - last) * 1000)
            last = now
            if not job.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            n_generated += 1
            context.append(token)
            text = decoder.decode(llm.detokenize([token]))
            if open_braces:
                text, open_braces = _until_closed(text, open_braces)
                if not open_braces:
                    finish = "stop"
            if forcing is not None:
                window = (window + text)[-64:]
                if forcing.marker in window:
                    forcing = None
                elif max_tokens - n_generated - len(forcing.prefix_tokens) <= forcing.reserve:
                    # Feeding tokens into a running llama-cpp-python generator needs logits for
                    # every position; instead restart from the extended context, which reuses
                    # the whole KV cache and evaluates only the prefix.
                    context.extend(forcing.prefix_tokens)
                    text += forcing.prefix_text
                    n_generated += len(forcing.prefix_tokens)
                    forcing, restart = None, True
                    open_braces = forcing_depth(job.forcing)
            piece = stops.feed(text)
            if piece:
                generation._emit_text(piece)
            if fail:
                tokens.close()
                raise InjectedFault(f"injected fault after the first token ({self.variant_id})")
            if stops.stopped or finish == "stop":
                finish = "stop"
                break
            if n_generated >= max_tokens:
                break
            if job.deadline_at is not None and now + _next_token_s(token_ms) + TAIL_RESERVE_S > job.deadline_at:
                finish = "deadline"
                break
            if generation.cancelled:
                finish = "cancelled"
                break
            if restart:
                tokens.close()
                tokens, restart = generate_from(context), False
            token = next(tokens, None)
        tokens.close()
        # bytes of an unfinished character go through the stop matcher too: after a stop, none
        tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
        if tail and finish != "cancelled":
            generation._emit_text(tail)
        return GenerationResult(
            finish=finish,
            prompt_n=len(job.prompt_tokens),
            prompt_ms=prompt_ms,
            predicted_n=n_generated,
            predicted_ms=sum(token_ms),
            token_ms=token_ms,
            prompt_evaluated=max(1, len(job.prompt_tokens) - cached),
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self.loaded = False
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None
