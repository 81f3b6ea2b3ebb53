"""`edgeserve simulate`: replay a trace (or a generated sweep) through the pure routing policy.

This is the I/O shell around edgeserve.routing.simulator: it reads the policy file, the cost
profiles and the trace, and prints hit rate, expected accuracy, variant shares and the
accuracy-vs-deadline table with the crossover deadline. No model is loaded. The trace is replayed
through the server's own batching model: every variant has --parallel places in its batch (as
`parallel` in models.toml) and its profile's batch_step_factors say what a wider step costs.

Profiles: a JSON list of CostProfile objects, or an object {variant_id: CostProfile}. A variant's
curve name in the policy is the part of its variant_id after the last ":" (llama31-8b:q8_0 → q8_0).
Trace: JSON lines {"arrival_ms", "prompt_tokens", "max_tokens", "deadline_ms"} (the last two may be
null or missing); blank lines and lines starting with # are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from edgeserve.errors import ConfigError, EdgeserveError
from edgeserve.policies import load_policy
from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy import VariantCandidate, format_ms, uncovered_variants
from edgeserve.routing.simulator import (
    Arrival,
    SimulationResult,
    accuracy_vs_deadline,
    crossover_deadline,
    deadline_grid,
    deadline_range,
    simulate,
    sweep_trace,
)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `edgeserve simulate` (the subcommand is in edgeserve.cli's table)."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--policy", type=Path, required=True, help="policy file (TOML)")
    parser.add_argument("--profile", type=Path, required=True,
                        help="cost profiles (JSON list, or {variant_id: profile})")
    parser.add_argument("--trace", type=Path,
                        help="arrivals (JSONL); default: a generated sweep of deadlines")
    parser.add_argument("--prompt-tokens", type=int, default=150,
                        help="prompt size for the sweep and the table (default 150)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="requested max_tokens for the sweep and the table "
                             "(default: the policy's default_max_tokens)")
    parser.add_argument("--style", default=None, help="prompt style (default: the policy's)")
    parser.add_argument("--hint", choices=["on", "off"], default=None,
                        help="budget hint (default: the policy's hint.enabled)")
    parser.add_argument("--n-ctx", type=int, default=4096,
                        help="context size of every variant (default 4096)")
    parser.add_argument("--parallel", type=_positive, default=1, metavar="N",
                        help="sequences that may share a variant's batch, as `parallel` in "
                             "models.toml (default 1)")
    parser.add_argument("--prefill-chunk", type=_positive, default=64, metavar="TOKENS",
                        help="prompt tokens evaluated per step, as `edgeserve serve "
                             "--prefill-chunk` (default 64)")
    parser.add_argument("--requests", type=int, default=40,
                        help="requests in the generated sweep (default 40)")
    parser.add_argument("--gap-ms", type=float, default=None,
                        help="arrival gap of the generated sweep (default: no queueing)")
    parser.add_argument("--rows", type=int, default=16,
                        help="rows of the accuracy-vs-deadline table (default 16)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="sigma of a lognormal factor on each request's step costs (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --noise (default 0)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_simulate(args: argparse.Namespace) -> int:
    """Run the `simulate` command; 0 on success, 2 on a bad input file (message on stderr)."""
    try:
        _run(args)
    except EdgeserveError as exc:
        print(f"edgeserve: {exc.message}", file=sys.stderr)
        return 2
    return 0


# ---- loading ------------------------------------------------------------------------------------


def load_profiles(path: Path) -> list[CostProfile]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read profile file {path}: {exc.strerror or exc}") from exc
    try:
        data = msgspec.json.decode(raw, type=list[CostProfile] | dict[str, CostProfile])
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if isinstance(data, dict):
        data = [msgspec.structs.replace(p, variant_id=key) for key, p in data.items()]
    if not data:
        raise ConfigError(f"{path}: no cost profiles")
    return data


def load_trace(path: Path) -> list[Arrival]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    decoder = msgspec.json.Decoder(Arrival)
    trace = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        try:
            trace.append(decoder.decode(line))
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from exc
    return trace


def candidates_from(profiles: Sequence[CostProfile], n_ctx: int) -> list[VariantCandidate]:
    return [VariantCandidate(variant_id=p.variant_id, name=p.variant_id.rpartition(":")[2],
                             profile=p, n_ctx=n_ctx) for p in profiles]


# ---- running and printing -------------------------------------------------------------------


def _run(args: argparse.Namespace) -> None:
    policy = load_policy(args.policy)
    candidates = candidates_from(load_profiles(args.profile), args.n_ctx)
    hint = None if args.hint is None else args.hint == "on"
    style = args.style or policy.default_style
    if style not in policy.styles:
        raise ConfigError(f"--style: '{style}' is not one of {sorted(policy.styles)}")
    hint_on = policy.hint.enabled if hint is None else hint
    names = [c.name for c in candidates]
    print(f"policy {policy.name} ({args.policy}); variants: "
          + ", ".join(f"{c.name} = {c.variant_id}" for c in candidates))
    missing = uncovered_variants(policy, names)
    if missing:
        print(f"warning: no quality curve for {', '.join(missing)} (expected accuracy 0)")

    if args.trace is not None:
        trace = load_trace(args.trace)
        source = f"trace {args.trace}: {len(trace)} requests"
    else:
        trace = sweep_trace(policy, candidates, args.prompt_tokens, args.requests,
                            max_tokens=args.max_tokens, gap_ms=args.gap_ms)
        lo, hi = trace[0].deadline_ms or 0.0, trace[-1].deadline_ms or 0.0
        spacing = "no queueing" if args.gap_ms is None else f"every {format_ms(args.gap_ms)}"
        source = (f"generated sweep: {len(trace)} requests of {args.prompt_tokens} prompt tokens, "
                  f"deadlines {format_ms(lo)} .. {format_ms(hi)}, {spacing}")
    result = simulate(trace, candidates, policy, parallel=args.parallel,
                      chunk_tokens=args.prefill_chunk, noise=args.noise, seed=args.seed,
                      style=style, hint=hint)
    print(source + f"; parallel {args.parallel}, prefill chunk {args.prefill_chunk}"
          + (f", step-cost noise σ={args.noise} seed {args.seed}" if args.noise else ""))
    print_summary(result)

    lo, hi = deadline_range(policy, candidates, args.prompt_tokens, max_tokens=args.max_tokens)
    rows = accuracy_vs_deadline(policy, candidates, args.prompt_tokens,
                                deadline_grid(lo, hi, args.rows), max_tokens=args.max_tokens,
                                style=style, hint=hint)
    print(f"\naccuracy vs deadline (prompt {args.prompt_tokens} tokens, style {style}, "
          f"hint {'on' if hint_on else 'off'}, empty queue)")
    header = f"{'deadline':>14} {'ms':>11}  {'chosen':<8} {'tokens':>6} {'predicted':>14} " \
             f"{'expected':>8}" + "".join(f" {name:>7}" for name in names)
    print(header)
    for row in rows:
        chosen = row.variant or "refused"
        tokens = "" if row.max_tokens is None else str(row.max_tokens)
        predicted = "" if row.predicted_ms is None else format_ms(row.predicted_ms)
        print(f"{format_ms(row.deadline_ms):>14} {row.deadline_ms:>11.0f}  {chosen:<8} "
              f"{tokens:>6} {predicted:>14} {row.expected_accuracy:>8.3f}"
              + "".join(f" {row.per_variant.get(name, 0.0):>7.3f}" for name in names))

    by_speed = sorted(candidates, key=lambda c: c.profile.decode_ms_per_token)
    if len(by_speed) >= 2:
        fast, slow = by_speed[0].name, by_speed[-1].name
        crossover = crossover_deadline(policy, candidates, args.prompt_tokens, fast=fast,
                                       slow=slow, max_tokens=args.max_tokens, style=style,
                                       hint=hint)
        if crossover is None:
            print(f"\ncrossover: none — {slow} is never chosen over {fast} at a longer deadline")
        else:
            print(f"\ncrossover: {slow} overtakes {fast} at a deadline of {format_ms(crossover)} "
                  f"({crossover:.0f} ms); below it {fast} is chosen")


def print_summary(result: SimulationResult) -> None:
    codes = ", ".join(f"{code} {n}" for code, n in sorted(result.refusals_by_code.items()))
    print(f"requests {result.requests}  admitted {result.admitted}  refused {result.refused}"
          + (f" ({codes})" if codes else ""))
    if result.hit_rate is not None:
        served = "" if result.served_rate is None else (
            f"; {100 * result.served_rate:.1f} % of all requests with a deadline")
        print(f"hit rate {100 * result.hit_rate:.1f} % of admitted requests with a deadline "
              f"({result.met} met){served}")
    if result.mean_expected_accuracy is not None:
        print(f"expected accuracy {result.mean_expected_accuracy:.3f} per admitted request, "
              f"{result.mean_expected_accuracy_all:.3f} per request (refusals count 0); "
              f"after deadline cuts {result.mean_realized_accuracy_all:.3f}")
    shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in
                       result.variant_shares.items())
    print(f"variant shares: {shares or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgeserve.tools.simulate ...`` works before the command is wired into the CLI."""
    from edgeserve.cli import build_parser

    return run_simulate(build_parser().parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
