"""`edgeserve eval gsm8k`: ask a running edgeserve GSM8K questions under deadlines, or sweep token
budgets to measure quality curves, and write report.md, summary.csv and plots into --out.

Deadline run (default): every question under every policy (`routed`: the server picks the variant;
`pin:<variant>`: always that one) × deadline × prompt style × hint setting, with X-Deadline-Ms.
Sweep (--sweep-budgets): every question on every pinned variant at each fixed max_tokens, no
deadline; --write-policy FILE then writes the measured curves into a policy file the router reads.

One JSON line per answer goes to OUT/results.jsonl as it arrives; a rerun with the same --out skips
what is done (answered or refused) and asks again what failed. The dataset is a local JSONL file
(`question`, `answer` ending `#### n`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeserve.errors import ConfigError

DEFAULT_DEADLINES = "1000,3000,10000"
DEFAULT_POLICIES = "routed,pin:q2_k,pin:q8_0"
DEFAULT_BUDGETS = "32,64,128,256,512"


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    """`gsm8k` under `edgeserve eval` (the subcommand is in edgeserve.cli's table)."""
    benchmarks = evaluate.add_subparsers(dest="eval_command", required=True)
    p: argparse.ArgumentParser = benchmarks.add_parser(
        "gsm8k", help="GSM8K accuracy per policy × deadline, or a token-budget sweep",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="edgeserve base URL (default %(default)s)")
    p.add_argument("--data", type=Path, required=True, help="GSM8K JSONL file (question, answer)")
    p.add_argument("--out", type=Path, required=True, help="output directory (results.jsonl, report)")
    p.add_argument("--limit", type=int, default=None, help="first N questions (default: all)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N questions (e.g. those the curves were measured on)")
    p.add_argument("--model", default=None,
                   help="model family (default: the only family the server serves)")
    p.add_argument("--deadlines", default=None,
                   help=f"deadlines in ms, comma-separated (default {DEFAULT_DEADLINES})")
    p.add_argument("--policies", default=None,
                   help=f"routed and/or pin:<variant>, comma-separated (default {DEFAULT_POLICIES}; "
                        "with --sweep-budgets: every variant of the family)")
    p.add_argument("--prompt", default="boxed",
                   help="prompt style(s) sent as X-Prompt-Style: boxed, aav, auto (the router picks from "
                        "the measured curves) or a comma list (default boxed)")
    p.add_argument("--hint", choices=["on", "off", "both"], default="on",
                   help="budget hint (X-Budget-Hint) on, off or both (default on)")
    p.add_argument("--answer-forcing", choices=["on", "off"], default=None,
                   help="send X-Answer-Forcing (default: not sent, the server's policy decides)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (default 1; more than the server's slots makes them queue, "
                        "which eats into their deadlines)")
    p.add_argument("--retry-refused", action="store_true",
                   help="a patient client: after a 429 deadline_infeasible wait its Retry-After and ask "
                        "again with what is left of the deadline (for --concurrency above 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of every deadline request (default: none, the deadline decides)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before one request is given up as a timeout (default 600; deadline "
                        "requests also give up 60 s past their deadline)")
    p.add_argument("--sweep-budgets", default=None, metavar="B1,B2,...",
                   help=f"sweep these fixed max_tokens on pinned variants, no deadline (e.g. {DEFAULT_BUDGETS})")
    p.add_argument("--write-policy", type=Path, default=None, metavar="FILE",
                   help="write or update the quality curves measured by the sweep in this policy file")
    p.add_argument("--compare", default=None, metavar="FAST,SLOW",
                   help="the two variants of the same-latency comparison (default: cheapest and "
                        "dearest measured per token)")
    p.add_argument("--token-ratio", type=float, default=None,
                   help="slow ÷ fast decode ms/token for the same-latency comparison (default: measured)")
    p.add_argument("--report-only", action="store_true",
                   help="ask nothing: rewrite the report from OUT/results.jsonl")


def run_eval(args: argparse.Namespace) -> int:
    """Run an `eval` subcommand; 0 when every request got an answer or a refusal, 1 when some
    failed (recorded, reported, retried by a rerun), 2 on bad arguments or an unusable server."""
    from edgeserve.errors import EdgeserveError

    try:
        if args.eval_command == "gsm8k":
            return _gsm8k(args)
    except EdgeserveError as exc:
        print(f"edgeserve eval: {exc.message}", file=sys.stderr)
        return 2
    print(f"edgeserve eval: unknown benchmark {args.eval_command!r}", file=sys.stderr)
    return 2


class UsageError(ConfigError):
    """A command-line value the evaluation cannot use."""


def _styles(text: str) -> list[str]:
    import re

    styles = [s.strip() for s in text.split(",") if s.strip()]
    for style in styles:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", style):
            raise ValueError(f"--prompt: {style!r} is not a style name (boxed, aav, ...)")
    if not styles:
        raise ValueError("--prompt: give a style (boxed or aav)")
    return list(dict.fromkeys(styles))


def _gsm8k(args: argparse.Namespace) -> int:
    from edgeserve.tools.eval.dataset import load_problems
    from edgeserve.tools.eval.plan import parse_int_list, parse_policies
    from edgeserve.tools.eval.records import RESULTS_FILE, latest, read_records

    results_path = args.out / RESULTS_FILE
    if args.report_only:
        return _finish(args, latest(read_records(results_path)), family="", failed=0)
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    sweep = args.sweep_budgets is not None
    if sweep and args.max_tokens is not None:
        raise UsageError("--max-tokens is for deadline runs; a sweep's budgets are --sweep-budgets")
    if sweep and args.deadlines is not None:
        raise UsageError("a sweep runs without deadlines; drop --deadlines or --sweep-budgets")
    try:
        budgets = parse_int_list(args.sweep_budgets, "--sweep-budgets", 1, 1_000_000) if sweep else []
        deadlines = [] if sweep else parse_int_list(args.deadlines or DEFAULT_DEADLINES, "--deadlines", 1, 3_600_000)
        policies = parse_policies(args.policies) if args.policies else None
        styles = _styles(args.prompt)
        _check_report_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    hints = {"on": [True], "off": [False], "both": [True, False]}[args.hint]
    forcing = None if args.answer_forcing is None else args.answer_forcing == "on"
    problems = load_problems(args.data, args.limit, args.skip)
    family, failed = asyncio.run(_ask(args, problems, policies, deadlines, budgets, styles, hints, forcing))
    return _finish(args, latest(read_records(results_path)), family, failed)


async def _ask(args: argparse.Namespace, problems: Sequence[Any], policies: list[Any] | None,
               deadlines: list[int], budgets: list[int], styles: list[str], hints: list[bool],
               forcing: bool | None) -> tuple[str, int]:
    from edgeserve.tools.eval.client import EvalClient, ServerError
    from edgeserve.tools.eval.plan import EvalPolicy, deadline_items, parse_policies, pending, sweep_items
    from edgeserve.tools.eval.records import DONE_STATUSES, RESULTS_FILE, ResultsWriter, done_keys, latest, read_records
    from edgeserve.tools.eval.runner import Progress, ServerGoneError, run_items

    async with EvalClient(args.url, timeout_s=args.timeout, retry_refused=args.retry_refused) as client:
        served = await client.served_models()
        family = served.family(args.model)
        variants = served.families[family]
        if policies is None:
            policies = ([EvalPolicy(v) for v in variants] if budgets else parse_policies(DEFAULT_POLICIES))
        unknown = [p.variant for p in policies if p.variant is not None and p.variant not in variants]
        if unknown:
            raise ServerError(f"family {family} has no variant {', '.join(map(str, unknown))}; "
                              f"its variants: {', '.join(variants)}")
        if budgets:
            pinned = [p.variant for p in policies if p.variant is not None]
            if len(pinned) < len(policies):
                print("edgeserve eval: a sweep measures pinned variants; `routed` is left out", file=sys.stderr)
            items = sweep_items(problems, pinned, budgets, styles, hints, forcing)
        else:
            items = deadline_items(problems, policies, deadlines, styles, hints, args.max_tokens, forcing)
        results_path = args.out / RESULTS_FILE
        existing = read_records(results_path)
        done = done_keys(existing)
        todo = pending(items, done)
        planned = {item.key for item in items}
        already = [r for r in latest(existing) if r.key in planned and r.status in DONE_STATUSES]
        print(f"edgeserve eval: {len(items)} answers planned ({len(problems)} questions), "
              f"{len(items) - len(todo)} already in {results_path}, asking {len(todo)} "
              f"of {args.url} (family {family})", file=sys.stderr)
        progress = Progress(len(items), done=len(items) - len(todo),
                            correct=sum(r.correct for r in already),
                            refused=sum(r.status == "refused" for r in already))
        try:
            with ResultsWriter(results_path) as writer:
                records = await run_items(client, todo, family, writer, args.concurrency, progress)
        except ServerGoneError as exc:
            raise ServerError(str(exc)) from exc
    return family, sum(r.status in ("http_error", "timeout") for r in records)


def _finish(args: argparse.Namespace, records: list[Any], family: str, failed: int) -> int:
    from edgeserve.tools.eval.policy_writer import curves_from_records, write_policy
    from edgeserve.tools.eval.report import ReportContext, write_report

    if not records:
        print(f"edgeserve eval: no answers in {args.out}", file=sys.stderr)
        return 2
    family = family or next((r.model.split(":")[0] for r in records), "")
    ctx = ReportContext(url=args.url, data=str(args.data), family=family,
                        command=shlex.join(["edgeserve", "eval", "gsm8k", *_argv_tail()]),
                        compare=_check_report_args(args), token_ratio=args.token_ratio)
    written = write_report(args.out, records, ctx)
    for path in written:
        print(f"wrote {path}")
    if args.write_policy is not None:
        curves = curves_from_records(records)
        note = f"by edgeserve eval gsm8k on {time.strftime('%Y-%m-%d')} ({args.data.name})"
        policy = write_policy(args.write_policy, curves, _sweep_family(records, family, args.out), note)
        whose = f" of family {policy.family}" if policy.family else ""
        print(f"wrote {len(curves)} curves{whose} to {args.write_policy} (policy {policy.name!r}): "
              + ", ".join(f"{m.variant}.{m.key}" for m in curves))
    _print_summary(records)
    if failed:
        print(f"edgeserve eval: {failed} requests failed (recorded; a rerun asks them again)", file=sys.stderr)
        return 1
    return 0


def _sweep_family(records: list[Any], family: str, out: Path) -> str | None:
    """The family whose curves the sweep measured: the family part of its records' `model` (a
    pin is sent as family:variant), which must be one family (and the one asked, if any)."""
    measured = sorted({r.model.split(":")[0] for r in records if r.mode == "sweep" and r.model})
    if len(measured) > 1 or (measured and family and measured != [family]):
        raise UsageError(f"--write-policy: the sweep results in {out} are from families "
                         f"{', '.join(sorted({*measured, family} - {''}))}; a policy file holds the curves of one "
                         "family (its variant names mean other models in another): use one --out per family")
    return measured[0] if measured else (family or None)


def _check_report_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """--compare as (fast, slow), after checking it and --token-ratio (UsageError)."""
    if args.token_ratio is not None and args.token_ratio <= 0:
        raise UsageError("--token-ratio must be positive")
    if not args.compare:
        return None
    parts = [p.strip() for p in args.compare.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UsageError("--compare takes two variant names: FAST,SLOW (e.g. q2_k,q8_0)")
    return parts[0], parts[1]


def _argv_tail() -> list[str]:
    argv = sys.argv[1:]
    if "gsm8k" in argv:
        return argv[argv.index("gsm8k") + 1:]
    return argv


def _print_summary(records: list[Any]) -> None:
    from edgeserve.tools.eval.stats import summarize

    for s in summarize(records):
        where = f"{s.deadline_ms} ms" if s.mode == "deadline" else f"max_tokens {s.budget}"
        low, high = s.interval
        print(f"  {s.style:6s} hint {'on ' if s.hint else 'off'} {where:>16s} {s.policy:12s} "
              f"acc {s.correct}/{s.n} = {s.accuracy:6.1%} [{low:.1%}, {high:.1%}]  "
              f"refused {s.refused}  errors {s.errors + s.timeouts}  "
              f"tokens {s.mean_completion_tokens or 0:.0f}  {s.variant_shares}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edgeserve.tools.eval.cli gsm8k ...` (the same as `edgeserve eval gsm8k ...`)."""
    from edgeserve.cli import build_parser

    args = build_parser().parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
