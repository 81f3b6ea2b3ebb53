"""Prometheus collectors without a model: the gauges read at scrape time, what a
CompletionRecord moves, smaps, the exposition."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgeserve.metrics import Metrics, mapped_rss_bytes
from edgeserve.pipeline import CompletionRecord
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.stepper import Stepper
from edgeserve.variant_id import VariantId

VARIANT = "fam:q4_1"
PROFILE = CostProfile(variant_id=VARIANT, prefill_fixed_ms=20.0, prefill_ms_per_token=1.0,
                      decode_ms_per_token=10.0)


class FakeCatalog:
    def __init__(self, local: dict[VariantId, Any], remote: dict[VariantId, Any]) -> None:
        self.local, self.remote = local, remote

    def __iter__(self) -> Iterator[Any]:
        return iter([*self.local.values(), *self.remote.values()])


def metrics(tmp_path: Path) -> Metrics:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 1000)
    vid = VariantId.parse(VARIANT)
    runner = SimpleNamespace(path=gguf, loaded=True, file_bytes=1000, variant_id=VARIANT, stepper=Stepper())
    local = SimpleNamespace(id=vid, runner=runner, profile=PROFILE)
    cloud = SimpleNamespace(id=VariantId("fam", "cloud"), available=False, profile=None)
    catalog = FakeCatalog({vid: local}, {cloud.id: cloud})
    return Metrics(catalog, SimpleNamespace(queue_depth=3, running=1), None)  # type: ignore[arg-type]


def record(outcome: str = "met", *, variant: str | None = VARIANT, turned_away: bool = False,
           prompt_ms: float = 30.0, decode_ms: float = 70.0, error: float | None = 0.1) -> CompletionRecord:
    return CompletionRecord(request_id="r", family="fam", variant=variant, deadline_ms=1000, predicted_ms=100.0,
                            budget_tokens=8, hint_tokens=None, queue_ms=None if turned_away else 100.0,
                            actual_ms=250.0, prompt_tokens=10, completion_tokens=8, finish="length",
                            outcome=outcome, code=None, client="c", turned_away=turned_away,  # type: ignore[arg-type]
                            prompt_ms=prompt_ms, decode_ms=decode_ms, prediction_error=error)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


SMAPS = """\
7f0000000000-7f0000100000 r--s 00000000 fe:00 123    /models/a.gguf
Size:               1024 kB
Rss:                 512 kB
VmFlags: rd sh mr mw me ms sd
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                 999 kB
7f0000200000-7f0000300000 r--s 00100000 fe:00 123    /models/a.gguf
Rss:                   4 kB
7f0000300000-7f0000400000 r--s 00000000 fe:00 124    /models/b (1).gguf
Rss:                   8 kB
"""


def test_mapped_rss_sums_every_mapping_of_a_file() -> None:
    rss = mapped_rss_bytes(SMAPS, [Path("/models/a.gguf"), Path("/models/b (1).gguf"), Path("/models/c.gguf")])
    assert rss == {Path("/models/a.gguf"): 516 * 1024, Path("/models/b (1).gguf"): 8 * 1024,
                   Path("/models/c.gguf"): 0}


def test_the_exposition_parses_and_every_series_is_there_from_the_start(tmp_path: Path) -> None:
    before = samples(metrics(tmp_path))
    assert before[("edgeserve_requests_total", (("outcome", "met"), ("variant", VARIANT)))] == 0
    assert before[("edgeserve_requests_total", (("outcome", "refused"), ("variant", "none")))] == 0
    assert before[("edgeserve_deadline_total", (("result", "missed"),))] == 0
    assert before[("edgeserve_queue_depth", ())] == 3
    assert before[("edgeserve_running_generations", ())] == 1
    assert before[("edgeserve_variant_loaded", (("variant", VARIANT),))] == 1
    assert before[("edgeserve_variant_file_bytes", (("variant", VARIANT),))] == 1000
    assert ("edgeserve_variant_resident_bytes", (("variant", VARIANT),)) in before
    assert before[("edgeserve_decode_ms_per_token", (("variant", VARIANT),))] == 10.0
    assert before[("edgeserve_prefill_ms_per_token", (("variant", VARIANT),))] == 1.0
    assert before[("edgeserve_remote_up", (("variant", "fam:cloud"),))] == 0.0
    assert ("edgeserve_decode_ms_per_token", (("variant", "fam:cloud"),)) not in before  # not probed


def test_a_finished_request_moves_counters_and_histograms(tmp_path: Path) -> None:
    collectors = metrics(tmp_path)
    collectors.observe(record("met"))
    collectors.observe(record("refused", variant=None, turned_away=True))
    collectors.observe(record("refused", turned_away=True))
    after = samples(collectors)
    variant = (("variant", VARIANT),)
    assert after[("edgeserve_requests_total", (("outcome", "met"), *variant))] == 1
    assert after[("edgeserve_requests_total", (("outcome", "refused"), ("variant", "none")))] == 1
    assert after[("edgeserve_requests_total", (("outcome", "refused"), *variant))] == 1
    assert after[("edgeserve_deadline_total", (("result", "met"),))] == 1
    assert after[("edgeserve_prompt_tokens_total", variant)] == 10
    assert after[("edgeserve_completion_tokens_total", variant)] == 8
    assert after[("edgeserve_queue_wait_seconds_sum", variant)] == pytest.approx(0.1)
    assert after[("edgeserve_request_duration_seconds_sum", variant)] == pytest.approx(0.25)
    # 70 ms of decode after the first token: the first came 180 ms after arrival
    assert after[("edgeserve_time_to_first_token_seconds_sum", variant)] == pytest.approx(0.18)
    assert after[("edgeserve_prediction_error_ratio_count", variant)] == 1


def test_a_request_that_never_reached_the_model_counts_but_has_no_timings(tmp_path: Path) -> None:
    collectors = metrics(tmp_path)
    collectors.observe(record("cancelled", prompt_ms=0.0, decode_ms=0.0, error=None))
    after = samples(collectors)
    variant = (("variant", VARIANT),)
    assert after[("edgeserve_requests_total", (("outcome", "cancelled"), *variant))] == 1
    assert after[("edgeserve_request_duration_seconds_count", variant)] == 1
    assert ("edgeserve_queue_wait_seconds_count", variant) not in after
    assert after[("edgeserve_deadline_total", (("result", "met"),))] == 0


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    one, two = metrics(tmp_path), metrics(tmp_path)
    one.observe(record("rejected", variant=None, turned_away=True))
    assert samples(one)[("edgeserve_requests_total", (("outcome", "rejected"), ("variant", "none")))] == 1
    assert samples(two)[("edgeserve_requests_total", (("outcome", "rejected"), ("variant", "none")))] == 0
