"""A local GGUF variant: its Decoder (weights and llama.cpp context) and its lane in the loop.

`submit` hands a job to the stepping loop (runtime.stepper), which decodes it in a batch with
the variant's other sequences; the returned `Generation` streams its text. Loading and
unloading run in a worker thread; the prompt side (chat template, tokenizer) is here too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from edgeserve.config import VariantConfig
from edgeserve.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelPreparationError,
    NotReadyError,
)
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.decoder import Decoder
from edgeserve.runtime.faults import fault_marker
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.sequence import GenerationJob
from edgeserve.runtime.speculative import SpeculativeDecoder
from edgeserve.runtime.stepper import Stepper


class LlamaRunner:
    """A loaded GGUF variant and its place in the stepping loop."""

    def __init__(self, variant_id: str, path: Path, config: VariantConfig, stepper: Stepper) -> None:
        self.variant_id = variant_id
        self.path = path
        self.config = config
        self.stepper = stepper
        self.loaded = False
        self.load_ms: float | None = None
        self.unload_ms: float | None = None
        self.profile: CostProfile | None = None  # kept current by its LocalVariant (prefill deadline checks)
        # sequence ids its context holds beyond `parallel`: the places of speculative pairs it
        # drafts or verifies for (runtime.pair_runner)
        self.extra_sequences = 0
        self._decoder: Decoder | SpeculativeDecoder | None = None
        self._formatter: Any = None
        # After `unload`, a vocabulary-only Llama (no weights, a few MB) keeps tokenize() working,
        # so admission can count and shape prompts of a variant that is not resident. The lock
        # keeps a tokenize() in another thread off a model being freed.
        self._vocab: Any = None
        self._swap_lock = threading.Lock()
        self._fault_marker = fault_marker()  # tests only (see runtime.faults); None in service

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def parallel(self) -> int:
        return self.config.parallel

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def files(self) -> list[Path]:
        """The GGUF files its costs depend on (calibration keys its profile by their hashes)."""
        return [self.path]

    @property
    def decoder(self) -> Decoder | None:
        """Its llama.cpp context while loaded (a speculative pair composes two of them)."""
        return self._decoder if isinstance(self._decoder, Decoder) else None

    @property
    def usable(self) -> bool:
        """Loaded, or unloaded after a first load: its prompts can be tokenized either way."""
        return self.loaded or self._vocab is not None

    @property
    def generating(self) -> bool:
        return self.loaded and self.stepper.busy(self.variant_id)

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    async def unload(self) -> None:
        """Free the weights but stay usable: a later `load()` brings them back (unlike `close`)."""
        await asyncio.to_thread(self._unload)

    def _load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._decoder is not None:
            return
        started = time.perf_counter()
        try:
            decoder = Decoder(self.path, n_ctx=self.config.n_ctx, n_threads=self.config.threads,
                              parallel=self.config.parallel, n_seq_max=self.config.parallel + self.extra_sequences,
                              n_batch=max(self.config.n_batch, self.stepper.chunk_tokens + self.config.parallel),
                              use_mlock=self.config.use_mlock)
        except (ValueError, RuntimeError) as exc:
            raise ModelPreparationError(f"variant {self.variant_id}: cannot load {self.path}: {exc}") from exc
        except ModelPreparationError as exc:
            raise ModelPreparationError(f"variant {self.variant_id}: {exc.message}") from exc
        template = self.config.chat_template or decoder.chat_template
        if not template:
            decoder.close()
            raise ModelPreparationError(
                f"variant {self.variant_id}: {self.path} has no chat template in its metadata; "
                "set `chat_template` for this variant in models.toml"
            )
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=decoder.token_text(decoder.eos_token),
                                              bos_token=decoder.token_text(decoder.bos_token))
        with self._swap_lock:
            self._decoder = decoder
            self.stepper.attach(self.variant_id, decoder, self.config.parallel, lambda: self.profile)
            self.load_ms = (time.perf_counter() - started) * 1000
            self.loaded = True

    def _unload(self) -> None:
        from llama_cpp import Llama

        if self._decoder is None:
            return
        started = time.perf_counter()
        if self._vocab is None:
            self._vocab = Llama(model_path=str(self.path), vocab_only=True, n_ctx=64, verbose=False)
        with self._swap_lock:
            self.stepper.detach(self.variant_id)
            decoder, self._decoder = self._decoder, None
            self.loaded = False
        decoder.close()
        self.unload_ms = (time.perf_counter() - started) * 1000

    # ---- prompts ---------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The exact prompt text the model sees for these messages (its chat template)."""
        if self._formatter is None:
            raise NotReadyError(f"{self.variant_id} is not loaded yet")
        try:
            return str(self._formatter(messages=messages).prompt)
        except Exception as exc:  # jinja raise_exception in templates, e.g. role order rules
            raise InvalidRequestError(
                f"the chat template of {self.variant_id} rejected the messages: {exc}", param="messages"
            ) from exc

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Chat prompts carry their own special tokens; raw completions get a BOS like llama.cpp."""
        with self._swap_lock:
            if self._decoder is not None:
                return self._decoder.tokenize(text, add_special=not chat, parse_special=chat)
            if self._vocab is None:
                raise NotReadyError(f"{self.variant_id} is not loaded yet")
            tokens: list[int] = self._vocab.tokenize(text.encode("utf-8"), add_bos=not chat, special=chat)
            return tokens

    def check_fits(self, prompt_n: int, param: str = "messages") -> None:
        if prompt_n + 1 > self.n_ctx:
            raise ContextLengthExceededError(prompt_n, self.n_ctx, self.variant_id, param)

    # ---- generation ------------------------------------------------------------------------

    def reserve(self, job: GenerationJob) -> int:
        """Count an admitted job on the loop's board until it is submitted (see Stepper.reserve)."""
        return self.stepper.reserve(self.variant_id, job)

    def release(self, reservation: int | None) -> None:
        self.stepper.release(reservation)

    def submit(self, job: GenerationJob, *, min_run_ms: float = 0.0, reservation: int | None = None) -> Generation:
        """Queue a job in the stepping loop; iterate the generation for its text, or await
        `generation.joined` for the moment it takes a place in the batch. ``reservation``: the
        key `reserve` gave the job at admission."""
        decoder = self._decoder
        if decoder is None:  # evicted: the residency manager loads a variant before starting it
            raise NotReadyError(f"{self.variant_id} is not loaded")
        generation = Generation(asyncio.get_running_loop())
        fail = self._fault_marker is not None and self._fault_marker in b"".join(
            decoder.token_piece(t) for t in job.prompt_tokens).decode("utf-8", "replace")
        self.stepper.submit(self.variant_id, job, generation, min_run_s=min_run_ms / 1000,
                            fail_after_first=fail, reservation=reservation)
        return generation

    def close(self) -> None:
        with self._swap_lock:
            if self._decoder is not None:
                self.stepper.detach(self.variant_id)
                self._decoder.close()
                self._decoder = None
                self.loaded = False
            if self._vocab is not None:
                self._vocab.close()
                self._vocab = None
