"""Speculative decoding: a draft variant proposes tokens, its target checks them in one pass.

`SpeculativeDecoder` puts two loaded decoders of one family (say Q2_K drafting for Q8_0) behind
the stepping loop's decoder contract, so a speculative pair is one more lane of the loop with
places, a batch and a cost profile of its own. Its sequences live in both contexts, on
sequence ids past the ones each variant uses for its own requests (the runners size their
contexts for them).

A step of the pair, for every decoding sequence at temperature 0:
1. the draft catches up with what the target holds (the prompt the first time; after that the
   tokens it did not feed itself), then proposes up to `draft_max` tokens greedily, one batched
   draft step per token for all sequences together;
2. the target evaluates the last token and the drafts in ONE decode with logits after each
   (`BatchEntry.verify`), in the same batch as everything else of the step;
3. the longest run of drafts that equal the target's own greedy choice is kept, plus the
   target's token after it; the target's KV is cut back past the first disagreement
   (`llama_memory_seq_rm`), and the draft's is cut the next time it catches up.

So the text is the target's own greedy text, token for token. A request that samples
(temperature > 0) gets its drafts drawn from the draft's distribution q and each accepted with
probability min(1, p/q) against the target's p, a rejected one replaced from the residual
(runtime.speculative_sampling): its text is distributed exactly as the target's own sampling.
Requests with repetition penalties (their distribution depends on the history the chain
keeps) are decoded by the target alone in this lane, one token per step.

The draft never proposes more than the sequence's tokens left (`BatchEntry.draft_limit`), nor
more than fit the target's batch, and stops at an end-of-generation token.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Sequence as Seq

import numpy as np

from edgeserve.runtime.decoder import BatchEntry, Decoder
from edgeserve.runtime.sequence import SamplingParams, common_prefix
from edgeserve.runtime.speculative_sampling import accept_drafted, draw, probabilities

GREEDY = SamplingParams(temperature=0.0)


def lossless_greedy(sampling: SamplingParams) -> bool:
    """Whether the target's choice is the argmax of its logits (greedy, no penalties): what the
    verify pass checks drafts against."""
    return (sampling.temperature <= 0 and sampling.repeat_penalty == 1.0
            and sampling.presence_penalty == 0.0 and sampling.frequency_penalty == 0.0)


def speculable(sampling: SamplingParams) -> bool:
    """Whether drafts can be checked without changing the output distribution: any sampling
    without repetition penalties (greedy by argmax, sampling by the rejection rule). A request
    that wants log-probabilities or follows a grammar is decoded by the target alone too."""
    return (sampling.repeat_penalty == 1.0 and sampling.presence_penalty == 0.0
            and sampling.frequency_penalty == 0.0 and sampling.logprobs is None and sampling.grammar is None)


class SpeculativeDecoder:
    """A target and a draft decoder as one decoder of the stepping loop (see the module doc).

    Sequence `i` of the pair is sequence `target_first + i` of the target's context and
    `draft_first + i` of the draft's."""

    def __init__(self, target: Decoder, draft: Decoder, *, parallel: int, target_first: int,
                 draft_first: int, draft_max: int, adaptive: bool = False) -> None:
        if draft_max < 1:
            raise ValueError("draft_max must be at least 1")
        if target_first + parallel > target.n_seq_max or draft_first + parallel > draft.n_seq_max:
            raise ValueError("the target's and the draft's contexts need room for the pair's sequences")
        if draft.n_ctx < target.n_ctx:
            raise ValueError(f"the draft's n_ctx ({draft.n_ctx}) is smaller than its target's ({target.n_ctx})")
        self.target = target
        self.draft = draft
        self.parallel = parallel
        self.draft_max = draft_max
        # adaptive: each sequence drafts `_length[seq]` tokens, +2 after a step that accepted all
        # of them, -1 after one that did not (Hugging Face's assisted-generation schedule), so
        # text the draft predicts poorly costs fewer wasted draft steps
        self.adaptive = adaptive
        self._length: dict[int, int] = {}
        self._target_first = target_first
        self._draft_first = draft_first
        self._held: dict[int, list[int]] = {}  # what the target's KV holds, per pair sequence
        self._draft_held: dict[int, list[int]] = {}  # what the draft's KV holds
        self._sampling: dict[int, SamplingParams] = {}  # of sequences that may speculate
        self._rng: dict[int, np.random.Generator] = {}  # sampled sequences: draws and acceptance
        self._drafted: dict[int, int] = {}  # in the last step

    # ---- what the loop reads -------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.target.n_ctx

    @property
    def n_batch(self) -> int:
        return self.target.n_batch

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        return self.target.token_piece(token, special=special)

    def is_eog(self, token: int) -> bool:
        return self.target.is_eog(token)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self.target.tokenize(text, add_special=add_special, parse_special=parse_special)

    def drafted(self, seq_id: int) -> int:
        return self._drafted.get(seq_id, 0)

    def logprobs(self, seq_id: int) -> tuple[float, list[tuple[int, float]]] | None:
        return self.target.logprobs(self._t(seq_id))

    def close(self) -> None:
        """Nothing of its own to free: the two decoders belong to their variants' runners."""

    # ---- sequences -----------------------------------------------------------------------------

    def _t(self, seq_id: int) -> int:
        if not 0 <= seq_id < self.parallel:
            raise ValueError(f"sequence id {seq_id} is outside 0..{self.parallel - 1}")
        return self._target_first + seq_id

    def _d(self, seq_id: int) -> int:
        return self._draft_first + seq_id

    def new_sequence(self, seq_id: int, sampling: SamplingParams, *, keep: int = 0) -> None:
        self.target.new_sequence(self._t(seq_id), sampling, keep=keep)
        held = self._held.setdefault(seq_id, [])
        del held[keep:]
        draft_held = self._draft_held.setdefault(seq_id, [])
        del draft_held[common_prefix(draft_held, held):]
        self.draft.new_sequence(self._d(seq_id), GREEDY, keep=len(draft_held))
        self._sampling.pop(seq_id, None)
        self._rng.pop(seq_id, None)
        self._length[seq_id] = self.draft_max
        if speculable(sampling):
            self._sampling[seq_id] = sampling
            if not lossless_greedy(sampling):
                seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
                self._rng[seq_id] = np.random.default_rng(seed)

    def free_sequence(self, seq_id: int) -> None:
        self.target.free_sequence(self._t(seq_id))
        self.draft.free_sequence(self._d(seq_id))
        self._held.pop(seq_id, None)
        self._draft_held.pop(seq_id, None)

    def copy_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        self.target.copy_prefix(self._t(src), self._t(dst), n_tokens)
        self._held[dst] = self._held.get(src, [])[:n_tokens]
        src_draft = self._draft_held.get(src, [])
        n_draft = common_prefix(src_draft, self._held[dst])
        if n_draft > 0:
            self.draft.copy_prefix(self._d(src), self._d(dst), n_draft)
        else:
            self.draft.keep(self._d(dst), 0)
        self._draft_held[dst] = src_draft[:n_draft]

    def accept(self, seq_id: int, tokens: Iterable[int]) -> None:
        self.target.accept(self._t(seq_id), tokens)

    def keep(self, seq_id: int, n_tokens: int) -> None:
        self.target.keep(self._t(seq_id), n_tokens)
        del self._held[seq_id][n_tokens:]

    # ---- the step ------------------------------------------------------------------------------

    def step(self, entries: Seq[BatchEntry]) -> dict[int, list[int]]:
        """The loop's step: drafts for the decoding greedy sequences, then one target decode of
        every entry (verify entries for those); returns each sequence's tokens to emit."""
        self._drafted = {}
        for entry in entries:
            held = self._held[entry.seq_id]
            del held[entry.pos:]
            held.extend(entry.tokens)
        drafts, draft_probs = self._draft(self._draft_lengths(entries))
        self._follow([e for e in entries if len(e.tokens) > 1 and e.seq_id not in drafts])
        target_entries = []
        for entry in entries:
            drafted = drafts.get(entry.seq_id)
            if drafted:
                target_entries.append(BatchEntry(self._t(entry.seq_id), (*entry.tokens, *drafted), entry.pos,
                                                 verify=True))
            else:
                target_entries.append(BatchEntry(self._t(entry.seq_id), entry.tokens, entry.pos, entry.logits))
        out = self.target.step(target_entries)
        result: dict[int, list[int]] = {}
        for entry in entries:
            got = out.get(self._t(entry.seq_id))
            if got is None:
                continue
            drafted = drafts.get(entry.seq_id)
            if not drafted:
                result[entry.seq_id] = got
                continue
            rng = self._rng.get(entry.seq_id)
            if rng is None:
                tokens = got[: common_prefix(drafted, got) + 1]
            else:
                params = self._sampling[entry.seq_id]
                target_probs = np.stack([probabilities(row, params)
                                         for row in self.target.logits_of(self._t(entry.seq_id))])
                tokens = accept_drafted(target_probs, np.stack(draft_probs[entry.seq_id]), drafted, rng)
            n = len(tokens) - 1
            if self.adaptive:
                length = self._length[entry.seq_id] + (2 if n == len(drafted) else -1)
                self._length[entry.seq_id] = max(1, min(self.draft_max, length))
            self.keep(entry.seq_id, entry.pos + 1 + n)  # the last token and the accepted drafts
            self._held[entry.seq_id].extend(drafted[:n])
            self._drafted[entry.seq_id] = len(drafted)
            result[entry.seq_id] = tokens
        return result

    def _draft_lengths(self, entries: Seq[BatchEntry]) -> dict[int, int]:
        """How many tokens to draft per decoding sequence: `draft_max` (adaptive: its own
        length), at most its tokens left, and no more than the target's batch has room for
        beside the step's other tokens."""
        speculating = [e for e in entries if e.logits and not e.verify and len(e.tokens) == 1
                       and e.draft_limit > 0 and e.seq_id in self._sampling]
        if not speculating:
            return {}
        spare = self.target.n_batch - sum(len(e.tokens) for e in entries)
        share = spare // len(speculating)
        return {e.seq_id: n for e in speculating
                if (n := min(self._length.get(e.seq_id, self.draft_max), e.draft_limit, share)) > 0}

    def _follow(self, chunks: list[BatchEntry]) -> None:
        """Feed the draft the prompt chunks (and forced prefixes) the target evaluates in this
        step, so its catch-up cost lands in the prefill, not in the first speculative step."""
        entries = []
        for entry in chunks:
            if entry.seq_id not in self._sampling:
                continue
            draft_held = self._draft_held[entry.seq_id]
            n = common_prefix(draft_held, self._held[entry.seq_id][: entry.pos])
            if n < len(draft_held):
                self.draft.keep(self._d(entry.seq_id), n)
                del draft_held[n:]
            if n == entry.pos:  # else it is further behind: the next draft catches it up
                entries.append(BatchEntry(self._d(entry.seq_id), entry.tokens, entry.pos, logits=False))
                draft_held.extend(entry.tokens)
        for entry in entries:  # rarely more than one: the loop evaluates one chunk per step
            self.draft.step([entry])

    def _draft(self, lengths: dict[int, int]) -> tuple[dict[int, list[int]], dict[int, list[np.ndarray]]]:
        """Up to `lengths[seq]` draft tokens after each sequence's last token, and for sampled
        sequences the distribution each was drawn from. The first draft step also feeds what the
        draft's KV lacks (the prompt, accepted tokens it did not feed itself); each later one
        feeds one token per sequence."""
        probs: dict[int, list[np.ndarray]] = {}
        if not lengths:
            return {}, probs
        draft = self.draft
        room = max(1, draft.n_batch // len(lengths))
        first: list[BatchEntry] = []
        for seq_id in lengths:
            held, draft_held = self._held[seq_id], self._draft_held[seq_id]
            n = common_prefix(draft_held, held[:-1])
            if n < len(draft_held):
                draft.keep(self._d(seq_id), n)
                del draft_held[n:]
            missing = held[n:]
            while len(missing) > room:  # a long catch-up (the prompt) goes in chunks first
                chunk, missing = missing[:room], missing[room:]
                draft.step([BatchEntry(self._d(seq_id), chunk, len(draft_held), logits=False)])
                draft_held.extend(chunk)
            first.append(BatchEntry(self._d(seq_id), missing, len(draft_held)))
            draft_held.extend(missing)
        out = draft.step(first)
        drafts = {s: [self._drawn(s, out[self._d(s)][0], probs)] for s in lengths}
        while going := [s for s in lengths if len(drafts[s]) < lengths[s] and not draft.is_eog(drafts[s][-1])]:
            out = draft.step([BatchEntry(self._d(s), [drafts[s][-1]], len(self._draft_held[s])) for s in going])
            for seq_id in going:
                self._draft_held[seq_id].append(drafts[seq_id][-1])
                drafts[seq_id].append(self._drawn(seq_id, out[self._d(seq_id)][0], probs))
        return drafts, probs

    def _drawn(self, seq_id: int, greedy: int, probs: dict[int, list[np.ndarray]]) -> int:
        """The draft's token: its greedy one, or for a sampled sequence one drawn from its
        distribution under the request's sampling (kept for the acceptance rule)."""
        rng = self._rng.get(seq_id)
        if rng is None:
            return greedy
        q = probabilities(self.draft.logits_of(self._d(seq_id))[0], self._sampling[seq_id])
        probs.setdefault(seq_id, []).append(q)
        return draw(q, rng)
