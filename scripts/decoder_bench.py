"""Decode speed of edgeserve's Decoder alone, no server around it: W sequences prefill a short
prompt each, then decode 200 greedy tokens together, one `Decoder.step` per token (as the
stepping loop does). Prints the median step time and the aggregate tokens/s, twice.

    .venv/bin/python scripts/decoder_bench.py PATH.gguf --width 8 [--parallel 8] [--unified]

Compare with llama.cpp's own `llama-batched-bench -npl W` on the same file (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgeserve.runtime.decoder import BatchEntry, Decoder
from edgeserve.runtime.sequence import SamplingParams

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--width", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--parallel", type=int, default=None, help="places in the context (default: width)")
    parser.add_argument("--unified", action="store_true", help="one KV pool shared by every sequence")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    width = args.width
    with Decoder(args.model, n_ctx=2048, n_threads=args.threads, parallel=args.parallel or width,
                 kv_unified=args.unified) as decoder:
        greedy = SamplingParams(temperature=0)
        prompts = [decoder.tokenize(
            f"<|im_start|>user\nWrite a long story about a lighthouse keeper named {NAMES[i % 8]}.<|im_end|>\n"
            "<|im_start|>assistant\n", add_special=False, parse_special=True) for i in range(width)]
        for _ in range(args.rounds):
            last, pos = {}, {}
            for i, prompt in enumerate(prompts):
                decoder.new_sequence(i, greedy)
                last[i], pos[i] = decoder.step([BatchEntry(i, prompt, 0)])[i][0], len(prompt)
            steps = []
            started = time.perf_counter()
            for _ in range(args.tokens):
                t = time.perf_counter()
                out = decoder.step([BatchEntry(i, [last[i]], pos[i]) for i in range(width)])
                steps.append((time.perf_counter() - t) * 1000)
                for i in range(width):
                    last[i], pos[i] = out[i][0], pos[i] + 1
            total = time.perf_counter() - started
            print(f"{'unified' if args.unified else 'split'} KV, {width} sequences: median step "
                  f"{statistics.median(steps):.2f} ms, aggregate {width * args.tokens / total:.1f} tok/s")


if __name__ == "__main__":
    main()
