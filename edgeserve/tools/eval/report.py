"""report.md, summary.csv and the plots, from the answer records of an output directory."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.tools.eval.policy_writer import curves_from_records
from edgeserve.tools.eval.records import AnswerRecord
from edgeserve.tools.eval.same_latency import crossover_ms, equal_latency_rows
from edgeserve.tools.eval.stats import GroupStats, decode_ms_per_token, hint_honesty, summarize

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
DEADLINE_PNG = "accuracy_vs_deadline.png"
BUDGET_PNG = "accuracy_vs_budget.png"

CSV_COLUMNS = [
    "mode", "style", "hint", "forcing", "policy", "deadline_ms", "budget", "n", "correct", "accuracy",
    "ci_low", "ci_high", "mean_completion_tokens", "mean_budget_tokens", "deadline_hit_rate", "answered",
    "refused", "http_errors", "timeouts", "cut", "mean_latency_ms", "p95_latency_ms", "variants",
]


@dataclass(frozen=True)
class ReportContext:
    """What the report says about how the numbers were made."""

    url: str = ""
    data: str = ""
    family: str = ""
    command: str = ""
    compare: tuple[str, str] | None = None  # (fast, slow) variant names; default: by measured cost
    token_ratio: float | None = None  # slow ÷ fast ms/token; default: measured
    notes: list[str] = field(default_factory=list)


# ---- CSV --------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{round(value, digits):g}"


def csv_row(s: GroupStats) -> dict[str, str]:
    low, high = s.interval
    return {
        "mode": s.mode, "style": s.style, "hint": "on" if s.hint else "off",
        "forcing": "" if s.forcing is None else ("on" if s.forcing else "off"), "policy": s.policy,
        "deadline_ms": "" if s.deadline_ms is None else str(s.deadline_ms),
        "budget": "" if s.budget is None else str(s.budget), "n": str(s.n), "correct": str(s.correct),
        "accuracy": _num(s.accuracy), "ci_low": _num(low), "ci_high": _num(high),
        "mean_completion_tokens": _num(s.mean_completion_tokens, 1),
        "mean_budget_tokens": _num(s.mean_budget_tokens, 1),
        "deadline_hit_rate": _num(s.deadline_hit_rate), "answered": str(s.answered),
        "refused": str(s.refused), "http_errors": str(s.errors), "timeouts": str(s.timeouts), "cut": str(s.cut),
        "mean_latency_ms": _num(s.mean_latency_ms, 1), "p95_latency_ms": _num(s.p95_latency_ms, 1),
        "variants": s.variant_shares,
    }


def write_summary_csv(stats: Sequence[GroupStats], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for s in stats:
            writer.writerow(csv_row(s))
    return path


# ---- markdown ---------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _ci(s: GroupStats) -> str:
    low, high = s.interval
    return f"{100 * low:.1f}–{100 * high:.1f}"


def _tokens(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _seconds(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _condition(s: GroupStats) -> str:
    parts = [s.style, "hint on" if s.hint else "hint off"]
    if s.forcing is not None:
        parts.append("forcing on" if s.forcing else "forcing off")
    return ", ".join(parts)


def _deadline_section(stats: Sequence[GroupStats]) -> list[str]:
    rows = [
        [_condition(s), f"{(s.deadline_ms or 0) / 1000:g} s", s.policy, str(s.n), _pct(s.accuracy), _ci(s),
         _tokens(s.mean_completion_tokens), _tokens(s.mean_budget_tokens), _pct(s.deadline_hit_rate),
         str(s.refused), str(s.errors + s.timeouts), str(s.cut), _seconds(s.mean_latency_ms), s.variant_shares]
        for s in stats
    ]
    return [
        "## Accuracy per policy × deadline", "",
        *_table(["prompt", "deadline", "policy", "n", "accuracy", "95 % CI", "mean tokens", "mean budget",
                 "deadline hit", "refused", "errors", "cut", "mean latency", "variants"], rows),
        "",
        f"![accuracy vs deadline]({DEADLINE_PNG})", "",
        "*accuracy* counts every question asked: refusals (429 `deadline_infeasible`), HTTP errors "
        "and timeouts are wrong answers and are also counted on their own. *mean tokens*: generated "
        "tokens per answer; *mean budget*: the token budget the server gave the request for its "
        "deadline; *deadline hit*: answered requests that finished within the deadline by the "
        "server's clock; *cut*: answers stopped by their budget or deadline rather than ending on "
        "their own.", "",
    ]


def _paired(records: Sequence[AnswerRecord], a: GroupStats, b: GroupStats) -> tuple[int, int]:
    """Questions only ``a`` got right, and only ``b`` got right (same questions, same condition)."""
    def correct(s: GroupStats) -> dict[int, bool]:
        return {r.index: r.correct for r in records
                if (r.mode, r.policy, r.deadline_ms, r.budget, r.style, r.hint, r.forcing)
                == (s.mode, s.policy, s.deadline_ms, s.budget, s.style, s.hint, s.forcing)}
    left, right = correct(a), correct(b)
    common = left.keys() & right.keys()
    return (sum(left[i] and not right[i] for i in common), sum(right[i] and not left[i] for i in common))


def _router_section(stats: Sequence[GroupStats], records: Sequence[AnswerRecord]) -> list[str]:
    by_condition: dict[tuple[object, ...], list[GroupStats]] = {}
    for s in stats:
        by_condition.setdefault((s.style, s.hint, s.forcing, s.deadline_ms, s.budget), []).append(s)
    rows = []
    for group in by_condition.values():
        routed = next((s for s in group if s.policy == "routed"), None)
        pinned = [s for s in group if s.policy.startswith("pin:")]
        if routed is None or not pinned:
            continue
        best = max(pinned, key=lambda s: (s.accuracy, -(s.mean_latency_ms or 0)))
        only_routed, only_pinned = _paired(records, routed, best)
        if routed.accuracy >= best.accuracy:
            verdict = "not worse"
        elif routed.interval[1] >= best.accuracy:
            verdict = "worse, within the 95 % interval"
        else:
            verdict = "**worse**"
        rows.append([_condition(routed), f"{(routed.deadline_ms or 0) / 1000:g} s", _pct(routed.accuracy),
                     f"{best.policy} {_pct(best.accuracy)}", f"{100 * (routed.accuracy - best.accuracy):+.1f} pt",
                     f"+{only_routed} / −{only_pinned}", verdict])
    if not rows:
        return []
    return [
        "## Router vs the better pinned variant at the same deadline", "",
        *_table(["prompt", "deadline", "routed", "best pinned", "difference", "paired: routed-only / "
                 "pinned-only correct", "verdict"], rows),
        "",
    ]


def _pair(costs: dict[str, float], candidates: Sequence[str], given: tuple[str, str] | None) -> tuple[str, str] | None:
    if given is not None:
        return given
    measured = sorted((costs[v], v) for v in set(candidates) if v in costs)
    if len(measured) < 2:
        return None
    return measured[0][1], measured[-1][1]


def _same_latency_section(stats: Sequence[GroupStats], records: Sequence[AnswerRecord],
                          ctx: ReportContext) -> list[str]:
    costs = decode_ms_per_token(records)
    lines = ["## Same-latency comparison", ""]
    if costs:
        lines += ["Measured decode cost (server `timings`, all answered requests): "
                  + ", ".join(f"{v} {ms:.2f} ms/token" for v, ms in sorted(costs.items(), key=lambda kv: kv[1]))
                  + ".", ""]
    body: list[str] = []
    deadline_pins = [s.policy.removeprefix("pin:") for s in stats
                     if s.mode == "deadline" and s.policy.startswith("pin:")]
    pair = _pair(costs, deadline_pins, ctx.compare)
    if pair is not None:
        body += _equal_deadline(stats, pair, costs, ctx)
    sweep_variants = [s.policy.removeprefix("pin:") for s in stats if s.mode == "sweep"]
    pair = _pair(costs, sweep_variants, ctx.compare)
    if pair is not None:
        body += _equal_latency_from_curves(records, pair, costs, ctx)
    if not body:
        return [*lines, "Needs two pinned variants with measured timings (or `--compare` and "
                "`--token-ratio`); this run has none.", ""]
    return lines + body


def _ratio(pair: tuple[str, str], costs: dict[str, float], ctx: ReportContext) -> tuple[float | None, str]:
    fast, slow = pair
    if ctx.token_ratio is not None:
        return ctx.token_ratio, f"{ctx.token_ratio:.2f} (given with --token-ratio)"
    if fast in costs and slow in costs:
        ratio = costs[slow] / costs[fast]
        return ratio, f"{ratio:.2f} ({costs[slow]:.2f} / {costs[fast]:.2f} ms/token, measured)"
    return None, "unknown"


def _equal_deadline(stats: Sequence[GroupStats], pair: tuple[str, str], costs: dict[str, float],
                    ctx: ReportContext) -> list[str]:
    fast, slow = pair
    _, ratio_text = _ratio(pair, costs, ctx)
    by_key = {(s.style, s.hint, s.forcing, s.deadline_ms, s.policy): s for s in stats if s.mode == "deadline"}
    rows = []
    for (style, hint, forcing, deadline, policy), f in by_key.items():
        if policy != f"pin:{fast}":
            continue
        s = by_key.get((style, hint, forcing, deadline, f"pin:{slow}"))
        if s is None:
            continue
        winner = "tie" if f.accuracy == s.accuracy else (fast if f.accuracy > s.accuracy else slow)
        rows.append([_condition(f), f"{(deadline or 0) / 1000:g} s",
                     f"{_pct(f.accuracy)} ({_tokens(f.mean_budget_tokens)} tok)",
                     f"{_pct(s.accuracy)} ({_tokens(s.mean_budget_tokens)} tok)", winner])
    if not rows:
        return []
    return [
        f"### Equal deadline: {fast} vs {slow} (measured directly)", "",
        f"A deadline gives both variants the same time; the server turns it into a token budget from "
        f"each variant's cost, so {slow} gets about 1/ratio of {fast}'s tokens. Per-token ratio "
        f"{slow}/{fast}: {ratio_text}.", "",
        *_table(["prompt", "deadline", f"{fast} (budget)", f"{slow} (budget)", "better"], rows), "",
    ]


def _equal_latency_from_curves(records: Sequence[AnswerRecord], pair: tuple[str, str], costs: dict[str, float],
                               ctx: ReportContext) -> list[str]:
    fast, slow = pair
    ratio, ratio_text = _ratio(pair, costs, ctx)
    if ratio is None:
        return []
    fast_ms = costs.get(fast, 1.0)
    curves = {(m.variant, m.key): m.curve for m in curves_from_records(records)}
    lines = [
        f"### Equal latency from the budget sweep: {fast} vs {slow} (the study's method)", "",
        f"In the time {slow} writes b tokens, {fast} writes b × ratio (ratio {ratio_text}). Each "
        "variant's accuracy at a budget is read from its sweep curve as the router reads it: linear "
        "between measured points, starting from 0 accuracy at 0 tokens, running maximum, flat after "
        "the largest measured budget (rows marked * rely on that ramp or tail). Latency counts "
        "decoding only (prompt processing is the same for both and small at these budgets)"
        + ("" if fast in costs else f"; {fast}'s cost was not measured, so latency is in {fast}-tokens") + ".", "",
    ]
    found = False
    for key in sorted({k for (v, k) in curves if v == fast} & {k for (v, k) in curves if v == slow}):
        rows_data = equal_latency_rows(curves[(fast, key)], curves[(slow, key)], fast_ms, ratio)
        cross = crossover_ms(rows_data)
        rows = [[f"{r.latency_ms / 1000:.2f} s" + (" *" if r.extrapolated else ""), f"{r.fast_tokens:.0f}",
                 _pct(r.fast_accuracy), f"{r.slow_tokens:.0f}", _pct(r.slow_accuracy),
                 {"fast": fast, "slow": slow, "tie": "tie"}[r.winner]] for r in rows_data]
        lines += [f"**{key}** — " + (f"{slow} catches up from about {cross / 1000:.2f} s of decoding."
                                     if cross is not None else f"{slow} never overtakes {fast} in the measured range."),
                  "", *_table(["decode time", f"{fast} tokens", f"{fast} acc", f"{slow} tokens", f"{slow} acc",
                               "better"], rows), ""]
        found = True
    return lines if found else []


def _sweep_section(stats: Sequence[GroupStats]) -> list[str]:
    rows = [[_condition(s), s.policy.removeprefix("pin:"), str(s.budget), str(s.n), _pct(s.accuracy), _ci(s),
             _tokens(s.mean_completion_tokens), str(s.cut), str(s.errors + s.timeouts), _seconds(s.mean_latency_ms)]
            for s in stats]
    return [
        "## Quality sweep: accuracy per variant × token budget (no deadline)", "",
        *_table(["prompt", "variant", "max_tokens", "n", "accuracy", "95 % CI", "mean tokens", "cut", "errors",
                 "mean latency"], rows),
        "", f"![accuracy vs budget]({BUDGET_PNG})", "",
    ]


def _hint_section(records: Sequence[AnswerRecord]) -> list[str]:
    """Budget hint honesty: do the answers stay under the number of tokens they were told?"""
    rows = hint_honesty(records)
    if not rows:
        return []
    return [
        "## Budget hint honesty", "",
        "Answers that carried the hint \"UNDER n tokens\": completion tokens ÷ n, per variant "
        "(the policy's `hint.ratio` sets n = ratio × budget; a ratio whose answers overshoot n "
        "often is cut by max_tokens before it answers).", "",
        *_table(["variant", "answers", "median tokens ÷ hint", "over the hint", "cut at the budget"],
                [[h.variant, str(h.n), f"{h.median_ratio:.2f}", _pct(h.over_share), _pct(h.over_budget_share)]
                 for h in rows]),
        "",
    ]


def _failures_section(records: Sequence[AnswerRecord]) -> list[str]:
    failed = [r for r in records if r.status in ("http_error", "timeout")]
    if not failed:
        return []
    lines = [f"## Failed requests ({len(failed)})", "",
             "Counted as wrong above; a rerun with the same --out asks them again.", ""]
    for r in failed[:20]:
        lines.append(f"- question {r.index}, {r.policy}, deadline {r.deadline_ms}, {r.status}: {r.error}")
    if len(failed) > 20:
        lines.append(f"- … and {len(failed) - 20} more (see results.jsonl)")
    return [*lines, ""]


def render_report(records: Sequence[AnswerRecord], stats: Sequence[GroupStats], ctx: ReportContext) -> str:
    questions = len({r.index for r in records})
    deadline = [s for s in stats if s.mode == "deadline"]
    sweep = [s for s in stats if s.mode == "sweep"]
    lines = [
        "# GSM8K on edgeserve", "",
        f"{len(records)} answers to {questions} questions"
        + (f" from `{ctx.data}`" if ctx.data else "")
        + (f", asked of `{ctx.url}`" if ctx.url else "")
        + (f" (family `{ctx.family}`)" if ctx.family else "")
        + f"; report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Greedy decoding (temperature 0).", "",
    ]
    if ctx.command:
        lines += ["```", ctx.command, "```", ""]
    lines += [f"- {note}" for note in ctx.notes] + ([""] if ctx.notes else [])
    if deadline:
        lines += _deadline_section(deadline) + _router_section(deadline, records)
    if sweep:
        lines += _sweep_section(sweep)
    lines += _same_latency_section(stats, records, ctx)
    lines += _hint_section(records)
    lines += _failures_section(records)
    lines += [
        "## Method", "",
        "- Answers are graded by `edgeserve.tools.eval.grading`: the last `\\boxed{…}`, else `#### x`, else "
        "\"the answer is x\", else the last number; normalised (commas, `$`, `%`, units, `.0`, "
        "fractions) and compared numerically (relative tolerance 1e-6); math-verify decides answers "
        "that are formulas.",
        "- 95 % intervals are Wilson score intervals over the questions of a row.",
        "- Each row's questions are the same across policies, so the router comparison also shows "
        "the paired counts (questions only one side got right).", "",
    ]
    return "\n".join(lines)


def write_report(out_dir: Path, records: Sequence[AnswerRecord], ctx: ReportContext) -> list[Path]:
    """Write report.md, summary.csv and the plots that have data; returns the paths written."""
    from edgeserve.tools.eval.plot import plot_accuracy_vs_budget, plot_accuracy_vs_deadline

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = summarize(records)
    written = [write_summary_csv(stats, out_dir / SUMMARY_CSV)]
    title = f"GSM8K on edgeserve{f' ({ctx.family})' if ctx.family else ''}"
    if any(s.mode == "deadline" for s in stats):
        written.append(plot_accuracy_vs_deadline(stats, out_dir / DEADLINE_PNG, f"{title}: accuracy vs deadline"))
    if any(s.mode == "sweep" for s in stats):
        written.append(plot_accuracy_vs_budget(stats, out_dir / BUDGET_PNG, f"{title}: accuracy vs token budget"))
    report = out_dir / REPORT_MD
    report.write_text(render_report(records, stats, ctx), encoding="utf-8")
    written.append(report)
    return written
