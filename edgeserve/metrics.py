"""Prometheus collectors for `GET /metrics`, one registry per app (so tests can build several).

Counters and histograms are updated where a request ends (one call per request, next to its
canonical log line); gauges — queue depth, loaded variants, their resident bytes and the live
cost profiles — are read from the engine at scrape time, so nothing has to push them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeserve.routing.costs import predict_ms
from edgeserve.runtime.runner import GenerationResult
from edgeserve.service import Admission, Engine

Outcome = Literal["met", "missed", "completed", "cancelled", "failed", "refused", "rejected"]
OUTCOMES: tuple[Outcome, ...] = ("met", "missed", "completed", "cancelled", "failed", "refused", "rejected")
NO_VARIANT = "none"  # the variant label of a request refused or rejected before routing chose one

# From a 135M model on an x86 core (tens of ms) to an 8B one on an RK3568 (minutes per answer).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
RATIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


def outcome_of(result: GenerationResult | None, deadline_ms: int | None, total_ms: float,
               failed: bool = False) -> Outcome:
    """What came of an admitted request: met / missed its deadline (server-side: arrival to the
    end of the response), completed (it had none), cancelled (the client left), or failed."""
    if failed:
        return "failed"
    if result is None or result.finish == "cancelled":
        return "cancelled"
    if deadline_ms is None:
        return "completed"
    return "met" if total_ms <= deadline_ms else "missed"


def prediction_error(admission: Admission, result: GenerationResult, engine: Engine) -> float | None:
    """|predicted − actual| / actual of the generation's time in llama.cpp (prefill + decode).
    The decision predicted its whole budget; a request that stopped early (end of sequence,
    deadline) is judged on the tokens it really sampled: the prediction is rescaled by the live
    cost profile's ratio between the two, as `edgeserve bench-routing` does."""
    profile = admission.remote.profile if admission.remote is not None else engine.profiles.get(admission.variant_id)
    actual = result.prompt_ms + result.predicted_ms
    if profile is None or actual <= 0 or result.prompt_ms <= 0:
        return None
    prompt = len(admission.job.prompt_tokens)
    whole = predict_ms(profile, prompt, admission.decision.max_tokens)
    if whole <= 0:
        return None
    sampled = 1 + len(result.token_ms)  # the first token comes with the prefill
    generation_ms = admission.decision.predicted_ms - admission.load_ms  # a load is not generation time
    predicted = generation_ms * predict_ms(profile, prompt, sampled) / whole
    return abs(predicted - actual) / actual


def mapped_rss_bytes(smaps: str, paths: Iterable[Path]) -> dict[Path, int]:
    """Resident bytes of each file's mappings, from the text of /proc/<pid>/smaps. llama.cpp
    maps a GGUF file and reads weights through that mapping: what is resident is what will not
    be read from storage at the next token."""
    wanted = {str(p): p for p in paths}
    totals = dict.fromkeys(wanted.values(), 0)
    current: Path | None = None
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header
            current = wanted.get(head[5].strip()) if len(head) == 6 else None
        elif current is not None and line.startswith("Rss:"):
            totals[current] += int(line.split()[1]) * 1024
    return totals


def _read_smaps() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/self/smaps").read_text(errors="replace")
    return ""


class _EngineState(Collector):
    """Gauges read from the engine whenever /metrics is scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield GaugeMetricFamily("edgeserve_queue_depth", "Requests waiting for a generation slot.",
                                value=engine.scheduler.queue_depth)
        yield GaugeMetricFamily("edgeserve_running_generations", "Generations running now.",
                                value=engine.scheduler.running)
        runners = engine.registry.runners
        loaded = GaugeMetricFamily("edgeserve_variant_loaded", "1 when the variant is loaded.",
                                   labels=["variant"])
        resident = GaugeMetricFamily(
            "edgeserve_variant_resident_bytes",
            "Bytes of the variant's GGUF mapping resident in RAM (the rest is read from storage).",
            labels=["variant"])
        size = GaugeMetricFamily("edgeserve_variant_file_bytes", "Size of the variant's GGUF file.",
                                 labels=["variant"])
        paths = {variant_id: runner.path.resolve() for variant_id, runner in runners.items()}
        rss = mapped_rss_bytes(_read_smaps(), paths.values())
        for variant_id, runner in runners.items():
            loaded.add_metric([variant_id], 1.0 if runner.loaded else 0.0)
            resident.add_metric([variant_id], rss.get(paths[variant_id], 0))
            with contextlib.suppress(OSError):
                size.add_metric([variant_id], runner.file_bytes)
        decode = GaugeMetricFamily(
            "edgeserve_decode_ms_per_token",
            "Decode cost per token of the live cost profile (calibration, then EWMA of requests).",
            labels=["variant"])
        prefill = GaugeMetricFamily("edgeserve_prefill_ms_per_token",
                                    "Prefill cost per prompt token of the live cost profile.",
                                    labels=["variant"])
        up = GaugeMetricFamily("edgeserve_remote_up",
                               "1 when a remote variant is probed and its circuit is closed (routable).",
                               labels=["variant"])
        profiles = dict(engine.profiles)
        for variant_id, remote in engine.registry.remotes.items():
            up.add_metric([variant_id], 1.0 if remote.available else 0.0)
            if remote.profile is not None:
                profiles[variant_id] = remote.profile
        for variant_id, profile in profiles.items():
            decode.add_metric([variant_id], profile.decode_ms_per_token)
            prefill.add_metric([variant_id], profile.prefill_ms_per_token)
        yield from (loaded, resident, size, decode, prefill, up)
        yield from _residency_metrics(engine)


def _residency_metrics(engine: Engine) -> Iterator[Metric]:
    """The memory budget (issue 7) and how often variants were swapped in and out of it."""
    manager = engine.residency
    if manager is None:
        return
    if manager.budget_bytes is not None:
        yield GaugeMetricFamily("edgeserve_memory_budget_bytes",
                                "Memory for resident variants (--memory-budget).", value=manager.budget_bytes)
    yield GaugeMetricFamily("edgeserve_memory_resident_bytes",
                            "Estimated memory of the resident variants, counted against the budget.",
                            value=manager.residency.used_bytes)
    yield CounterMetricFamily("edgeserve_variant_loads", "Variants loaded on demand under the memory budget.",
                              value=manager.loads)
    yield CounterMetricFamily("edgeserve_variant_evictions",
                              "Variants unloaded to make room under the memory budget.", value=manager.evictions)


class Metrics:
    """The app's collectors. `finished` for every admitted request, `turned_away` for a request
    refused (429) or rejected (other 4xx) before it ran."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgeserve_requests", "Requests by variant and outcome.",
                                ["variant", "outcome"], registry=r)
        self.deadline = Counter("edgeserve_deadline", "Admitted requests with a deadline that "
                                "ended, by whether the response was complete in time.", ["result"], registry=r)
        self.queue_wait = Histogram("edgeserve_queue_wait_seconds", "Time waiting for a slot.",
                                    ["variant"], buckets=SECONDS_BUCKETS, registry=r)
        self.ttft = Histogram("edgeserve_time_to_first_token_seconds",
                              "Arrival to the first generated token (queue + prompt + first sample).",
                              ["variant"], buckets=SECONDS_BUCKETS, registry=r)
        self.duration = Histogram("edgeserve_request_duration_seconds",
                                  "Arrival to the end of the response, admitted requests.",
                                  ["variant"], buckets=SECONDS_BUCKETS, registry=r)
        self.prediction_error = Histogram(
            "edgeserve_prediction_error_ratio",
            "|predicted - actual| / actual generation time, prediction rescaled to the tokens sampled.",
            ["variant"], buckets=RATIO_BUCKETS, registry=r)
        self.prompt_tokens = Counter("edgeserve_prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["variant"], registry=r)
        self.completion_tokens = Counter("edgeserve_completion_tokens", "Tokens generated.",
                                         ["variant"], registry=r)
        r.register(_EngineState(engine))
        for result in ("met", "missed"):
            self.deadline.labels(result)
        for variant_id in engine.registry.runners:
            for outcome in OUTCOMES[:5]:
                self.requests.labels(variant_id, outcome)
        for outcome in OUTCOMES[5:]:
            self.requests.labels(NO_VARIANT, outcome)

    def finished(self, admission: Admission, result: GenerationResult | None, outcome: Outcome, *,
                 total_ms: float, queue_ms: float) -> None:
        variant = admission.variant_id
        self.requests.labels(variant, outcome).inc()
        if outcome in ("met", "missed"):
            self.deadline.labels(outcome).inc()
        self.duration.labels(variant).observe(total_ms / 1000)
        self.prompt_tokens.labels(variant).inc(len(admission.job.prompt_tokens))
        if result is None or result.prompt_ms <= 0:  # never reached llama.cpp
            return
        self.queue_wait.labels(variant).observe(queue_ms / 1000)
        self.completion_tokens.labels(variant).inc(result.predicted_n)
        # Everything after the first token is the decode steps (and the tail after the last).
        self.ttft.labels(variant).observe(max(0.0, total_ms - result.predicted_ms) / 1000)
        if result.finish != "cancelled":
            error = prediction_error(admission, result, self.engine)
            if error is not None:
                self.prediction_error.labels(variant).observe(error)

    def turned_away(self, outcome: Outcome, variant: str = NO_VARIANT) -> None:
        """Refused or rejected before it ran (a full queue is noticed after routing chose)."""
        self.requests.labels(variant, outcome).inc()
