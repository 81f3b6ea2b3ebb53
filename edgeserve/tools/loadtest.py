"""`edgeserve loadtest`: Locust scenarios against edgeserve and, side by side, its baselines:
`python -m llama_cpp.server` and (with --llama-server PATH) llama.cpp's own `llama-server` with
the variant's `parallel` slots and continuous batching, on the same model file and threads.

Runs one server process at a time: for every scenario, each target in turn is started on a free
loopback port (edgeserve: or --url, a loopback edgeserve already running), warmed up, loaded
headless with Locust in a subprocess (gevent must not patch this process) and stopped. The
service time S of one request alone at --max-tokens (capacity = 1 / S) is measured on the first
target started — llama_cpp.server on --variant, else llama-server, else edgeserve pinned to it —
and every target gets the same seeded arrivals, deadlines and questions. Neither baseline knows
deadlines: a response meets its deadline when the client has it complete within it, for every
target alike. Every run is bounded: the arrival window is --run-time, a client waits at most its
deadline + --grace-s, and Locust is killed if it overstays. Writes, under --out:

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec

from edgeserve.config import default_cache_dir, default_models_path
from edgeserve.errors import EdgeserveError
from edgeserve.tools.loadplan import (
    Scenario,
    Summary,
    load_scenarios,
    read_events,
    read_questions,
    summarize,
    users_needed,
)
from edgeserve.tools.processes import free_port, server_process, tail

COMMAND = "loadtest"
LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
READY_TIMEOUT_S = 900.0  # a first start calibrates every variant
PROBE_REQUESTS = 3
DRAIN_TIMEOUT_S = 600.0
TARGET_GOODPUT_RATIO = 2.0  # overload goodput, edgeserve / each baseline (issue 13: llama-server; issue 5)
TARGET_HIT_RATE = 0.99
TARGET_PREDICTION_ERROR = 0.10  # mean, answers that ran their whole budget
EDGESERVE, BASELINE, LLAMA_SERVER = "edgeserve", "llama_cpp.server", "llama-server"
BASELINES = (LLAMA_SERVER, BASELINE)  # in the order the report compares them
# Sent explicitly (as the locustfile does): llama_cpp.server's default is 1.1, edgeserve's 1.0,
# and with greedy sampling the same prompt must give the same tokens on both.
REPEAT_PENALTY = 1.0


def progress(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    name: str  # EDGESERVE, BASELINE or LLAMA_SERVER
    base: str  # http://127.0.0.1:PORT
    model: str  # the `model` field of the requests


@dataclass(frozen=True)
class Server:
    """How to start one target (no command: edgeserve at --url, already running)."""

    name: str
    model: str
    command: Callable[[int], list[str]] | None = None  # the command line, given the port
    ready_path: str = "/ready"
    env: dict[str, str] | None = None
    url: str | None = None


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
           service_ms: float, setup: list[str] | None = None) -> str:
    lines = [
        f"Measured {dt.datetime.now().astimezone().isoformat(timespec='minutes')} on {platform.node() or 'this host'} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}); "
        f"load average {_load_average()} at the end.",
        f"Arrival window {args.run_s:.0f} s per run, max_tokens {args.max_tokens}, temperature 0, seed "
        f"{args.seed}, questions from {args.questions}; a client waits its deadline + {args.grace_s:g} s.",
        "Service time S (one request alone, median of "
        f"{PROBE_REQUESTS}): " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in services.items())
        + f"; capacity = 1 / {service_ms:.0f} ms = {1000 / service_ms:.2f} requests/s.",
        *(setup or []),
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


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def verdicts(summaries: list[Summary]) -> list[str]:
    """The issues' targets, per scenario: edgeserve's hit rate of admitted requests, its goodput
    over each baseline's (judged under overload), its prediction error on answers that ran their
    whole budget."""
    out = []
    for scenario in dict.fromkeys(s.scenario for s in summaries):
        ran = {s.target: s for s in summaries if s.scenario == scenario}
        es = ran.get(EDGESERVE)
        if es is None:
            continue
        if es.hit_rate is not None:
            out.append(f"- {scenario}: edgeserve's admitted requests met their deadline {es.hit_rate:.1%} of the "
                       f"time (target ≥ {TARGET_HIT_RATE:.0%}: {_verdict(es.hit_rate >= TARGET_HIT_RATE)}).")
        for name in BASELINES:
            base = ran.get(name)
            if base is None:
                continue
            if base.goodput_rps > 0:
                ratio = es.goodput_rps / base.goodput_rps
                target = (f" (target ≥ {TARGET_GOODPUT_RATIO:g}×: {_verdict(ratio >= TARGET_GOODPUT_RATIO)})"
                          if scenario == "overload" else "")
                out.append(f"- {scenario}: goodput edgeserve / {name} = {es.goodput_rps:.2f} / "
                           f"{base.goodput_rps:.2f} = {ratio:.2f}×{target}.")
            else:
                out.append(f"- {scenario}: {name} met no deadline; edgeserve's goodput {es.goodput_rps:.2f}/s.")
        if es.whole_budget_error is not None:
            ok = _verdict(es.whole_budget_error <= TARGET_PREDICTION_ERROR)
            out.append(f"- {scenario}: edgeserve's latency prediction error on answers that ran their whole budget "
                       f"{es.whole_budget_error:.1%} (n = {es.whole_budget_n}; target ≤ "
                       f"{TARGET_PREDICTION_ERROR:.0%}: {ok}).")
    return out


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ---- servers -----------------------------------------------------------------------------------


def servers(args: argparse.Namespace) -> list[Server]:
    """The targets in the order they run in every scenario: the baselines first
    (the first one's probe defines S), edgeserve last. The baselines serve --variant's GGUF with
    its n_ctx, threads and batch; llama-server gets the variant's `parallel` slots of n_ctx each
    (-c n_ctx × parallel) and continuous batching, as `edgeserve bench --concurrency` starts it."""
    from edgeserve.tools.bench import edgeserve_command, llama_server_command, native_llama_server_command

    found: list[Server] = []
    if args.baseline or args.llama_server is not None:
        t = args.target  # the resolved --variant: family, variant config and GGUF path
        if args.baseline:
            found.append(Server(BASELINE, t.variant_id,
                                lambda port: llama_server_command(t.path, t.variant, port), "/v1/models"))
        if args.llama_server is not None:
            binary = args.llama_server
            found.append(Server(LLAMA_SERVER, t.variant_id, lambda port: native_llama_server_command(
                binary, t.path, t.variant, t.variant.parallel, port), "/health"))
    if args.url:
        found.append(Server(EDGESERVE, args.model, url=args.url.rstrip("/")))
    else:
        found.append(Server(EDGESERVE, args.model,
                            lambda port: edgeserve_command(args.models, args.cache_dir, port, args.policy),
                            "/ready", {"EDGESERVE_LOG_FORMAT": "json"}))
    return found


@contextlib.contextmanager
def started(server: Server, log_path: Path) -> Iterator[Target]:
    """The server running on a free loopback port (or the one at --url), stopped on exit."""
    if server.url is not None:
        yield Target(server.name, server.url, server.model)
        return
    assert server.command is not None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    progress(f"starting {server.name} on {base}")
    with server_process(server.name, server.command(port), base + server.ready_path, log_path, env=server.env,
                        timeout_s=READY_TIMEOUT_S):
        yield Target(server.name, base, server.model)


def setup_lines(args: argparse.Namespace, found: list[Server]) -> list[str]:
    """What ran, for the report."""
    lines = []
    names = [s.name for s in found]
    lines.append("Targets, one server process at a time, in this order in every scenario: " + ", ".join(names) + ".")
    es = next(s for s in found if s.name == EDGESERVE)
    lines.append(f"edgeserve: {'--url ' + es.url if es.url else f'models {args.models}'}, requests for `{args.model}`"
                 " (deadline in X-Deadline-Ms).")
    if BASELINE in names or LLAMA_SERVER in names:
        t = args.target
        lines.append(f"Baselines on {t.variant_id} ({t.path.name}): n_ctx {t.variant.n_ctx}, "
                     f"{t.variant.threads} threads, batch {t.variant.n_batch}; no deadlines (a response counts "
                     "as met when the client has it complete within its deadline).")
    if LLAMA_SERVER in names:
        from edgeserve.tools.bench import llama_server_version

        t = args.target
        lines.append(f"llama-server: `{args.llama_server}` ({llama_server_version(args.llama_server)}), --parallel "
                     f"{t.variant.parallel} -c {t.variant.n_ctx * t.variant.parallel} --cont-batching.")
    return lines


def service_time(target: Target, args: argparse.Namespace, questions: list[str]) -> tuple[str, float]:
    """S of a baseline, or of edgeserve pinned to the baseline's variant (routing aside)."""
    pinned = target if target.name != EDGESERVE else Target(target.name, target.base, args.variant)
    ms, tokens = probe_service_ms(pinned, questions, args.max_tokens)
    return f"{target.name} ({pinned.model}, {tokens:.0f} tokens)", ms


def warm_up(target: Target) -> None:
    with httpx.Client(base_url=target.base, timeout=DRAIN_TIMEOUT_S) as client:
        chat(client, target.model, "Say OK.", 4)


# ---- command line ------------------------------------------------------------------------------


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `edgeserve loadtest` (the subcommand is in edgeserve.cli's table)."""
    p.add_argument("--scenario", default="steady",
                   help="comma-separated scenarios of --scenarios (steady, overload, burst)")
    p.add_argument("--questions", type=Path,
                   default=Path(os.environ.get("EDGESERVE_LOADTEST_QUESTIONS") or LOADTESTS / "questions.jsonl"),
                   help="JSONL with a `question` per line, e.g. GSM8K's test.jsonl (env "
                        "EDGESERVE_LOADTEST_QUESTIONS; default: the short questions in loadtests/questions.jsonl)")
    p.add_argument("--run-time", default="60s", help="arrival window of each run: 90, 90s, 2m (default 60s)")
    p.add_argument("--users", type=int, default=0,
                   help="Locust users (default: enough for open-loop arrivals at the scenario's peak)")
    p.add_argument("--out", type=Path, required=True, help="directory for CSV, HTML, events and summary")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run every scenario against llama_cpp.server (default: yes)")
    p.add_argument("--llama-server", type=Path, metavar="PATH",
                   help="also run every scenario against llama.cpp's llama-server binary at PATH: the variant's "
                        "`parallel` slots (-c n_ctx × parallel), --cont-batching, the same GGUF and threads")
    p.add_argument("--variant", default="smollm2-135m:q4_1",
                   help="the baselines' variant; S is measured on it (default smollm2-135m:q4_1)")
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
        questions = read_questions(args.questions)
        scenarios = load_scenarios(args.scenarios)
        names = [n.strip() for n in args.scenario.split(",") if n.strip()]
        if unknown := [n for n in names if n not in scenarios]:
            raise EdgeserveError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(scenarios)}")
        if importlib.util.find_spec("locust") is None:
            raise EdgeserveError("Locust is not installed: pip install 'edgeserve[dev]' (or locust)")
        if args.max_tokens < 1 or args.users < 0 or args.grace_s < 0:
            raise EdgeserveError("--max-tokens must be >= 1, --users and --grace-s >= 0")
        binary = args.llama_server
        if binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
            raise EdgeserveError(f"--llama-server {args.llama_server} is not an executable file")
        if args.url:
            check_loopback(args.url)
        if args.baseline or args.llama_server is not None:
            from edgeserve.tools.bench import select_targets

            (args.target,) = select_targets(args.variant, argparse.Namespace(
                models=args.models, cache_dir=args.cache_dir, threads=None))
    except (EdgeserveError, ValueError, KeyError, OSError) as exc:
        print(f"edgeserve loadtest: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Locust runs in each run's own directory: every path it is given must be absolute.
    args.out, args.questions, args.scenarios, args.locustfile = (
        p.resolve() for p in (args.out, args.questions, args.scenarios, args.locustfile))
    found = servers(args)
    summaries: list[Summary] = []
    services: dict[str, float] = {"given": args.service_ms} if args.service_ms else {}
    service_ms: float = args.service_ms or 0.0
    try:
        for index, name in enumerate(names):
            for server in found:
                out = args.out / name / server.name
                out.mkdir(parents=True, exist_ok=True)
                with started(server, out / "server.log") as target:
                    if index == 0 and not args.service_ms:
                        label, ms = service_time(target, args, questions)
                        services[label] = ms
                        service_ms = service_ms or ms  # the first target's S makes the plan
                        progress(f"service time of {label}: {ms:.0f} ms")
                    else:
                        warm_up(target)
                    if server.url is not None:
                        drain(target)  # what earlier runs left queued on a server not started here
                    summaries.append(run_locust(target, name, scenarios[name], service_ms, args, out))
                    if target.name == EDGESERVE:
                        save_metrics(target, out / "metrics.txt")
    except (RuntimeError, EdgeserveError, httpx.HTTPError) as exc:
        print(f"edgeserve loadtest: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    report = render(summaries, args, services, service_ms, setup_lines(args, found))
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
