"""Prometheus collectors for `GET /metrics`, one registry per app (so tests can build several).

Counters and histograms are updated from each request's CompletionRecord (one call per request,
next to its canonical log line); gauges — queue depth, loaded variants, their resident bytes and
the live cost profiles — are read from the variants and the CPU slots at scrape time, so nothing
has to push them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeserve.pipeline.record import OUTCOMES, CompletionRecord
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.pair_runner import PairRunner

NO_VARIANT = "none"  # the variant label of a request refused or rejected before routing chose one

# From a 135M model on an x86 core (tens of ms) to an 8B one on an RK3568 (minutes per answer).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
RATIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class SlotCounts(Protocol):
    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...


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


class _ServerState(Collector):
    """Gauges read from the variants, the CPU slots and the memory budget whenever /metrics is
    scraped."""

    def __init__(self, catalog: Catalog, slots: SlotCounts, residency: ResidencyManager | None) -> None:
        self.catalog = catalog
        self.slots = slots
        self.residency = residency

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("edgeserve_queue_depth", "Requests waiting for a place in a batch.",
                                value=self.slots.queue_depth)
        yield GaugeMetricFamily("edgeserve_running_generations", "Generations running now (all variants).",
                                value=self.slots.running)
        loaded = GaugeMetricFamily("edgeserve_variant_loaded", "1 when the variant is loaded.",
                                   labels=["variant"])
        resident = GaugeMetricFamily(
            "edgeserve_variant_resident_bytes",
            "Bytes of the variant's GGUF mapping resident in RAM (the rest is read from storage).",
            labels=["variant"])
        size = GaugeMetricFamily("edgeserve_variant_file_bytes", "Size of the variant's GGUF file.",
                                 labels=["variant"])
        runners = {str(vid): variant.runner for vid, variant in self.catalog.local.items()}
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
        for vid, remote in self.catalog.remote.items():
            up.add_metric([str(vid)], 1.0 if remote.available else 0.0)
        for variant in self.catalog:
            if variant.profile is not None:
                decode.add_metric([str(variant.id)], variant.profile.decode_ms_per_token)
                prefill.add_metric([str(variant.id)], variant.profile.prefill_ms_per_token)
        yield from (loaded, resident, size, decode, prefill, up)
        yield from _batching_metrics(self.catalog)
        yield from _residency_metrics(self.residency)


def _batching_metrics(catalog: Catalog) -> Iterator[Metric]:
    """What the stepping loop did per variant: steps by batch width, their time, prompt chunks,
    prompt tokens reused from the KV cache, and the sequences in its batch now."""
    steps = CounterMetricFamily("edgeserve_batch_steps", "Decode steps by the number of sequences in them.",
                                labels=["variant", "width"])
    seconds = CounterMetricFamily("edgeserve_step_seconds", "Time spent in llama.cpp decode steps.",
                                  labels=["variant"])
    tokens = CounterMetricFamily("edgeserve_batch_sequence_steps",
                                 "Sequences × steps: divided by edgeserve_batch_steps_total, the mean batch width.",
                                 labels=["variant"])
    chunks = CounterMetricFamily("edgeserve_prefill_chunks", "Prompt chunks evaluated next to running streams.",
                                 labels=["variant"])
    cached = CounterMetricFamily("edgeserve_prefix_cache_hit_tokens",
                                 "Prompt tokens whose KV was reused instead of evaluated.", labels=["variant"])
    running = GaugeMetricFamily("edgeserve_running_sequences", "Sequences in the variant's batch now.",
                                labels=["variant"])
    drafted = CounterMetricFamily("edgeserve_spec_decode_draft_tokens",
                                  "Speculative pairs: tokens the draft variant proposed.", labels=["variant"])
    accepted = CounterMetricFamily("edgeserve_spec_decode_accepted_tokens",
                                   "Speculative pairs: proposed tokens the target agreed with.", labels=["variant"])
    acceptance = GaugeMetricFamily("edgeserve_spec_decode_acceptance_ratio",
                                   "Speculative pairs: accepted over proposed tokens since the start.",
                                   labels=["variant"])
    for vid, variant in catalog.local.items():
        label = str(vid)
        stepper = variant.runner.stepper
        running.add_metric([label], stepper.running_in(label))
        stats = stepper.stats(label)
        if stats is None:
            continue
        for width, count in sorted(stats.widths.items()):
            steps.add_metric([label, str(width)], count)
        seconds.add_metric([label], stats.step_seconds)
        tokens.add_metric([label], stats.tokens_decoded)
        chunks.add_metric([label], stats.prefill_chunks)
        cached.add_metric([label], stats.cached_tokens)
        if isinstance(variant.runner, PairRunner):
            drafted.add_metric([label], stats.drafted_tokens)
            accepted.add_metric([label], stats.accepted_tokens)
            acceptance.add_metric([label], stats.accepted_tokens / max(stats.drafted_tokens, 1))
    yield from (steps, seconds, tokens, chunks, cached, running, drafted, accepted, acceptance)


def _residency_metrics(manager: ResidencyManager | None) -> Iterator[Metric]:
    """The memory budget (issue 7) and how often variants were swapped in and out of it."""
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
    """The app's collectors; `observe` takes every request's CompletionRecord (one call per
    request, next to its canonical log line)."""

    def __init__(self, catalog: Catalog, slots: SlotCounts, residency: ResidencyManager | None = None) -> None:
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
        r.register(_ServerState(catalog, slots, residency))
        for result in ("met", "missed"):
            self.deadline.labels(result)
        for vid in catalog.local:
            for outcome in OUTCOMES[:5]:
                self.requests.labels(str(vid), outcome)
        for outcome in OUTCOMES[5:]:
            self.requests.labels(NO_VARIANT, outcome)

    def observe(self, record: CompletionRecord) -> None:
        variant = record.variant or NO_VARIANT
        self.requests.labels(variant, record.outcome).inc()
        if record.turned_away:  # refused (429, 503) or rejected (other 4xx) before it ran
            return
        if record.outcome in ("met", "missed"):
            self.deadline.labels(record.outcome).inc()
        total_ms = record.actual_ms or 0.0
        self.duration.labels(variant).observe(total_ms / 1000)
        self.prompt_tokens.labels(variant).inc(record.prompt_tokens or 0)
        if record.prompt_ms <= 0:  # never reached the model
            return
        self.queue_wait.labels(variant).observe((record.queue_ms or 0.0) / 1000)
        self.completion_tokens.labels(variant).inc(record.completion_tokens or 0)
        # Everything after the first token is the decode steps (and the tail after the last).
        self.ttft.labels(variant).observe(max(0.0, total_ms - record.decode_ms) / 1000)
        if record.prediction_error is not None:
            self.prediction_error.labels(variant).observe(record.prediction_error)
