"""`edgeserve bench-routing`: does the deadline router predict latency and keep its deadlines?

Starts its own `edgeserve serve` on a free loopback port (stopped in every case), waits for
/ready, then sends N chat requests (one after another, or --concurrency K at a time) whose user
text is 20–600 tokens of varied filler (every prompt opens differently, so none reuses another's
KV cache beyond the chat template's system line) and whose X-Deadline-Ms is drawn log-uniformly
from 100 ms to 10 s (--seed). For every request it records what the server decided and what
happened, then reports:

* prediction error of total latency: |predicted − actual| / actual over admitted requests
  (actual = the server's actual_ms minus its measured queue_ms, which predicted_ms does not cover;
  the two are equal at concurrency 1), as MAPE, median and p90 — over all admitted requests,
  over those not cut at the deadline, over those that ran their whole budget (finish `length`),
  and "token-adjusted" over all (the prediction rescaled to the tokens really sampled; see
  ``adjusted_prediction_ms``). predicted_ms is the time of the whole budget, so a request that
  stops early (end of sequence) ends before it by design, while one cut at the deadline ran
  *slower* than predicted and is stopped before its error shows in full: only the whole-budget
  and the token-adjusted figures measure the cost model;
* the share of admitted requests that met their deadline (server- and client-side), refusals,
  variant shares;
* where the time went (prefill, decode, overhead) against the stored profiles, and whether the
  first requests after start-up are worse;
* the policy's decision time (``routing.policy.choose`` in-process, with the profiles the server
  stored) and the simulator's crossover deadline for the study's policy file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from edgeserve.config import default_cache_dir, default_models_path, load_models_file
from edgeserve.errors import EdgeserveError
from edgeserve.policies import load_policy
from edgeserve.routing.costs import CostProfile, decode_steps_ms, predict_ms, prefill_ms
from edgeserve.routing.policy import RoutingRequest, VariantCandidate, choose, format_ms
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.routing.simulator import crossover_deadline, variant_label
from edgeserve.routing.stats import percentile
from edgeserve.runtime.calibrate import host_name
from edgeserve.tools.processes import free_port, server_process
from edgeserve.tools.simulate import candidates_from, load_profiles

COMMAND = "bench-routing"
READY_TIMEOUT_S = 900.0  # a first start calibrates every variant, slowly on a busy board
REQUEST_TIMEOUT_S = 180.0
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 20, 600
MIN_DEADLINE_MS, MAX_DEADLINE_MS = 100.0, 10_000.0
TOKENS_PER_WORD = 1.26  # SmolLM2's tokenizer on the filler below (measured on seed 1)
TARGET_MAPE = 0.10
TARGET_MET = 0.99
EARLY_REQUESTS = 10  # "the first requests after start" in the warm-up comparison

NAMES = ("Ada", "Bram", "Celia", "Dorian", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas",
         "Kaito", "Lena", "Mirela", "Noor", "Otto", "Priya", "Quentin", "Rosa", "Sven", "Talia")
PLACES = ("Harwich", "Tromsø", "Valparaíso", "Lüderitz", "Hobart", "Galway", "Split", "Nome",
          "Ushuaia", "Stavanger", "Kochi", "Halifax", "Bergen", "Dunedin", "Visby", "Oban")
SENTENCES = (
    "The committee met on Tuesday to review the harbour accounts and the new ferry timetable.",
    "Repairs to the north pier ran two weeks late because the timber arrived warped.",
    "Lena planted tomatoes, beans and three rows of late carrots before the rain came in.",
    "The night train to the coast now stops at every village, which doubles the journey.",
    "A bakery on the square sells rye loaves until noon and cinnamon buns after that.",
    "Volunteers counted 212 seabirds on the cliffs, fewer than last spring.",
    "The observatory opened its dome for the meteor shower, but clouds covered the sky by ten.",
    "Our kitchen scale reads 40 grams too heavy, so every recipe came out a little dry.",
    "The museum moved its collection of ship models to the ground floor for the winter.",
    "Two fishing boats returned early after the forecast warned of a northerly gale.",
    "The school choir practised a four-part arrangement of an old sailors' song.",
    "A cyclist measured the hill road at 7.4 kilometres with an average gradient of six percent.",
    "The library extended its opening hours on Thursdays and added a small reading room.",
    "Farmers reported that the late frost damaged about a third of the apple blossom.",
    "The lighthouse keeper logged wind speed, visibility and passing ships every four hours.",
    "A new bus line connects the hospital with the railway station every twenty minutes.",
    "The town council voted to replace the streetlights with low-energy lamps next year.",
    "The chess club's spring tournament had 36 players and ended in a three-way tie.",
    "Beekeepers harvested less honey than usual after a cold and windy June.",
    "The ferry company raised prices by eight percent and promised a second summer crossing.",
    "Students built a weather station from spare parts and posted the readings online.",
    "The old mill was converted into a workshop where people repair bicycles and radios.",
    "A storm in March tore the roof off the boathouse and scattered the oars along the beach.",
    "The market now opens on Saturdays at seven, an hour earlier than before.",
    "An engineer explained that the bridge expands by several centimetres on hot days.",
    "The pottery class fired forty bowls, and only two cracked in the kiln.",
    "Hikers found the mountain hut stocked with firewood, tea and a visitors' book from 1987.",
    "The harbour master asked every skipper to report their fuel use for the annual survey.",
    "A choir from the next valley sang at the festival, and the square was full until midnight.",
    "The water company found a leak under the main road and closed one lane for a week.",
)
QUESTIONS = (
    "Summarise the notes above in two sentences.",
    "Which event above would cost the town the most money, and why?",
    "List three facts from the notes and say which one surprised you.",
    "Write a short headline for each paragraph above.",
    "What should the town council do first? Answer briefly.",
    "How many numbers appear in the notes? Add them up and give the total.",
    "Turn the notes into a polite email to the mayor.",
    "Which of these notes are about the weather? Explain in one line each.",
)


# ---- the plan: prompts and deadlines ------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    target_prompt_tokens: int  # of the user text; the template, style and hint add ~60 more
    deadline_ms: int
    messages: list[dict[str, str]]


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def filler_text(rng: random.Random, index: int, n_words: int) -> str:
    """About ``n_words`` words of notes that open with a sentence unique to this request."""
    opener = (f"Note {index + 1} from {rng.choice(NAMES)} in {rng.choice(PLACES)}, "
              f"day {rng.randint(1, 365)}:")
    words = opener.split()
    while len(words) < n_words:
        words += rng.choice(SENTENCES).split()
    return " ".join(words[:max(n_words, len(opener.split()))])


def plan_requests(n: int, seed: int) -> list[PlannedRequest]:
    """``n`` requests: user text of uniformly 20–600 tokens (estimated), deadlines log-uniform
    in 100 ms – 10 s; the same seed gives the same requests."""
    rng = random.Random(seed)
    plans = []
    for index in range(n):
        tokens = rng.randint(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS)
        deadline = round(log_uniform(rng, MIN_DEADLINE_MS, MAX_DEADLINE_MS))
        question = rng.choice(QUESTIONS)
        words = max(1, round(tokens / TOKENS_PER_WORD) - len(question.split()))
        content = f"{filler_text(rng, index, words)}\n\n{question}"
        plans.append(PlannedRequest(index, tokens, deadline, [{"role": "user", "content": content}]))
    return plans


# ---- one request --------------------------------------------------------------------------


@dataclass
class Row:
    """One request and what happened to it (one JSONL line). Times in ms; ``sent_s`` is seconds
    since the first request was sent. Server fields are None for refused or failed requests."""

    index: int
    status: int
    deadline_ms: int
    client_ms: float
    sent_s: float
    target_prompt_tokens: int
    error_code: str | None = None
    variant: str | None = None
    predicted_ms: float | None = None
    actual_ms: float | None = None
    queue_ms: float | None = None
    budget_tokens: int | None = None
    hint_tokens: int | None = None
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ms: float | None = None
    decode_ms: float | None = None
    reason: str | None = None

    @property
    def admitted(self) -> bool:
        return self.status == 200 and self.actual_ms is not None and self.predicted_ms is not None


def row_from_response(plan: PlannedRequest, status: int, body: Any, client_ms: float,
                      sent_s: float) -> Row:
    row = Row(index=plan.index, status=status, deadline_ms=plan.deadline_ms, client_ms=client_ms,
              sent_s=sent_s, target_prompt_tokens=plan.target_prompt_tokens)
    if not isinstance(body, dict):
        return row
    if status != 200:
        error = body.get("error") or {}
        row.error_code = error.get("code") if isinstance(error, dict) else None
        return row
    info, timings = body.get("edgeserve") or {}, body.get("timings") or {}
    row.variant = info.get("variant")
    row.predicted_ms = info.get("predicted_ms")
    row.actual_ms = info.get("actual_ms")
    row.queue_ms = info.get("queue_ms")
    row.budget_tokens = info.get("budget_tokens")
    row.hint_tokens = info.get("hint_tokens")
    row.finish = info.get("finish")
    row.reason = info.get("reason")
    row.prompt_tokens = timings.get("prompt_n")
    row.completion_tokens = timings.get("predicted_n")
    row.prompt_ms = timings.get("prompt_ms")
    row.decode_ms = timings.get("predicted_ms")
    return row


def send(client: httpx.Client, plan: PlannedRequest, model: str, max_tokens: int,
         started: float) -> Row:
    body = {"model": model, "messages": plan.messages, "max_tokens": max_tokens,
            "temperature": 0.0}
    headers = {"X-Deadline-Ms": str(plan.deadline_ms)}
    sent = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    client_ms = (time.perf_counter() - sent) * 1000
    try:
        payload: Any = response.json()
    except ValueError:
        payload = None
    return row_from_response(plan, response.status_code, payload, client_ms, sent - started)


def run_requests(base_url: str, plans: Sequence[PlannedRequest], *, model: str, max_tokens: int,
                 concurrency: int, progress: Callable[[Row], None]) -> list[Row]:
    """Send every planned request, at most ``concurrency`` at a time, in plan order."""
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:

        def one(plan: PlannedRequest) -> Row:
            row = send(client, plan, model, max_tokens, started)
            progress(row)
            return row

        return list(pool.map(one, plans))


# ---- statistics (pure) ----------------------------------------------------------------------


def ape(predicted: float, actual: float) -> float:
    """Absolute percentage error as a fraction (0.1 = 10 %)."""
    return abs(predicted - actual) / actual if actual > 0 else math.inf


@dataclass(frozen=True)
class ErrorStats:
    n: int
    mape: float
    median: float
    p90: float
    bias: float  # median of (predicted − actual) / actual: > 0 means over-predicted


def error_stats(pairs: Sequence[tuple[float, float]]) -> ErrorStats | None:
    """Statistics of (predicted, actual) pairs; None when there are none."""
    usable = [(p, a) for p, a in pairs if a > 0]
    if not usable:
        return None
    errors = [ape(p, a) for p, a in usable]
    signed = [(p - a) / a for p, a in usable]
    return ErrorStats(len(errors), statistics.fmean(errors), statistics.median(errors),
                      percentile(errors, 90), statistics.median(signed))


def service_ms(row: Row) -> float:
    """The server-side time the prediction covers: actual_ms minus the measured queue wait."""
    assert row.actual_ms is not None
    return row.actual_ms - (row.queue_ms or 0.0)


def sampled_tokens(row: Row) -> int:
    """Tokens the model sampled: the completion plus the end-of-sequence token when it stopped
    (that token costs a decode step too; these requests use no stop strings)."""
    return (row.completion_tokens or 0) + (1 if row.finish == "stop" else 0)


def profile_for(row: Row, profiles: dict[str, CostProfile]) -> CostProfile | None:
    return profiles.get(row.variant or "")


def drift(row: Row, profile: CostProfile) -> float | None:
    """How far the server's live profile (EWMA) had moved from the stored one when it decided:
    its predicted_ms over what the stored profile predicts for the same prompt and budget."""
    if row.predicted_ms is None or row.prompt_tokens is None or not row.budget_tokens:
        return None
    stored = predict_ms(profile, row.prompt_tokens, row.budget_tokens)
    return row.predicted_ms / stored if stored > 0 else None


def adjusted_prediction_ms(row: Row, profile: CostProfile) -> float | None:
    """The decision's prediction rescaled from the budget to the tokens really sampled:
    predicted_ms × stored(prompt, sampled) / stored(prompt, budget). Exact when the EWMA has
    scaled prefill and decode alike; a request that stops early is then judged on what it ran."""
    factor = drift(row, profile)
    if factor is None or row.prompt_tokens is None:
        return None
    return factor * predict_ms(profile, row.prompt_tokens, max(sampled_tokens(row), 1))


@dataclass(frozen=True)
class Parts:
    """One admitted request taken apart: observed / predicted prefill and decode (stored profile
    × the decision's drift; None when that part did not run) and the time outside llama.cpp."""

    prompt_tokens: int
    drift: float
    prefill_ratio: float | None
    decode_ratio: float | None
    overhead_ms: float


def parts_of(row: Row, profiles: dict[str, CostProfile]) -> Parts | None:
    profile = profile_for(row, profiles)
    factor = None if profile is None else drift(row, profile)
    if profile is None or factor is None or row.prompt_tokens is None:
        return None
    prefill_ratio = None
    if row.prompt_ms:
        prefill_ratio = row.prompt_ms / (factor * prefill_ms(profile, row.prompt_tokens))
    decode_ratio = None
    steps = sampled_tokens(row) - 1
    if steps > 0 and row.decode_ms:
        decode_ratio = row.decode_ms / (factor * decode_steps_ms(profile, row.prompt_tokens, steps))
    overhead = service_ms(row) - (row.prompt_ms or 0.0) - (row.decode_ms or 0.0)
    return Parts(row.prompt_tokens, factor, prefill_ratio, decode_ratio, overhead)


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    p10: float
    p90: float


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return Spread(len(values), statistics.median(values), percentile(values, 10), percentile(values, 90))


@dataclass(frozen=True)
class Components:
    """Where the time went, over a set of admitted requests (see ``Parts``)."""

    prefill: Spread | None
    decode: Spread | None
    overhead_ms: Spread | None
    drift_first: float
    drift_last: float


def components(parts: Sequence[Parts]) -> Components | None:
    if not parts:
        return None
    return Components(
        prefill=spread([p.prefill_ratio for p in parts if p.prefill_ratio is not None]),
        decode=spread([p.decode_ratio for p in parts if p.decode_ratio is not None]),
        overhead_ms=spread([p.overhead_ms for p in parts]),
        drift_first=parts[0].drift,
        drift_last=parts[-1].drift,
    )


PROMPT_BINS = ((0, 200), (200, 400), (400, 10_000))


def components_by_prompt(parts: Sequence[Parts]) -> list[tuple[str, Components]]:
    """``components`` per prompt-size bin: does the error depend on the prompt length?"""
    result = []
    for low, high in PROMPT_BINS:
        chosen = components([p for p in parts if low <= p.prompt_tokens < high])
        if chosen is not None:
            result.append((f"{low}–{high - 1}" if high < 10_000 else f"≥ {low}", chosen))
    return result


@dataclass(frozen=True)
class Summary:
    requests: int
    admitted: int
    refused: int
    failed: int
    refusal_codes: dict[str, int]
    errors_all: ErrorStats | None
    errors_not_cut: ErrorStats | None
    errors_full_budget: ErrorStats | None
    errors_adjusted: ErrorStats | None  # every admitted request, rescaled to its tokens
    errors_early: ErrorStats | None  # the same, first EARLY_REQUESTS admitted
    errors_late: ErrorStats | None  # the same, the rest
    met_server: float | None
    met_client: float | None
    finishes: dict[str, int]
    variant_shares: dict[str, float]
    prompt_tokens_range: tuple[int, int] | None
    components: Components | None
    components_by_prompt: list[tuple[str, Components]]


def summarise(rows: Sequence[Row], profiles: dict[str, CostProfile]) -> Summary:
    admitted = [r for r in rows if r.admitted]
    refused = [r for r in rows if r.status == 429]
    not_cut = [r for r in admitted if r.finish != "deadline"]
    full = [r for r in admitted if r.finish == "length"]

    def raw(subset: Sequence[Row]) -> ErrorStats | None:
        return error_stats([(r.predicted_ms or 0.0, service_ms(r)) for r in subset])

    def adjusted(subset: Sequence[Row]) -> ErrorStats | None:
        pairs = []
        for r in subset:
            profile = profile_for(r, profiles)
            prediction = None if profile is None else adjusted_prediction_ms(r, profile)
            if prediction is not None:
                pairs.append((prediction, service_ms(r)))
        return error_stats(pairs)

    with_deadline = [r for r in admitted if r.deadline_ms]
    met_server = [(r.actual_ms or 0.0) <= r.deadline_ms for r in with_deadline]
    met_client = [r.client_ms <= r.deadline_ms for r in with_deadline]
    variants = Counter(r.variant or "?" for r in admitted)
    prompt_sizes = [r.prompt_tokens for r in admitted if r.prompt_tokens is not None]
    parts = [p for p in (parts_of(r, profiles) for r in admitted) if p is not None]
    return Summary(
        requests=len(rows),
        admitted=len(admitted),
        refused=len(refused),
        failed=len(rows) - len(admitted) - len(refused),
        refusal_codes=dict(Counter(r.error_code or "?" for r in refused)),
        errors_all=raw(admitted),
        errors_not_cut=raw(not_cut),
        errors_full_budget=raw(full),
        errors_adjusted=adjusted(admitted),
        errors_early=adjusted(admitted[:EARLY_REQUESTS]),
        errors_late=adjusted(admitted[EARLY_REQUESTS:]),
        met_server=statistics.fmean(met_server) if met_server else None,
        met_client=statistics.fmean(met_client) if met_client else None,
        finishes=dict(Counter(r.finish or "?" for r in admitted)),
        variant_shares={v: n / len(admitted) for v, n in sorted(variants.items())},
        prompt_tokens_range=(min(prompt_sizes), max(prompt_sizes)) if prompt_sizes else None,
        components=components(parts),
        components_by_prompt=components_by_prompt(parts),
    )


# ---- the policy's decision time and the study's crossover ------------------------------------


def decision_requests(n: int, seed: int, prompt_sizes: Sequence[int]) -> list[RoutingRequest]:
    """Requests shaped like the benchmark's: its prompt sizes (or 20–600), log-uniform deadlines."""
    rng = random.Random(seed)
    sizes = list(prompt_sizes) or list(range(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS + 1))
    return [RoutingRequest(prompt_tokens=rng.choice(sizes), requested_max_tokens=256,
                           deadline_ms=log_uniform(rng, MIN_DEADLINE_MS, MAX_DEADLINE_MS))
            for _ in range(n)]


def decision_times_us(requests: Sequence[RoutingRequest], candidates: Sequence[VariantCandidate],
                      policy: PolicyFile) -> list[float]:
    """Wall time of each ``choose`` call (µs), empty queue."""
    times = []
    clock = time.perf_counter_ns
    for request in requests:
        start = clock()
        choose(request, candidates, policy, 0.0)
        times.append((clock() - start) / 1000)
    return times


def stored_profiles(cache_dir: Path, variant_ids: Sequence[str]) -> dict[str, CostProfile]:
    """The profiles the server stored for these variants on this host (the newest per variant)."""
    found: dict[str, tuple[float, CostProfile]] = {}
    host = host_name()
    for path in sorted((cache_dir / "profiles").glob("*.json")):
        try:
            profile = msgspec.json.decode(path.read_bytes(), type=CostProfile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue  # hashes.json and foreign files
        if profile.variant_id not in variant_ids or profile.host != host:
            continue
        mtime = path.stat().st_mtime
        if profile.variant_id not in found or mtime > found[profile.variant_id][0]:
            found[profile.variant_id] = (mtime, profile)
    return {variant_id: profile for variant_id, (_, profile) in found.items()}


def served_candidates(models_path: Path, profiles: dict[str, CostProfile]) -> list[VariantCandidate]:
    """What the server's policy sees: every configured variant with a stored profile."""
    models = load_models_file(models_path)
    candidates = []
    for family in models.families:
        for variant in family.variants:
            variant_id = f"{family.name}:{variant.name}"
            if variant_id in profiles:
                candidates.append(VariantCandidate(variant_id=variant_id, name=variant.name,
                                                   profile=profiles[variant_id], n_ctx=variant.n_ctx))
    return candidates


@dataclass(frozen=True)
class Crossover:
    label: str
    fast: str
    slow: str
    deadline_ms: float | None


STUDY_CASES = (("boxed, hint on (default)", "boxed", True), ("boxed, hint off", "boxed", False),
               ("aav, hint on", "aav", True))


def study_crossovers(policy_path: Path, profile_path: Path, prompt_tokens: int = 150
                     ) -> list[Crossover]:
    """The simulator's crossover deadline for the study's policy file, as `edgeserve simulate`
    computes it (empty queue, 4096-token contexts)."""
    policy = load_policy(policy_path)
    candidates = candidates_from(load_profiles(profile_path), 4096)
    by_speed = sorted(candidates, key=lambda c: c.profile.decode_ms_per_token)
    fast, slow = variant_label(by_speed[0].variant_id), variant_label(by_speed[-1].variant_id)
    results = []
    for label, style, hint in STUDY_CASES:
        if style not in policy.styles:
            continue
        deadline = crossover_deadline(policy, candidates, prompt_tokens, fast=fast, slow=slow,
                                      style=style, hint=hint)
        results.append(Crossover(label, fast, slow, deadline))
    return results


# ---- the server -------------------------------------------------------------------------------


@contextlib.contextmanager
def edgeserve_server(args: argparse.Namespace, log_path: Path) -> Iterator[tuple[str, float]]:
    """A `python -m edgeserve.cli serve` on a free loopback port; yields (base URL, seconds to
    ready) and always stops the process."""
    port = free_port()
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(args.models),
               "--cache-dir", str(args.cache_dir), "--policy", str(args.policy),
               "--host", "127.0.0.1", "--port", str(port)]
    progress(f"starting {' '.join(command)} (log {log_path})")
    base_url = f"http://127.0.0.1:{port}"
    with server_process("edgeserve", command, f"{base_url}/ready", log_path,
                        env={"EDGESERVE_LOG_FORMAT": "json"}, timeout_s=READY_TIMEOUT_S) as server:
        yield base_url, server.ready_s


# ---- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    date: str
    machine: str
    load_before: float
    load_after: float
    ready_s: float
    command: str


def environment(ready_s: float, load_before: float, command: str) -> Environment:
    cpus = os.cpu_count() or 0
    machine = f"{platform.machine()}, {cpus} cores, Python {platform.python_version()}"
    return Environment(dt.date.today().isoformat(), machine, load_before, os.getloadavg()[0],
                       ready_s, command)


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f} %"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def error_line(label: str, stats: ErrorStats | None) -> str:
    if stats is None:
        return f"| {label} | 0 | n/a | n/a | n/a | n/a |"
    return (f"| {label} | {stats.n} | {pct(stats.mape)} | {pct(stats.median)} | {pct(stats.p90)} "
            f"| {stats.bias * 100:+.1f} % |")


def report_markdown(summary: Summary, decision_us: Sequence[float], crossovers: Sequence[Crossover],
                    env: Environment, args: argparse.Namespace) -> str:
    s = summary
    lines = [
        "## Deadline routing (issue 3)",
        "",
        f"`{env.command}` — {env.date}; {env.machine} (2 shared cores; other engineers' tests "
        f"running: 1-min load {env.load_before:.2f} before, {env.load_after:.2f} after); "
        f"family from `{args.models}`, policy `{args.policy}`, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, temperature 0; server ready (load + calibration) in "
        f"{env.ready_s:.0f} s.",
        "",
        f"{s.requests} requests: user text 20–600 tokens (whole prompt with template, style and "
        f"hint: {_range(s.prompt_tokens_range)} tokens), deadlines log-uniform 100 ms – 10 s.",
        "",
        "| figure | target | measured | |",
        "|---|---|---|---|",
        _target_line("prediction error (MAPE), requests that ran their whole budget",
                     s.errors_full_budget),
        _target_line("prediction error (MAPE), all admitted, rescaled to the tokens sampled",
                     s.errors_adjusted),
        f"| admitted requests that met their deadline (server-side) | ≥ 99 % | {pct(s.met_server)} | "
        f"{verdict(s.met_server is not None and s.met_server >= TARGET_MET)} |",
        f"| … client-side (send → last byte) | | {pct(s.met_client)} | |",
        f"| refused (429 {', '.join(sorted(s.refusal_codes)) or 'deadline_infeasible'}) | | "
        f"{s.refused} of {s.requests} ({pct(s.refused / s.requests if s.requests else None)}) | |",
        f"| policy decision time (`choose`, {len(decision_us)} calls) | | median "
        f"{statistics.median(decision_us):.0f} µs, p99 {percentile(decision_us, 99):.0f} µs | |",
        "",
        "Prediction error of total latency, |predicted − actual| / actual (actual = server-side "
        "actual_ms − queue_ms); bias = median signed error, > 0 means over-predicted:",
        "",
        "| admitted requests | n | MAPE | median | p90 | bias |",
        "|---|---|---|---|---|---|",
        error_line("all", s.errors_all),
        error_line("not cut at the deadline (finish ≠ deadline)", s.errors_not_cut),
        error_line("ran the whole budget (finish = length)", s.errors_full_budget),
        error_line("all, prediction rescaled to the tokens sampled", s.errors_adjusted),
        error_line(f"… of these the first {EARLY_REQUESTS} after start", s.errors_early),
        error_line("… the rest", s.errors_late),
        "",
        f"Finishes: {_counts(s.finishes)}. Variant shares: "
        + (", ".join(f"{v} {pct(share, 0)}" for v, share in s.variant_shares.items()) or "none")
        + (f". Failed (neither 200 nor 429): {s.failed}." if s.failed else "."),
    ]
    if s.components is not None:
        lines += ["", "Where the time went (admitted requests; observed / predicted, median and "
                  "p10–p90; predicted = stored profile × the live profile's drift at the decision; "
                  "overhead = time outside llama.cpp: HTTP, template, tokenizer, response):", "",
                  "| prompt tokens | n | prefill | decode | overhead ms |", "|---|---|---|---|---|"]
        lines += [_components_line(label, c) for label, c in [("all", s.components),
                                                               *s.components_by_prompt]]
        lines += ["", f"The live (EWMA) profile predicted {s.components.drift_first:.2f}× the stored "
                  f"one at the first admitted request and {s.components.drift_last:.2f}× at the last."]
    lines += ["", "Simulator crossover for `policies/llama31-8b-rk3568.toml` with its profile "
              "(150-token prompt, empty queue):", ""]
    for crossover in crossovers:
        where = ("none" if crossover.deadline_ms is None else
                 f"{format_ms(crossover.deadline_ms)} ({crossover.deadline_ms:.0f} ms)")
        lines.append(f"- {crossover.label}: {crossover.fast} below, {crossover.slow} from {where}")
    return "\n".join(lines) + "\n"


def _spread(value: Spread | None, digits: int = 2, unit: str = "×") -> str:
    if value is None:
        return "n/a"
    return f"{value.median:.{digits}f}{unit} ({value.p10:.{digits}f}–{value.p90:.{digits}f})"


def _components_line(label: str, c: Components) -> str:
    n = max((x.n for x in (c.prefill, c.decode, c.overhead_ms) if x is not None), default=0)
    return (f"| {label} | {n} | {_spread(c.prefill)} | {_spread(c.decode)} | "
            f"{_spread(c.overhead_ms, 0, '')} |")


def _target_line(label: str, stats: ErrorStats | None) -> str:
    measured = "n/a" if stats is None else f"{pct(stats.mape)} (n = {stats.n})"
    return f"| {label} | ≤ 10 % | {measured} | {verdict(stats is not None and stats.mape <= TARGET_MAPE)} |"


def _range(values: tuple[int, int] | None) -> str:
    return "n/a" if values is None else f"{values[0]}–{values[1]}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "none"


# ---- the command --------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"bench-routing: {message}", file=sys.stderr, flush=True)


def add_routing_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `edgeserve bench-routing` (the subcommand is in edgeserve.cli's table)."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--n", type=int, default=100, help="requests (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of prompts and deadlines (default 1)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request")
    parser.add_argument("--models", type=Path, default=default_models_path(),
                        help="models file (env EDGESERVE_MODELS; default ./models.toml)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="the server's cache dir: prepared models and cost profiles")
    parser.add_argument("--policy", type=Path, default=Path("policies/smollm2-135m.toml"),
                        help="routing policy of the server (default policies/smollm2-135m.toml)")
    parser.add_argument("--model", default=None, help="model field of the requests "
                        "(default: the first family of the models file)")
    parser.add_argument("--study-policy", type=Path, default=Path("policies/llama31-8b-rk3568.toml"))
    parser.add_argument("--study-profile", type=Path,
                        default=Path("policies/llama31-8b-rk3568.profile.json"))
    parser.add_argument("--decisions", type=int, default=10_000,
                        help="choose() calls timed for the decision time (default 10000)")
    parser.add_argument("--out", type=Path, help="write the report (a markdown section) to this file")
    parser.add_argument("--jsonl", type=Path, help="write one JSON line per request to this file "
                        "(and the stored profiles at start to FILE.profiles.json)")


def run_routing_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 on success, 2 on bad input or a server that does not come up."""
    if args.n < 1 or args.concurrency < 1 or args.max_tokens < 1:
        print("edgeserve: --n, --concurrency and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        _run(args)
    except (EdgeserveError, RuntimeError) as exc:
        message = exc.message if isinstance(exc, EdgeserveError) else str(exc)
        print(f"edgeserve: {message}", file=sys.stderr)
        return 2
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command as a reader would retype it (options left at their defaults omitted)."""
    words = ["edgeserve", COMMAND, "--n", str(args.n), "--seed", str(args.seed)]
    if args.concurrency != 1:
        words += ["--concurrency", str(args.concurrency)]
    if args.models != default_models_path():
        words += ["--models", str(args.models)]
    if args.cache_dir != default_cache_dir():
        words += ["--cache-dir", str(args.cache_dir)]
    return " ".join(words)


def _run(args: argparse.Namespace) -> None:
    models = load_models_file(args.models)
    model = args.model or models.families[0].name
    variant_ids = [f"{f.name}:{v.name}" for f in models.families for v in f.variants]
    crossovers = study_crossovers(args.study_policy, args.study_profile)
    policy = load_policy(args.policy)
    plans = plan_requests(args.n, args.seed)
    command = command_line(args)
    load_before = os.getloadavg()[0]
    log_path = Path(tempfile.mkdtemp(prefix="edgeserve-bench-routing-")) / "edgeserve.log"

    def show(row: Row) -> None:
        what = (f"{row.variant} {row.finish} pred {row.predicted_ms:.0f} actual {row.actual_ms:.0f} ms"
                if row.admitted else f"status {row.status} {row.error_code or ''}")
        progress(f"#{row.index + 1}/{args.n} deadline {row.deadline_ms} ms, prompt "
                 f"{row.prompt_tokens or row.target_prompt_tokens}: {what}")

    with edgeserve_server(args, log_path) as (base_url, ready_s):
        progress(f"ready after {ready_s:.1f} s")
        profiles = stored_profiles(args.cache_dir, variant_ids)  # before any EWMA update
        rows = run_requests(base_url, plans, model=model, max_tokens=args.max_tokens,
                            concurrency=args.concurrency, progress=show)
    summary = summarise(rows, profiles)
    candidates = served_candidates(args.models, profiles)
    if not candidates:
        raise RuntimeError(f"no stored cost profiles for {', '.join(variant_ids)} in {args.cache_dir}")
    sizes = [r.prompt_tokens for r in rows if r.prompt_tokens is not None]
    timed = decision_times_us(decision_requests(args.decisions, args.seed, sizes),
                              candidates, policy)
    report = report_markdown(summary, timed, crossovers,
                             environment(ready_s, load_before, command), args)
    print(report)
    if args.jsonl is not None:
        args.jsonl.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
        beside = args.jsonl.with_suffix(".profiles.json")
        beside.write_bytes(msgspec.json.format(msgspec.json.encode(profiles)))
        progress(f"wrote {len(rows)} rows to {args.jsonl}, the profiles they were judged by to {beside}")
    if args.out is not None:
        args.out.write_text(report)
        progress(f"wrote the report to {args.out}")
