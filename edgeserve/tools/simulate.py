"""`edgeserve simulate`: replay a trace (or a generated sweep) through the pure routing policy.

This is the I/O shell around edgeserve.routing.simulator: it reads the policy file, the cost
profiles and the trace, and prints hit rate, expected accuracy, variant shares and the
accuracy-vs-deadline table with the crossover deadline. No model is loaded. The trace is replayed
through the server's own batching model: every variant has --parallel places in its batch (as
`parallel` in models.toml) and its profile's batch_step_factors say what a wider step costs.

Profiles: a JSON list of CostProfile objects, or an object {variant_id: CostProfile}. A variant's
curve name in the policy is the part of its variant_id after the last ":" (llama31-8b:q8_0 → q8_0);
a speculative pair's (llama31-8b:q8_0+q2_k) is its target's, the part before "+" (q8_0).

--speculative TARGET+DRAFT adds a pair the profile file does not have, projected from the two
variants' profiles (edgeserve.routing.speculation): the draft proposes --draft-len tokens per step,
each accepted with probability --acceptance, and the target verifies them in one pass that costs
--verify-factor one-token steps. Those three numbers are assumptions, and the output says so.

Trace: JSON lines {"arrival_ms", "prompt_tokens", "max_tokens", "deadline_ms"} (the last two may be
null or missing); blank lines and lines starting with # are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from edgeserve.config import PAIR_JOIN
from edgeserve.errors import ConfigError, EdgeserveError
from edgeserve.policies import load_policy
from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy import VariantCandidate, format_ms, uncovered_variants
from edgeserve.routing.simulator import (
    Arrival,
    ChoiceSpan,
    DeadlineRow,
    SimulationResult,
    accuracy_vs_deadline,
    choice_spans,
    crossover_deadline,
    deadline_grid,
    deadline_range,
    simulate,
    sweep_trace,
    variant_label,
)
from edgeserve.routing.speculation import speculative_profile


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
    parser.add_argument("--speculative", metavar="TARGET+DRAFT", default=None,
                        help="add a projected speculative pair of two variants in the profile "
                             "file, e.g. q8_0+q2_k (the names after ':' in their variant ids)")
    parser.add_argument("--acceptance", type=float, default=0.8,
                        help="with --speculative: probability the target accepts a drafted token "
                             "(default 0.8; measured greedy agreement q2_k→q8_0: SmolLM2 0.818, "
                             "Qwen2.5-Coder-0.5B 0.948)")
    parser.add_argument("--draft-len", type=_positive, default=4, metavar="K",
                        help="with --speculative: tokens drafted per step (default 4)")
    parser.add_argument("--verify-factor", type=float, default=1.1,
                        help="with --speculative: a target pass over K+1 tokens in one-token steps "
                             "(default 1.1, a memory-bound board; 2.3-4 measured on a 2-core x86 VM)")


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
    """One candidate per profile, named by its curve: a pair's (target+draft) is its target's."""
    return [VariantCandidate(variant_id=p.variant_id, name=curve_name(p.variant_id),
                             profile=p, n_ctx=n_ctx) for p in profiles]


def curve_name(variant_id: str) -> str:
    """llama31-8b:q8_0 → q8_0; a speculative pair's, llama31-8b:q8_0+q2_k → q8_0 (its target's)."""
    return variant_label(variant_id).partition(PAIR_JOIN)[0]


def with_speculative_pair(profiles: Sequence[CostProfile], pair: str, *, acceptance: float,
                          draft_len: int, verify_factor: float) -> CostProfile:
    """The projected profile of ``pair`` (TARGET+DRAFT, labels of two profiles of one family)."""
    target_name, join, draft_name = pair.partition(PAIR_JOIN)
    if not join or not target_name or not draft_name or PAIR_JOIN in draft_name:
        raise ConfigError(f"--speculative: expected TARGET{PAIR_JOIN}DRAFT, for example "
                          f"q8_0{PAIR_JOIN}q2_k; got '{pair}'")
    by_label = {variant_label(p.variant_id): p for p in profiles}
    missing = [name for name in (target_name, draft_name) if name not in by_label]
    if missing:
        raise ConfigError(f"--speculative {pair}: no variant {' or '.join(repr(m) for m in missing)} "
                          f"in the profile file (it has {', '.join(sorted(by_label))})")
    target, draft = by_label[target_name], by_label[draft_name]
    family, sep, _ = target.variant_id.rpartition(":")
    if draft.variant_id.rpartition(":")[0] != family:
        raise ConfigError(f"--speculative {pair}: {target.variant_id} and {draft.variant_id} are "
                          "not of one family (a draft must share its target's tokenizer)")
    variant_id = f"{family}{sep}{pair}"
    if pair in by_label:
        raise ConfigError(f"--speculative {pair}: the profile file already has {variant_id}; "
                          "leave out --speculative to use it")
    try:
        return speculative_profile(target, draft, acceptance=acceptance, draft_len=draft_len,
                                   verify_factor=verify_factor, variant_id=variant_id)
    except ValueError as exc:
        raise ConfigError(f"--speculative {pair}: {exc}") from exc


def describe_pair(pair: CostProfile, target: CostProfile, *, acceptance: float, draft_len: int,
                  verify_factor: float) -> str:
    """The assumptions behind a projected pair, and what they make of its cost."""
    name = variant_label(pair.variant_id)
    target_name, _, draft_name = name.partition(PAIR_JOIN)
    ratio = pair.decode_ms_per_token / target.decode_ms_per_token
    return (f"speculative {name} (PROJECTED, not measured): {draft_name} drafts {draft_len} tokens "
            f"per step, {target_name} verifies them in one pass costing {verify_factor:g} one-token "
            f"steps; acceptance {acceptance:g} (assumed) → {pair.tokens_per_step:.2f} tokens per "
            f"step; effective {format_ms(pair.decode_ms_per_token)}/token vs {target_name}'s "
            f"{format_ms(target.decode_ms_per_token)}/token ({ratio:.2f}×)")


# ---- running and printing -------------------------------------------------------------------


def _run(args: argparse.Namespace) -> None:
    policy = load_policy(args.policy)
    profiles, assumption = _with_requested_pair(args, load_profiles(args.profile))
    candidates = candidates_from(profiles, args.n_ctx)
    hint = None if args.hint is None else args.hint == "on"
    style = args.style or policy.default_style
    if style not in policy.styles:
        raise ConfigError(f"--style: '{style}' is not one of {sorted(policy.styles)}")
    hint_on = policy.hint.enabled if hint is None else hint
    names = [variant_label(c.variant_id) for c in candidates]
    print(f"policy {policy.name} ({args.policy}); variants: "
          + ", ".join(_describe(c) for c in candidates))
    if assumption is not None:
        print(assumption)
    missing = uncovered_variants(policy, sorted({c.name for c in candidates}))
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
    print_table(rows, names)

    spans = choice_spans(policy, candidates, args.prompt_tokens, max_tokens=args.max_tokens,
                         style=style, hint=hint)
    print_spans(spans)
    by_speed = sorted(candidates, key=lambda c: c.profile.decode_ms_per_token)
    if len(by_speed) >= 2:
        fast = variant_label(by_speed[0].variant_id)
        # the variant the longest deadlines get (with a pair beside its target, not the slowest)
        last = spans[-1].variant
        slow = last if last is not None and last != fast else variant_label(by_speed[-1].variant_id)
        crossover = crossover_deadline(policy, candidates, args.prompt_tokens, fast=fast,
                                       slow=slow, max_tokens=args.max_tokens, style=style,
                                       hint=hint)
        if crossover is None:
            print(f"\ncrossover: none — {slow} is never chosen over {fast} at a longer deadline")
        else:
            print(f"\ncrossover: {slow} overtakes {fast} at a deadline of {format_ms(crossover)} "
                  f"({crossover:.0f} ms); below it {fast} is chosen")


def _with_requested_pair(args: argparse.Namespace, profiles: list[CostProfile]
                         ) -> tuple[list[CostProfile], str | None]:
    """The profiles plus --speculative's projected pair (if asked), and what the pair assumes."""
    if args.speculative is None:
        return profiles, None
    spec = {"acceptance": args.acceptance, "draft_len": args.draft_len,
            "verify_factor": args.verify_factor}
    pair = with_speculative_pair(profiles, args.speculative, **spec)
    target = next(p for p in profiles if variant_label(p.variant_id) == curve_name(pair.variant_id))
    return [*profiles, pair], describe_pair(pair, target, **spec)


def _describe(candidate: VariantCandidate) -> str:
    name = variant_label(candidate.variant_id)
    curve = "" if candidate.name == name else f" (curve {candidate.name})"
    return f"{name} = {candidate.variant_id}{curve}"


def print_table(rows: Sequence[DeadlineRow], names: Sequence[str]) -> None:
    """The accuracy-vs-deadline table: the choice per deadline, and each variant pinned."""
    width = max(8, *(len(name) for name in names))
    header = f"{'deadline':>14} {'ms':>11}  {'chosen':<{width}} {'tokens':>6} {'predicted':>14} " \
             f"{'expected':>8}" + "".join(f" {name:>{max(7, len(name))}}" for name in names)
    print(header)
    for row in rows:
        chosen = row.variant or "refused"
        tokens = "" if row.max_tokens is None else str(row.max_tokens)
        predicted = "" if row.predicted_ms is None else format_ms(row.predicted_ms)
        print(f"{format_ms(row.deadline_ms):>14} {row.deadline_ms:>11.0f}  {chosen:<{width}} "
              f"{tokens:>6} {predicted:>14} {row.expected_accuracy:>8.3f}"
              + "".join(f" {row.per_variant.get(name, 0.0):>{max(7, len(name))}.3f}"
                        for name in names))


def print_spans(spans: Sequence[ChoiceSpan]) -> None:
    """Which variant each range of deadlines gets (empty queue), one line per range."""
    print("\nchoice by deadline (empty queue):")
    width = max(len(span.variant or "refused") for span in spans)
    for span in spans:
        start = f"{format_ms(span.from_ms)} ({span.from_ms:.0f} ms)"
        if span.to_ms is None:
            where = f"{start} and longer"
        else:
            end = f"{format_ms(span.to_ms)} ({span.to_ms:.0f} ms)"
            where = f"below {end}" if span.from_ms == 0 else f"{start} .. {end}"
        print(f"  {span.variant or 'refused':<{width}}  {where}")


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
