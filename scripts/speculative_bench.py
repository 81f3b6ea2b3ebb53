"""Speculative pairs against their plain target, measured in the real stepping loop (issue 15).

The same greedy chat prompts (GSM8K questions) are answered by the plain target and by its
speculative pair at each draft length, interleaved round by round, alone (one request at a time)
and with `--concurrency` requests at once sharing the batch. For each configuration: decode rate
(completion tokens over the wall time of the round), acceptance (accepted over drafted tokens),
tokens per verify step, and how many answers equal the plain target's byte for byte: in the same
round at the same concurrency ("same text"), and answering one request at a time ("as alone").
Ratios are per round (pair over plain, measured minutes apart); medians and the spread over
rounds are printed.

    .venv/bin/python scripts/speculative_bench.py TARGET.gguf DRAFT.gguf --questions test.jsonl \\
        [--limit 8] [--max-tokens 128] [--draft-lengths 2,3,4,6] [--concurrency 1,4] [--rounds 3] [--adaptive]

One process, one stepping loop (one llama.cpp decode at a time), 2 threads per model.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.config import VariantConfig
from edgeserve.runtime.pair_runner import PairRunner
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.runtime.sequence import GenerationJob, SamplingParams
from edgeserve.runtime.stepper import Stepper
from edgeserve.tools.eval.dataset import load_problems

GREEDY = SamplingParams(temperature=0.0)
INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."


@dataclass
class Tally:
    rates: list[float] = field(default_factory=list)  # tokens/s per round
    ratios: list[float] = field(default_factory=list)  # over the plain target's, per round
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    verify_steps: int = 0
    same: int = 0  # answers equal to the plain target's in the same round (same concurrency)
    alone: int = 0  # answers equal to the plain target's one request at a time
    answers: int = 0


async def answer_all(runner: LlamaRunner, prompts: list[list[int]], max_tokens: int,
                     concurrency: int) -> tuple[list[str], float, int, int, int]:
    """Every prompt answered, `concurrency` at a time: texts, wall seconds, tokens, drafted, accepted."""
    texts: list[str] = [""] * len(prompts)
    tokens = drafted = accepted = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        batch = list(range(first, min(first + concurrency, len(prompts))))
        generations = [runner.submit(GenerationJob(prompts[i], max_tokens, GREEDY)) for i in batch]
        for i, text in zip(batch, await asyncio.gather(*(g.text() for g in generations)), strict=True):
            texts[i] = text
        for generation in generations:
            result = generation.result
            assert result is not None
            tokens += result.predicted_n
            drafted += result.drafted_n
            accepted += result.accepted_n
    return texts, time.perf_counter() - started, tokens, drafted, accepted


async def run(args: argparse.Namespace) -> None:
    lengths = [int(k) for k in args.draft_lengths.split(",")]
    widths = [int(c) for c in args.concurrency.split(",")]
    parallel = max(widths)
    questions = [problem.question for problem in load_problems(args.questions, args.limit)]
    stepper = Stepper(chunk_tokens=64)
    config = VariantConfig(name="target", path=str(args.target), n_ctx=args.n_ctx, parallel=parallel,
                           n_threads=args.threads)
    target = LlamaRunner("bench:target", args.target, config, stepper)
    draft = LlamaRunner("bench:draft", args.draft,
                        VariantConfig(name="draft", path=str(args.draft), n_ctx=args.n_ctx, parallel=1,
                                      n_threads=args.threads), stepper)
    pairs: dict[str, PairRunner] = {}
    configs = [(f"k={k}", k, False) for k in lengths]
    if args.adaptive:
        configs.append((f"k<={max(lengths)} adaptive", max(lengths), True))
    for name, k, adaptive in configs:
        target.config = VariantConfig(name="target", path=str(args.target), n_ctx=args.n_ctx, parallel=parallel,
                                      n_threads=args.threads, draft="draft", draft_max=k, draft_adaptive=adaptive)
        pairs[name] = PairRunner(f"bench:target+draft-{len(pairs)}", target, draft)
    target.config = config
    await target.load()
    await draft.load()
    for pair in pairs.values():
        await pair.load()
    prompts = [target.tokenize(target.render_chat([{"role": "user", "content": f"{q}\n\n{INSTRUCTION}"}]),
                               chat=True) for q in questions]
    print(f"{len(prompts)} prompts, max_tokens {args.max_tokens}, greedy; target {args.target.name}, "
          f"draft {args.draft.name}; {args.rounds} rounds, configurations interleaved in each")
    alone_texts = (await answer_all(target, prompts, args.max_tokens, 1))[0]
    for width in widths:
        tallies = {"plain": Tally(), **{name: Tally() for name in pairs}}
        for _ in range(args.rounds):
            texts, seconds, tokens, _, _ = await answer_all(target, prompts, args.max_tokens, width)
            plain_rate = tokens / seconds
            tallies["plain"].rates.append(plain_rate)
            tallies["plain"].ratios.append(1.0)
            tallies["plain"].alone += sum(a == b for a, b in zip(texts, alone_texts, strict=True))
            tallies["plain"].answers += len(texts)
            for name, pair in pairs.items():
                got, seconds, n, drafted, accepted = await answer_all(pair, prompts, args.max_tokens, width)
                tally = tallies[name]
                tally.rates.append(n / seconds)
                tally.ratios.append(n / seconds / plain_rate)
                tally.drafted += drafted
                tally.accepted += accepted
                tally.tokens += n
                tally.verify_steps += n - accepted
                tally.same += sum(a == b for a, b in zip(got, texts, strict=True))
                tally.alone += sum(a == b for a, b in zip(got, alone_texts, strict=True))
                tally.answers += len(got)
        print(f"\n{width} request(s) at a time:")
        print(f"{'config':>16s} {'tok/s (median)':>15s} {'vs plain (median, range)':>26s} {'acceptance':>11s} "
              f"{'tokens/step':>12s} {'same text':>10s} {'as alone':>9s}")
        for name, t in tallies.items():
            spread = f"{statistics.median(t.ratios):.2f}x ({min(t.ratios):.2f}-{max(t.ratios):.2f})"
            acceptance = f"{t.accepted / t.drafted:.1%}" if t.drafted else "-"
            per_step = f"{t.tokens / max(t.verify_steps, 1):.2f}" if t.drafted else "1.00"
            same = f"{t.same}/{t.answers}" if t.drafted else "-"
            print(f"{name:>16s} {statistics.median(t.rates):15.1f} {spread:>26s} {acceptance:>11s} {per_step:>12s} "
                  f"{same:>10s} {t.alone:>4d}/{t.answers}")
    stepper.close()
    for runner in [*pairs.values(), draft, target]:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("draft", type=Path)
    parser.add_argument("--questions", type=Path, required=True, help="GSM8K-style JSONL (a `question` per line)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-lengths", default="2,3,4,6")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--adaptive", action="store_true",
                        help="also an adaptive pair (draft_adaptive) at the longest draft length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
