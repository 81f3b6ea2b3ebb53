"""edgeserve/runtime/decoder.py on the real SmolLM2 Q8_0 file: sequences decoded together in one
batch give exactly the greedy tokens each gives alone; freeing, chunked prefill and prefix copies
leave them unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgeserve.runtime.decoder import BatchEntry, DecodeError, Decoder, GrammarError
from edgeserve.runtime.prepare import PreparedVariant
from edgeserve.runtime.sequence import GenerationJob, SamplingParams, Sequence

pytestmark = pytest.mark.integration

VARIANT = "smollm2-135m:q8_0"
GREEDY = SamplingParams(temperature=0.0)
N_CTX = 512
PARALLEL = 4
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer briefly.",
]
SYSTEM = "You are a careful assistant. Think step by step, then give the final answer in \\boxed{}."


@pytest.fixture(scope="module", params=[False, True], ids=["split", "unified"])
def decoder(prepared: dict[str, PreparedVariant], request: pytest.FixtureRequest) -> Iterator[Decoder]:
    """Both KV layouts: one stream per sequence, or one pool shared by all."""
    with Decoder(prepared[VARIANT].path, n_ctx=N_CTX, n_threads=2, parallel=PARALLEL, n_batch=256,
                 kv_unified=request.param) as decoder:
        yield decoder


def chat(decoder: Decoder, user: str, system: str | None = None) -> list[int]:
    assert decoder.chat_template
    formatter = Jinja2ChatFormatter(
        template=decoder.chat_template,
        eos_token=decoder.token_text(decoder.eos_token),
        bos_token=decoder.token_text(decoder.bos_token),
    )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return decoder.tokenize(formatter(messages=messages).prompt, add_special=False, parse_special=True)


def alone(decoder: Decoder, prompt: list[int], n_tokens: int, seq_id: int = 0,
          sampling: SamplingParams = GREEDY) -> list[int]:
    """The plain way: the whole prompt in one step, then one token per step, nothing else in the batch."""
    decoder.new_sequence(seq_id, sampling)
    tokens = [decoder.step([BatchEntry(seq_id, prompt, 0)])[seq_id][0]]
    while len(tokens) < n_tokens:
        pos = len(prompt) + len(tokens) - 1
        tokens.append(decoder.step([BatchEntry(seq_id, [tokens[-1]], pos)])[seq_id][0])
    decoder.free_sequence(seq_id)
    return tokens


def entry(seq_id: int, seq: Sequence, limit: int | None = None) -> BatchEntry:
    step = seq.take_input(limit)
    return BatchEntry(seq_id, step.tokens, step.pos, step.logits)


def together(decoder: Decoder, prompts: list[list[int]], n_tokens: int, *, chunk: int | None = None,
             free_after: dict[int, int] | None = None) -> tuple[list[list[int]], list[int]]:
    """The stepping loop's shape: each step decodes one token of every running sequence plus at
    most one prefill chunk of one newcomer. Sequence i is freed after `free_after[i]` steps.
    Returns each sequence's tokens and the batch width of every step."""
    seqs = [Sequence(GenerationJob(p, n_tokens, GREEDY, ignore_eos=True), decoder.n_ctx) for p in prompts]
    for seq_id in range(len(prompts)):
        decoder.new_sequence(seq_id, GREEDY)
    outputs: list[list[int]] = [[] for _ in prompts]
    widths: list[int] = []
    steps = 0
    while not all(seq.finished for seq in seqs):
        now = time.perf_counter()
        running = [i for i, seq in enumerate(seqs) if seq.before_step(now)]
        entries = [entry(i, seqs[i]) for i in running if not seqs[i].prefilling]
        newcomer = next((i for i in running if seqs[i].prefilling), None)
        if newcomer is not None:
            entries.append(entry(newcomer, seqs[newcomer], chunk))
        sampled = decoder.step(entries)
        widths.append(len(entries))
        now = time.perf_counter()
        for seq_id, (token,) in sampled.items():
            outputs[seq_id].append(token)
            seqs[seq_id].on_token(token, decoder.token_piece(token), eog=decoder.is_eog(token), now=now,
                                  batch=len(entries))
        steps += 1
        for seq_id, after in (free_after or {}).items():
            if steps == after:
                seqs[seq_id].end("cancelled")
                decoder.free_sequence(seq_id)
                assert decoder.n_past(seq_id) == 0
    for seq_id in range(len(prompts)):
        decoder.free_sequence(seq_id)
    return outputs, widths


def test_four_sequences_decoded_together_give_the_tokens_each_gives_alone(decoder: Decoder) -> None:
    prompts = [chat(decoder, q) for q in QUESTIONS]
    expected = [alone(decoder, p, 48) for p in prompts]
    assert len({tuple(e) for e in expected}) == 4
    got, widths = together(decoder, prompts, 48)
    assert got == expected
    assert widths[:4] == [1, 2, 3, 4]  # prefills staggered, one per step, beside the running ones
    assert max(widths) == 4


def test_a_sequence_freed_midway_leaves_the_others_unchanged(decoder: Decoder) -> None:
    prompts = [chat(decoder, q) for q in QUESTIONS[:3]]
    expected = [alone(decoder, p, 32) for p in prompts]
    got, _ = together(decoder, prompts, 32, free_after={1: 12})
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == expected[1][: len(got[1])] and len(got[1]) < 32


def test_chunked_prefill_beside_a_running_stream_gives_the_same_continuation(decoder: Decoder) -> None:
    short = chat(decoder, QUESTIONS[0])
    long = chat(decoder, " ".join(QUESTIONS) + " Answer each question in one sentence.", SYSTEM)
    assert len(long) > 64
    expected = [alone(decoder, short, 24), alone(decoder, long, 24)]
    got, widths = together(decoder, [short, long], 24, chunk=16)
    assert got == expected
    # each prompt took several 16-token chunks; the long one's ran beside the short stream's tokens
    short_chunks, long_chunks = -(-len(short) // 16), -(-len(long) // 16)
    assert widths[: short_chunks + long_chunks] == [1] * short_chunks + [2] * long_chunks


def test_a_copied_prefix_gives_the_same_tokens_as_evaluating_the_prompt_whole(decoder: Decoder) -> None:
    first, second = chat(decoder, QUESTIONS[0], SYSTEM), chat(decoder, QUESTIONS[2], SYSTEM)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > 20
    expected = alone(decoder, second, 24)

    decoder.new_sequence(0, GREEDY)
    decoder.step([BatchEntry(0, first, 0)])
    decoder.new_sequence(1, GREEDY)
    decoder.copy_prefix(0, 1, shared)
    assert decoder.n_past(1) == shared
    decoder.free_sequence(0)  # the shared cells stay with sequence 1
    tokens = [decoder.step([BatchEntry(1, second[shared:], shared)])[1][0]]
    while len(tokens) < 24:
        tokens.append(decoder.step([BatchEntry(1, [tokens[-1]], len(second) + len(tokens) - 1)])[1][0])
    decoder.free_sequence(1)
    assert tokens == expected


def test_one_pass_over_an_answer_predicts_each_of_its_greedy_tokens(decoder: Decoder) -> None:
    """greedy_after_each: the prompt and a greedy answer read in one pass give, after each
    position, the token greedy decoding chose there (the verify step of speculative decoding);
    an input longer than n_batch is read in several steps."""
    prompt = chat(decoder, QUESTIONS[3], SYSTEM)
    answer = alone(decoder, prompt, 24)
    decoder.new_sequence(0, GREEDY)
    best = decoder.greedy_after_each(0, prompt + answer[:-1], 0)
    assert len(best) == len(prompt) + len(answer) - 1 and decoder.n_past(0) == len(best)
    assert best[len(prompt) - 1:] == answer
    decoder.free_sequence(0)

    long_input = (prompt * (decoder.n_batch // len(prompt) + 2))[:decoder.n_batch + 40]
    decoder.new_sequence(0, GREEDY)
    assert len(decoder.greedy_after_each(0, long_input, 0)) == decoder.n_batch + 40
    assert decoder.n_past(0) == decoder.n_batch + 40
    decoder.free_sequence(0)
    with pytest.raises(KeyError, match="not started"):  # freed: no sequence to read into
        decoder.greedy_after_each(0, prompt, 0)


def test_seeded_sampling_repeats_and_the_chain_is_per_sequence(decoder: Decoder) -> None:
    warm = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=7, repeat_penalty=1.1)
    prompt = chat(decoder, QUESTIONS[1])
    assert alone(decoder, prompt, 16, sampling=warm) == alone(decoder, prompt, 16, seq_id=2, sampling=warm)


def test_a_batch_that_skips_positions_is_refused(decoder: Decoder) -> None:
    prompt = chat(decoder, QUESTIONS[0])
    decoder.new_sequence(0, GREEDY)
    decoder.step([BatchEntry(0, prompt, 0)])
    with pytest.raises(DecodeError):
        decoder.step([BatchEntry(0, [prompt[0]], len(prompt) + 5)])
    with pytest.raises(KeyError):
        decoder.step([BatchEntry(3, [prompt[0]], 0)])
    with pytest.raises(ValueError):
        decoder.copy_prefix(0, 1, len(prompt) + 1)  # more than sequence 0 holds
    decoder.free_sequence(0)


def test_vocabulary(decoder: Decoder) -> None:
    assert decoder.token_text(decoder.eos_token) == "<|im_end|>"
    assert decoder.is_eog(decoder.eos_token) and not decoder.is_eog(decoder.tokenize("a", add_special=False,
                                                                                       parse_special=False)[0])
    tokens = decoder.tokenize("café €", add_special=False, parse_special=False)
    assert b"".join(decoder.token_piece(t) for t in tokens).decode() == "café €"
    assert decoder.token_piece(decoder.eos_token) == b""
    assert decoder.token_piece(decoder.eos_token, special=True) == b"<|im_end|>"


def test_a_sequence_id_reused_for_a_prompt_with_the_same_prefix_keeps_that_prefix(decoder: Decoder) -> None:
    first, second = chat(decoder, QUESTIONS[0], SYSTEM), chat(decoder, QUESTIONS[3], SYSTEM)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    expected = alone(decoder, second, 16)

    decoder.new_sequence(0, GREEDY)
    decoder.step([BatchEntry(0, first, 0)])
    decoder.free_sequence(0, keep_kv=True)  # the request ended; its KV stays for the next one
    assert decoder.n_past(0) == len(first)
    with pytest.raises(ValueError):
        decoder.new_sequence(0, GREEDY, keep=len(first) + 1)
    decoder.new_sequence(0, GREEDY, keep=shared)
    assert decoder.n_past(0) == shared
    tokens = [decoder.step([BatchEntry(0, second[shared:], shared)])[0][0]]
    while len(tokens) < 16:
        tokens.append(decoder.step([BatchEntry(0, [tokens[-1]], len(second) + len(tokens) - 1)])[0][0])
    decoder.free_sequence(0)
    assert decoder.n_past(0) == 0
    assert tokens == expected


def test_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    from edgeserve.runtime.decoder import _logprobs_of

    logits = np.array([1.0, 3.0, 2.0, 0.0], dtype=np.float32)
    expected = logits - np.log(np.exp(logits).sum())
    chosen, top = _logprobs_of(logits, 2, 2)
    assert chosen == pytest.approx(expected[2])
    assert [t for t, _ in top] == [1, 2] and [v for _, v in top] == pytest.approx([expected[1], expected[2]])
    assert _logprobs_of(logits, 0, 0)[1] == [] and len(_logprobs_of(logits, 0, 9)[1]) == 4


def test_a_grammar_llama_cpp_cannot_parse_is_a_grammar_error(decoder: Decoder) -> None:
    with pytest.raises(GrammarError):
        decoder.new_sequence(0, SamplingParams(temperature=0.0, grammar='root ::= ("unclosed'))
    decoder.new_sequence(0, SamplingParams(temperature=0.0, grammar='root ::= "yes" | "no"'))
    decoder.free_sequence(0)
