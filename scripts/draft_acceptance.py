"""How often a draft variant predicts its target's next token (issue 15, measured before the
speculative runtime exists): the target answers each prompt greedily; the draft then reads the
prompt and that answer in one pass (`Decoder.greedy_after_each`) and its most likely next token
is compared with the target's at every position. From those agreements follow, exactly for
greedy decoding, the tokens each verify step of speculative decoding would keep at draft length
k (the run of agreeing drafts, up to k, plus the target's own token) and, with the step costs
measured here, the decode rate it would reach against the plain target's.

    .venv/bin/python scripts/draft_acceptance.py DRAFT.gguf TARGET.gguf --questions test.jsonl \\
        [--limit 6] [--max-tokens 160] [--draft-lengths 2,3,4,6]

One model process, 2 threads; both files are loaded into it one after the other (never two
llama.cpp processes on these cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgeserve.runtime.decoder import BatchEntry, Decoder
from edgeserve.runtime.sequence import SamplingParams
from edgeserve.tools.eval.dataset import load_problems

GREEDY = SamplingParams(temperature=0.0)
INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."


def chat_tokens(decoder: Decoder, question: str) -> list[int]:
    assert decoder.chat_template
    formatter = Jinja2ChatFormatter(template=decoder.chat_template, eos_token=decoder.token_text(decoder.eos_token),
                                    bos_token=decoder.token_text(decoder.bos_token))
    prompt = formatter(messages=[{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]).prompt
    return decoder.tokenize(prompt, add_special=False, parse_special=True)


def answer(decoder: Decoder, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """The greedy answer (up to an end-of-generation token) and the median decode step in ms."""
    decoder.new_sequence(0, GREEDY)
    tokens = [decoder.step([BatchEntry(0, prompt, 0)])[0][0]]
    steps = []
    while len(tokens) < max_tokens and not decoder.is_eog(tokens[-1]):
        started = time.perf_counter()
        tokens.append(decoder.step([BatchEntry(0, [tokens[-1]], len(prompt) + len(tokens) - 1)])[0][0])
        steps.append((time.perf_counter() - started) * 1000)
    decoder.free_sequence(0)
    return tokens, statistics.median(steps) if steps else 0.0


def agreement(decoder: Decoder, prompt: list[int], target: list[int]) -> list[bool]:
    """Whether the draft's most likely next token equals the target's, at each answer position."""
    decoder.new_sequence(0, GREEDY)
    best = decoder.greedy_after_each(0, prompt + target[:-1], 0)
    decoder.free_sequence(0)
    return [b == t for b, t in zip(best[len(prompt) - 1:], target, strict=True)]


def tokens_per_verify(agrees: list[bool], k: int) -> tuple[int, int]:
    """(verify steps, tokens) of greedy speculative decoding at draft length k over one answer."""
    steps = position = 0
    while position < len(agrees):
        run = 0
        while run < k and position + run < len(agrees) and agrees[position + run]:
            run += 1
        position += min(run + 1, len(agrees) - position)  # the agreeing drafts and the target's own token
        steps += 1
    return steps, len(agrees)


def verify_ms(decoder: Decoder, prompt: list[int], n_tokens: int, rounds: int = 9) -> float:
    """The median time of one target pass over n_tokens (a verify step of k + 1 tokens)."""
    times = []
    for _ in range(rounds):
        decoder.new_sequence(0, GREEDY)
        decoder.step([BatchEntry(0, prompt, 0)])
        started = time.perf_counter()
        decoder.greedy_after_each(0, prompt[:n_tokens], len(prompt))
        times.append((time.perf_counter() - started) * 1000)
        decoder.free_sequence(0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draft", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--questions", type=Path, required=True, help="GSM8K-style JSONL (a `question` per line)")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--draft-lengths", default="2,3,4,6")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(k) for k in args.draft_lengths.split(",")]
    questions = [problem.question for problem in load_problems(args.questions, args.limit)]

    with Decoder(args.target, n_ctx=2048, n_threads=args.threads) as target:
        prompts = [chat_tokens(target, q) for q in questions]
        answers, target_ms = zip(*(answer(target, p, args.max_tokens) for p in prompts), strict=True)
        verify = {k: verify_ms(target, prompts[0], k + 1) for k in lengths}
    with Decoder(args.draft, n_ctx=2048, n_threads=args.threads) as draft:
        agrees = [agreement(draft, p, a) for p, a in zip(prompts, answers, strict=True)]
        draft_ms = statistics.median(answer(draft, p, 48)[1] for p in prompts)

    flat = [a for run in agrees for a in run]
    plain_ms = statistics.median(target_ms)
    print(f"{len(questions)} prompts, {len(flat)} target tokens: the draft predicts the target's next token "
          f"{sum(flat) / len(flat):.1%} of the time")
    print(f"decode step: target {plain_ms:.2f} ms, draft {draft_ms:.2f} ms ({draft_ms / plain_ms:.2f}x)")
    print(f"{'k':>3s} {'tokens/verify':>14s} {'verify ms':>10s} {'ms/token':>9s} {'vs plain target':>16s}")
    for k in lengths:
        steps, tokens = map(sum, zip(*(tokens_per_verify(a, k) for a in agrees), strict=True))
        per_step = tokens / steps
        # each verify step: up to k draft steps (the drafts after a disagreement are not needed,
        # but a drafter does not know that in advance) and one target pass over k + 1 tokens
        ms_per_token = (k * draft_ms + verify[k]) / per_step
        print(f"{k:3d} {per_step:14.2f} {verify[k]:10.2f} {ms_per_token:9.2f} {plain_ms / ms_per_token:15.2f}x")


if __name__ == "__main__":
    main()
