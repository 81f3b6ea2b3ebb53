"""One variant's llama.cpp model and context over llama-cpp-python's low-level bindings.

A step is one `llama_decode` of one batch: at most one prefill chunk of a sequence plus the next
token of every decoding sequence (the shape of llama-server's `update_slots`). Each sequence has
its own id in the context's KV cache and its own sampler chain. Only the stepping loop's thread
may call a `Decoder` (llama.cpp contexts are not thread-safe); `tokenize`, `token_piece`,
`is_eog` and `token_text` only read the vocabulary and may be called from any thread.

Sizing: every sequence can hold the variant's full `n_ctx` (keeping it within `n_ctx` is the
caller's job: runtime.sequence caps its max tokens by it). Two layouts, as llama-server's
`--kv-unified`:
- split (default): one stream of `n_ctx` cells per sequence id (`n_ctx × n_seq_max` cells).
  Each token attends only to its own sequence's cells, so a wide batch with long contexts
  stays cheap. llama.cpp copies KV between streams only whole (a partial `llama_memory_seq_cp`
  across streams is a GGML_ASSERT that aborts the process), so `copy_prefix` copies the
  source's stream and cuts the copy back to the prefix: a memory copy of one stream, far
  cheaper than recomputing the prefix.
- unified: one pool of `n_ctx × parallel` cells shared by every sequence (llama-server's
  `--kv-unified-per-slot`; llama.cpp then warns when the pool exceeds the training context).
  `copy_prefix` only tags cells with a second sequence id (no copy, no extra memory), but every
  token's attention spans the cells of all sequences (masked), which costs more as the batch
  and the contexts grow.

Native allocations: the `llama_batch` once at load (reused by every step; one sequence id per
token), a sampler chain per request (freed exactly once: by the next `new_sequence` of its id,
`free_sequence` or `close`). A step allocates nothing native. `close()` must be called.
"""

from __future__ import annotations

import ctypes
import logging
import random
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from edgeserve.errors import ModelPreparationError
from edgeserve.runtime.gguf_check import diagnose
from edgeserve.runtime.sequence import SamplingParams

PENALTY_LAST_N = 64  # llama-cpp-python's Llama default (last_n_tokens_size)
MAX_UBATCH = 512


class DecodeError(RuntimeError):
    """llama_decode failed (1: no room in the KV cache for the batch; -1: an invalid batch)."""

    def __init__(self, code: int, n_tokens: int) -> None:
        reason = {1: "no free KV cache cells for the batch", 2: "aborted", -1: "invalid batch"}
        super().__init__(f"llama_decode of {n_tokens} tokens failed ({code}: {reason.get(code, 'fatal error')})")
        self.code = code


class GrammarError(ValueError):
    """llama.cpp could not parse a sequence's grammar (SamplingParams.grammar)."""


@dataclass(frozen=True)
class BatchEntry:
    """`tokens` of sequence `seq_id` at positions pos, pos + 1, ...; `logits`: sample a token
    after the last of them (with that sequence's sampler chain). `verify`: instead, the most
    likely token after EACH of them (the check of drafted tokens in speculative decoding).
    `draft_limit`: how many tokens a speculative decoder may draft after this entry (the
    sequence's tokens left less the one this step samples); a plain decoder ignores it."""

    seq_id: int
    tokens: Seq[int]
    pos: int
    logits: bool = True
    verify: bool = False
    draft_limit: int = 0


def _logprobs_of(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax of raw logits: the token's value and the `top` largest, largest first."""
    row = logits.astype(np.float64)
    peak = row.max()
    log_sum = peak + np.log(np.exp(row - peak).sum())
    best = np.argpartition(-row, top)[:top] if 0 < top < row.size else np.arange(row.size if top else 0)
    best = best[np.argsort(-row[best], kind="stable")]
    return float(row[token] - log_sum), [(int(i), float(row[i] - log_sum)) for i in best]


class Decoder:
    """A loaded GGUF file, one llama.cpp context for up to `n_seq_max` sequences."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_threads: int,
        parallel: int = 1,
        n_batch: int = 512,
        use_mlock: bool = False,
        n_seq_max: int | None = None,
        kv_unified: bool = False,
        verbose: bool = False,
    ) -> None:
        if parallel < 1 or n_ctx < 1 or n_batch < 1:
            raise ValueError("n_ctx, parallel and n_batch must be positive")
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        llama_cpp.llama_backend_init()
        self.path = path
        self.n_ctx = n_ctx  # per sequence
        self.parallel = parallel
        self.n_seq_max = max(parallel, n_seq_max or parallel)
        self.n_batch = n_batch  # tokens one step can hold
        self.kv_unified = kv_unified
        self._samplers: dict[int, Any] = {}
        self._pieces: dict[tuple[int, bool], bytes] = {}  # at most 2 × the vocabulary
        self._eog: dict[int, bool] = {}
        self._rows: dict[int, tuple[int, int]] = {}  # of the last step: seq_id → (first logits row, rows)
        self._top_logprobs: dict[int, int] = {}  # sequences that want log-probabilities: how many top ones
        self._logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}  # of the last step
        self._closed = False

        model_params = llama_cpp.llama_model_default_params()
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else llama_cpp.LLAMA_LOAD_MODE_MMAP
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ModelPreparationError(f"cannot load {path}: {diagnose(path)}")

        params = llama_cpp.llama_context_default_params()
        # split streams: n_ctx per sequence id (llama.cpp divides the total by n_seq_max)
        params.n_ctx = n_ctx * (parallel if kv_unified else self.n_seq_max)
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, MAX_UBATCH)
        params.n_seq_max = self.n_seq_max
        params.kv_unified = kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelPreparationError(f"cannot create a context of {n_ctx} × {parallel} tokens for {path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

        self.bos_token: int = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_token: int = llama_cpp.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.chat_template: str | None = self._meta("tokenizer.chat_template")

    # ---- vocabulary ------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def token_text(self, token: int) -> str:
        """The vocabulary's text of a token ("" for -1): BOS/EOS texts for chat templates."""
        if token < 0:
            return ""
        text: bytes | None = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return (text or b"").decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """`add_special`: a BOS if the model wants one (raw completions); `parse_special`: read
        "<|im_start|>" and the like as special tokens (rendered chat prompts)."""
        data = text.encode("utf-8")
        size = len(data) + 2
        while True:
            tokens = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, size, add_special, parse_special)
            if n >= 0:
                return list(tokens[:n])
            size = -n

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """A token's bytes (part of a UTF-8 character, maybe); control tokens are b"" unless `special`.

        Remembered per token (the vocabulary never changes): the stepping loop asks for every
        sampled token, and each ctypes call gives up the GIL and may wait for the event loop's
        thread to hand it back."""
        piece = self._pieces.get((token, special))
        if piece is None:
            piece = self._pieces[(token, special)] = self._token_piece(token, special)
        return piece

    def _token_piece(self, token: int, special: bool) -> bytes:
        size = 32
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    # ---- sequences -------------------------------------------------------------------------

    def new_sequence(self, seq_id: int, sampling: SamplingParams, *, keep: int = 0) -> None:
        """Give `seq_id` a fresh sampler chain; of the KV it held, keep positions 0..keep-1
        (a new prompt that starts like the previous one of this id) and drop the rest."""
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence id {seq_id} is outside 0..{self.n_seq_max - 1}")
        if not 0 <= keep <= self.n_past(seq_id):
            raise ValueError(f"sequence {seq_id} holds {self.n_past(seq_id)} positions, cannot keep {keep}")
        self.free_sequence(seq_id, keep_kv=True)  # the sampler of its previous request, if any
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1)
        self._samplers[seq_id] = self._sampler_chain(sampling)
        if sampling.logprobs is not None:
            self._top_logprobs[seq_id] = sampling.logprobs

    def free_sequence(self, seq_id: int, *, keep_kv: bool = False) -> None:
        """Drop the sequence's sampler chain and KV cells (cells shared with another sequence
        stay that one's); `keep_kv` keeps the cells for a later prompt with the same prefix.
        Freeing an unknown or already freed sequence does nothing."""
        if not keep_kv:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        sampler = self._samplers.pop(seq_id, None)
        if sampler is not None:
            llama_cpp.llama_sampler_free(sampler)
        self._top_logprobs.pop(seq_id, None)

    def copy_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        """Give `dst` the KV of `src`'s positions 0..n_tokens-1; `dst` then continues at
        position n_tokens. Whatever `dst` held before is dropped (its sampler stays)."""
        if not 0 < n_tokens <= self.n_past(src):
            raise ValueError(f"sequence {src} holds {self.n_past(src)} positions, not {n_tokens}")
        llama_cpp.llama_memory_seq_rm(self._memory, dst, -1, -1)
        if self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self._memory, src, dst, 0, n_tokens)
        else:  # across streams only whole copies are allowed (the data moves at the next decode)
            llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._memory, dst, n_tokens, -1)

    def accept(self, seq_id: int, tokens: Iterable[int]) -> None:
        """Tell a sequence's sampler about tokens fed without sampling (a forced prefix), so
        repetition penalties see them. Sampled tokens are accepted by `step` itself."""
        sampler = self._samplers[seq_id]
        for token in tokens:
            llama_cpp.llama_sampler_accept(sampler, token)

    def n_past(self, seq_id: int) -> int:
        """How many positions the sequence holds in the KV cache (largest position + 1)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id)) + 1

    def _sampler_chain(self, s: SamplingParams) -> Any:
        """The chain llama-cpp-python's Llama builds (`_init_sampler`): penalties, then greedy
        (temperature <= 0) or top-k, top-p, min-p, temperature and a seeded draw. Neutral
        penalties and typical-p = 1 are left out: llama.cpp skips them anyway."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        links = []
        if s.grammar is not None:  # first: only tokens the grammar allows reach the others
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise GrammarError("llama.cpp cannot parse the grammar made for it")
            links.append(grammar)
        if s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0:
            links.append(llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            links.append(llama_cpp.llama_sampler_init_greedy())
        else:
            links += [
                llama_cpp.llama_sampler_init_top_k(s.top_k),
                llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
                llama_cpp.llama_sampler_init_min_p(s.min_p, 1),
                llama_cpp.llama_sampler_init_temp(s.temperature),
                llama_cpp.llama_sampler_init_dist(s.seed if s.seed is not None else random.getrandbits(32)),
            ]
        for link in links:
            llama_cpp.llama_sampler_chain_add(chain, link)  # the chain owns and frees its links
        return chain

    # ---- the step --------------------------------------------------------------------------

    def step(self, entries: Seq[BatchEntry]) -> dict[int, list[int]]:
        """Evaluate every entry in one llama_decode; returns, for each entry that wanted logits,
        its sequence's sampled token ([token]) or, for a `verify` entry, the greedy token after
        each of its tokens. Each sequence appears at most once, and its tokens must continue
        exactly where its KV cache ends (llama.cpp checks positions)."""
        batch = self._batch
        outputs: list[tuple[BatchEntry, int]] = []  # (entry, index of its first token in the batch)
        seen: set[int] = set()
        n = 0
        for entry in entries:
            if entry.seq_id not in self._samplers:
                raise KeyError(f"sequence {entry.seq_id} was not started with new_sequence")
            if not entry.tokens:
                raise ValueError(f"an entry of sequence {entry.seq_id} has no tokens")
            if entry.seq_id in seen:
                raise ValueError(f"sequence {entry.seq_id} appears twice in one step")
            seen.add(entry.seq_id)
            if n + len(entry.tokens) > self.n_batch:
                raise ValueError(f"the step holds more than n_batch = {self.n_batch} tokens")
            first = n
            for offset, token in enumerate(entry.tokens):
                batch.token[n] = token
                batch.pos[n] = entry.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = entry.seq_id
                batch.logits[n] = entry.verify
                n += 1
            if entry.logits or entry.verify:
                batch.logits[n - 1] = 1
                outputs.append((entry, first))
        if n == 0:
            return {}
        batch.n_tokens = n
        self._rows = {}
        self._logprobs = {}
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            raise DecodeError(code, n)
        out: dict[int, list[int]] = {}
        for entry, first in outputs:
            last = first + len(entry.tokens) - 1
            self._rows[entry.seq_id] = (first, len(entry.tokens)) if entry.verify else (last, 1)
            if entry.verify:
                out[entry.seq_id] = [self._argmax(first + i) for i in range(len(entry.tokens))]
            else:
                token = int(llama_cpp.llama_sampler_sample(self._samplers[entry.seq_id], self._ctx, last))
                out[entry.seq_id] = [token]
                top = self._top_logprobs.get(entry.seq_id)
                if top is not None:
                    self._logprobs[entry.seq_id] = _logprobs_of(self._logits_row(last), token, top)
        return out

    def logprobs(self, seq_id: int) -> tuple[float, list[tuple[int, float]]] | None:
        """The last step's sampled token's log-probability and the `logprobs` most likely tokens
        with theirs, for a sequence that asked for them (its SamplingParams.logprobs)."""
        return self._logprobs.get(seq_id)

    def _argmax(self, index: int) -> int:
        return int(self._logits_row(index).argmax())

    def _logits_row(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,))

    def logits_of(self, seq_id: int) -> np.ndarray:
        """A copy of the raw logits the last step computed for the sequence: one row for a
        sampled entry, one per token for a `verify` entry (speculative sampling needs the
        distributions, not only the chosen tokens). KeyError if it wanted none."""
        first, rows = self._rows[seq_id]
        return np.stack([self._logits_row(first + i).copy() for i in range(rows)])

    def greedy_after_each(self, seq_id: int, tokens: Seq[int], pos: int) -> list[int]:
        """Evaluate `tokens` of a started sequence at positions pos, pos + 1, ... (in steps of at
        most n_batch tokens) with logits after every one; returns the most likely next token
        after each: what greedy decoding would choose at each point. Its sampler is left alone.
        How a draft variant's agreement with its target is measured (scripts/draft_acceptance.py)."""
        best: list[int] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            best += self.step([BatchEntry(seq_id, chunk, pos + start, verify=True)])[seq_id]
        return best

    def keep(self, seq_id: int, n_tokens: int) -> None:
        """Cut the sequence's KV back to positions 0..n_tokens-1 (drafted tokens the target
        rejected, or accepted ones its rules did not use)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n_tokens, -1)

    def drafted(self, seq_id: int) -> int:
        """Tokens drafted for the sequence in the last step: none, a plain decoder drafts nothing."""
        return 0

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Free every sampler, the batch, the context and the model (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        for sampler in self._samplers.values():
            llama_cpp.llama_sampler_free(sampler)
        self._samplers.clear()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
