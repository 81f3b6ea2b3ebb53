"""`edgeserve loadtest`: Locust scenarios against edgeserve and, side by side, llama_cpp.server.

Starts its own servers on free loopback ports (or uses --url, a loopback edgeserve already
running), measures the service time S of one request alone at --max-tokens on the baseline's
variant (capacity = 1 / S), then runs each scenario headless against each target in turn — the
same seeded arrivals, deadlines and questions — with Locust in a subprocess (gevent must not
patch this process). Every run is bounded: the arrival window is --run-time, a client waits at
most its deadline + --grace-s, and Locust is killed if it overstays. Writes, under --out:

  <scenario>/<target>/locust_stats.csv, locust_failures.csv, report.html  Locust's CSV and HTML
  <scenario>/<target>/events.jsonl                               one line per request
  <scenario>/edgeserve/metrics.txt                               /metrics after the run
  summary.md, summary.json                                       goodput, hit rate, p50/p99, refusals
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec

from edgeserve.config import default_cache_dir, default_models_path
from edgeserve.errors import EdgeserveError
from edgeserve.tools.loadplan import Scenario, Summary, load_scenarios, read_events, summarize, users_needed
from edgeserve.tools.processes import free_port, server_process, tail

COMMAND = "loadtest"
LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
READY_TIMEOUT_S = 900.0  # a first start calibrates every variant
PROBE_REQUESTS = 3
DRAIN_TIMEOUT_S = 600.0
TARGET_GOODPUT_RATIO = 2.0
TARGET_HIT_RATE = 0.99
EDGESERVE, BASELINE = "edgeserve", "llama_cpp.server"
# Sent explicitly (as the locustfile does): llama_cpp.server's default is 1.1, edgeserve's 1.0,
# and with greedy sampling the same prompt must give the same tokens on both.
REPEAT_PENALTY = 1.0


def progress(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    name: str  # EDGESERVE or BASELINE
    base: str  # http://127.0.0.1:PORT
    model: str  # the `model` field of the requests


def parse_duration(text: str) -> float:
    """`90`, `90s`, `2m`, `1m30s` → seconds."""
    rest, total = text.strip().lower(), 0.0
    if rest.replace(".", "", 1).isdigit():
        return float(rest)
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if unit in rest:
            number, rest = rest.split(unit, 1)
            try:
                total += float(number) * factor
            except ValueError:
                raise ValueError(f"not a duration: {text!r} (use 90, 90s, 2m or 1m30s)") from None
    if rest or total <= 0:
        raise ValueError(f"not a duration: {text!r} (use 90, 90s, 2m or 1m30s)")
    return total


def check_loopback(url: str) -> None:
    from ipaddress import ip_address

    host = urlsplit(url).hostname or ""
    with contextlib.suppress(ValueError):
        if host == "localhost" or ip_address(host).is_loopback:
            return
    raise EdgeserveError(f"--url {url!r} is not a loopback address; load tests target this machine only")


# ---- requests outside Locust: the probe and the drain -----------------------------------------


def chat(client: httpx.Client, model: str, question: str, max_tokens: int,
         headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": REPEAT_PENALTY,
            "messages": [{"role": "user", "content": question}]}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"{client.base_url} answered {response.status_code}: {response.text[:300]}")
    return response


def probe_service_ms(target: Target, questions: list[str], max_tokens: int) -> tuple[float, float]:
    """Median time of one request alone at max_tokens (no deadline, no budget hint), after one
    warm-up, and the mean tokens it generated; the questions are the run's first ones."""
    with httpx.Client(base_url=target.base, timeout=DRAIN_TIMEOUT_S) as client:
        chat(client, target.model, questions[-1], 4)
        times, tokens = [], []
        for question in questions[:PROBE_REQUESTS]:
            started = time.perf_counter()
            response = chat(client, target.model, question, max_tokens, {"X-Budget-Hint": "off"})
            times.append((time.perf_counter() - started) * 1000)
            tokens.append(float(response.json()["usage"]["completion_tokens"]))
    return statistics.median(times), statistics.fmean(tokens)


def drain(target: Target) -> None:
    """Returns once the target has worked off what earlier runs left queued: a one-token request
    without a deadline waits behind all of it (last in edgeserve's EDF order, FIFO elsewhere)."""
    with httpx.Client(base_url=target.base, timeout=DRAIN_TIMEOUT_S) as client:
        chat(client, target.model, "Say OK.", 1)


def read_questions(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    questions = [str(msgspec.json.decode(line)["question"]) for line in lines]
    if not questions:
        raise EdgeserveError(f"{path} has no questions (JSONL with a `question` field)")
    return questions


# ---- one Locust run ----------------------------------------------------------------------------


def run_locust(target: Target, scenario_name: str, scenario: Scenario, service_ms: float,
               args: argparse.Namespace, out: Path) -> Summary:
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    events.unlink(missing_ok=True)
    users = args.users or users_needed(scenario, service_ms, args.grace_s)
    stop_timeout = scenario.max_deadline_ms(service_ms) / 1000 + args.grace_s + 5
    run_time = args.run_s + 1  # the plan starts after a short lead
    command = [
        sys.executable, "-m", "locust", "-f", str(args.locustfile), "--headless", "--only-summary",
        "--host", target.base, "-u", str(users), "-r", str(users), "--run-time", f"{run_time:.0f}s",
        "--stop-timeout", f"{stop_timeout:.0f}", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--loglevel", "WARNING",
        "--questions", str(args.questions), "--scenario", scenario_name, "--scenarios-file", str(args.scenarios),
        "--service-ms", f"{service_ms:.1f}", "--model", target.model, "--max-tokens", str(args.max_tokens),
        "--seed", str(args.seed), "--grace-s", str(args.grace_s), "--arrival-window-s", str(args.run_s),
        "--events-out", str(events),
    ]
    progress(f"{scenario_name} → {target.name}: {users} users, {args.run_s:.0f} s of arrivals")
    log_path = out / "locust.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=out,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            process.wait(timeout=run_time + stop_timeout + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"locust overstayed its run; its log ({log_path}) ends with:\n"
                               f"{tail(log_path)}") from None
    if process.returncode not in (0, 1):  # 1: some requests were errors, which the summary counts
        raise RuntimeError(f"locust exited with {process.returncode}; its log ({log_path}) ends with:\n"
                           f"{tail(log_path)}")
    summary = summarize(read_events(events), target=target.name, scenario=scenario_name,
                        run_s=args.run_s, service_ms=service_ms)
    progress(f"{scenario_name} → {target.name}: " + one_line(summary))
    return summary


def one_line(s: Summary) -> str:
    hit = "n/a" if s.hit_rate is None else f"{s.hit_rate:.1%}"
    return (f"{s.sent} sent, met {s.counts['met']}, missed {s.counts['missed']}, refused "
            f"{s.counts['refused']}, errors {s.counts['error']}; goodput {s.goodput_rps:.2f}/s, hit rate {hit}")


# ---- report ------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def render(summaries: list[Summary], args: argparse.Namespace, services: dict[str, float],
           service_ms: float) -> str:
    lines = [
        f"Measured {dt.datetime.now().astimezone().isoformat(timespec='minutes')} on {platform.node() or 'this host'} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}); "
        f"load average {_load_average()} at the end.",
        f"Arrival window {args.run_s:.0f} s per run, max_tokens {args.max_tokens}, temperature 0, seed "
        f"{args.seed}, questions from {args.questions}; a client waits its deadline + {args.grace_s:g} s.",
        "Service time S (one request alone, median of "
        f"{PROBE_REQUESTS}): " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in services.items())
        + f"; capacity = 1 / {service_ms:.0f} ms = {1000 / service_ms:.2f} requests/s.",
        "",
        "| scenario | target | offered req/s | goodput req/s | met | missed | refused | errors "
        "| hit rate (admitted) | p50 ms | p99 ms | timeouts | variants |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        hit = "n/a" if s.hit_rate is None else f"{s.hit_rate:.1%}"
        refused = f"{s.counts['refused']}" + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(s.refusals.items()))})" if s.refusals else "")
        variants = ", ".join(f"{k.partition(':')[2] or k} {v}" for k, v in sorted(s.variants.items())) or "—"
        lines.append(f"| {s.scenario} | {s.target} | {s.offered_rps:.2f} | {s.goodput_rps:.2f} | {s.counts['met']} "
                     f"| {s.counts['missed']} | {refused} | {s.counts['error']} | {hit} | {_ms(s.p50_ms)} "
                     f"| {_ms(s.p99_ms)} | {s.timeouts} | {variants} |")
    lines += ["", "Per deadline class (met / missed / refused / error), and how edgeserve's answers ended "
              "(`deadline`: cut at the deadline, still in time):", ""]
    for s in summaries:
        classes = "; ".join(
            f"{name} {c.get('met', 0)}/{c.get('missed', 0)}/{c.get('refused', 0)}/{c.get('error', 0)}"
            for name, c in s.by_class.items())
        finishes = ", ".join(f"{k} {v}" for k, v in sorted(s.finishes.items()))
        lines.append(f"- {s.scenario}, {s.target}: {classes}" + (f"; finish {finishes}" if finishes else ""))
    lines += ["", *verdicts(summaries)]
    return "\n".join(lines) + "\n"


def verdicts(summaries: list[Summary]) -> list[str]:
    """The issue's targets, for every scenario where both targets ran."""
    out = []
    for scenario in dict.fromkeys(s.scenario for s in summaries):
        es = next((s for s in summaries if s.scenario == scenario and s.target == EDGESERVE), None)
        base = next((s for s in summaries if s.scenario == scenario and s.target == BASELINE), None)
        if es is not None and es.hit_rate is not None:
            ok = "met" if es.hit_rate >= TARGET_HIT_RATE else "NOT met"
            out.append(f"- {scenario}: edgeserve's admitted requests met their deadline {es.hit_rate:.1%} of the "
                       f"time (target ≥ {TARGET_HIT_RATE:.0%}: {ok}).")
        if es is not None and base is not None:
            if base.goodput_rps > 0:
                ratio = es.goodput_rps / base.goodput_rps
                ok = "met" if ratio >= TARGET_GOODPUT_RATIO else "NOT met"
                target = f" (target ≥ {TARGET_GOODPUT_RATIO:g}×: {ok})" if scenario == "overload" else ""
                out.append(f"- {scenario}: goodput edgeserve / baseline = {ratio:.2f}×{target}.")
            else:
                out.append(f"- {scenario}: the baseline met no deadline; edgeserve's goodput "
                           f"{es.goodput_rps:.2f}/s.")
    return out


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ---- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def targets(args: argparse.Namespace) -> Iterator[list[Target]]:
    """edgeserve (started here unless --url) and, with --baseline, llama_cpp.server serving the
    same variant with the same n_ctx, threads and batch; both stopped on exit."""
    from edgeserve.tools.bench import edgeserve_command, llama_server_command, select_targets

    with contextlib.ExitStack() as stack:
        found: list[Target] = []
        if args.url:
            check_loopback(args.url)
            es_base = args.url.rstrip("/")
        else:
            port = free_port()
            es_base = f"http://127.0.0.1:{port}"
            progress(f"starting edgeserve on {es_base} (the first start in a cache dir calibrates)")
            stack.enter_context(server_process(
                EDGESERVE, edgeserve_command(args.models, args.cache_dir, port, args.policy), f"{es_base}/ready",
                args.out / "edgeserve.log", env={"EDGESERVE_LOG_FORMAT": "json"}, timeout_s=READY_TIMEOUT_S))
        found.append(Target(EDGESERVE, es_base, args.model))
        if args.baseline:
            (variant,) = select_targets(args.variant, argparse.Namespace(
                models=args.models, cache_dir=args.cache_dir, threads=None))
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            progress(f"starting llama_cpp.server with {variant.variant_id} on {base}")
            stack.enter_context(server_process(
                BASELINE, llama_server_command(variant.path, variant.variant, port), f"{base}/v1/models",
                args.out / "llama_server.log", timeout_s=READY_TIMEOUT_S))
            found.append(Target(BASELINE, base, variant.variant_id))
        yield found


def service_times(found: list[Target], args: argparse.Namespace, questions: list[str]) -> dict[str, float]:
    """S of the baseline and of edgeserve pinned to the same variant (routing aside)."""
    services: dict[str, float] = {}
    for target in found:
        pinned = target if target.name == BASELINE else Target(target.name, target.base, args.variant)
        ms, tokens = probe_service_ms(pinned, questions, args.max_tokens)
        services[f"{target.name} ({pinned.model}, {tokens:.0f} tokens)"] = ms
    return services


# ---- command line ------------------------------------------------------------------------------


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `edgeserve loadtest` (the subcommand is in edgeserve.cli's table)."""
    p.add_argument("--scenario", default="steady",
                   help="comma-separated scenarios of --scenarios (steady, overload, burst)")
    p.add_argument("--questions", type=Path, default=os.environ.get("EDGESERVE_LOADTEST_QUESTIONS"),
                   help="JSONL with a `question` per line, e.g. GSM8K's test.jsonl "
                        "(env EDGESERVE_LOADTEST_QUESTIONS)")
    p.add_argument("--run-time", default="60s", help="arrival window of each run: 90, 90s, 2m (default 60s)")
    p.add_argument("--users", type=int, default=0,
                   help="Locust users (default: enough for open-loop arrivals at the scenario's peak)")
    p.add_argument("--out", type=Path, required=True, help="directory for CSV, HTML, events and summary")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run every scenario against llama_cpp.server (default: yes)")
    p.add_argument("--variant", default="smollm2-135m:q4_1",
                   help="the baseline's variant; S is measured on it (default smollm2-135m:q4_1)")
    p.add_argument("--model", default="smollm2-135m",
                   help="`model` of edgeserve's requests: a family (routed) or family:variant (pinned)")
    p.add_argument("--url", help="use this running loopback edgeserve instead of starting one")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    p.add_argument("--seed", type=int, default=1, help="seed of the arrival plan (default 1)")
    p.add_argument("--grace-s", type=float, default=1.0,
                   help="a client waits at most its deadline + this long (default 1)")
    p.add_argument("--service-ms", type=float, help="skip the probe: the service time S in ms")
    p.add_argument("--scenarios", type=Path, default=LOADTESTS / "scenarios.toml", help="scenarios file")
    p.add_argument("--locustfile", type=Path, default=LOADTESTS / "locustfile.py")
    p.add_argument("--models", type=Path, default=default_models_path(), help="models file (env EDGESERVE_MODELS)")
    p.add_argument("--policy", type=Path, default=None,
                   help="edgeserve's routing policy (default: each family's own, see models.toml)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="env EDGESERVE_CACHE_DIR")


def run_loadtest(args: argparse.Namespace) -> int:
    """Run the scenarios as `args` say; prints the summary and returns an exit code."""
    try:
        args.run_s = parse_duration(args.run_time)
        if args.questions is None:
            raise EdgeserveError("give --questions (or EDGESERVE_LOADTEST_QUESTIONS): a JSONL of questions")
        questions = read_questions(args.questions)
        scenarios = load_scenarios(args.scenarios)
        names = [n.strip() for n in args.scenario.split(",") if n.strip()]
        if unknown := [n for n in names if n not in scenarios]:
            raise EdgeserveError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(scenarios)}")
        if importlib.util.find_spec("locust") is None:
            raise EdgeserveError("Locust is not installed: pip install 'edgeserve[dev]' (or locust)")
        if args.max_tokens < 1 or args.users < 0 or args.grace_s < 0:
            raise EdgeserveError("--max-tokens must be >= 1, --users and --grace-s >= 0")
    except (EdgeserveError, ValueError, OSError) as exc:
        print(f"edgeserve loadtest: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Locust runs in each run's own directory: every path it is given must be absolute.
    args.out, args.questions, args.scenarios, args.locustfile = (
        p.resolve() for p in (args.out, args.questions, args.scenarios, args.locustfile))
    summaries: list[Summary] = []
    try:
        with targets(args) as found:
            services = ({"given": args.service_ms} if args.service_ms
                        else service_times(found, args, questions))
            service_ms = args.service_ms or next(
                (ms for name, ms in services.items() if name.startswith(BASELINE)), max(services.values()))
            progress("service time: " + ", ".join(f"{k} {v:.0f} ms" for k, v in services.items()))
            for name in names:
                for target in found:
                    drain(target)
                    out = args.out / name / target.name
                    summaries.append(run_locust(target, name, scenarios[name], service_ms, args, out))
                    if target.name == EDGESERVE:
                        save_metrics(target, out / "metrics.txt")
    except (RuntimeError, EdgeserveError, httpx.HTTPError) as exc:
        print(f"edgeserve loadtest: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    report = render(summaries, args, services, service_ms)
    (args.out / "summary.md").write_text(report)
    (args.out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(summaries)))
    print(report)
    return 0


def save_metrics(target: Target, path: Path) -> None:
    with contextlib.suppress(httpx.HTTPError):
        path.write_text(httpx.get(f"{target.base}/metrics", timeout=10).text)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeserve.tools.loadtest ...`: the same command without the rest of the CLI."""
    from edgeserve.cli import build_parser

    return run_loadtest(build_parser().parse_args([COMMAND, *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
