"""The pure parts of `edgeserve bench --concurrency`: SSE parsing, token counts, aggregation,
percentiles, the run order and the report."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from edgeserve.cli import build_parser
from edgeserve.config import VariantConfig
from edgeserve.tools.bench import (
    ConcurrencySetup,
    LevelSample,
    StreamResult,
    completion_count,
    llama_cpp_server_queue_command,
    median_spread,
    native_llama_server_command,
    parse_levels,
    per_run_ratios,
    percentile,
    pinned_variant_toml,
    render_concurrency_report,
    run_plan,
    stream_messages,
    stream_result,
    target_checks,
)


def sse(payload: dict[str, object] | str, at: float) -> tuple[float, str]:
    return at, "data: " + (payload if isinstance(payload, str) else json.dumps(payload))


def delta(content: str | None, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": content} if content is not None else {},
                         "finish_reason": finish}]}


def stream(sent: float = 0.0, first: float = 0.1, last: float = 1.1, ended: float = 1.2,
           tokens: int = 101) -> StreamResult:
    return StreamResult(sent, first, last, ended, tokens, "usage")


def level(engine: str, concurrency: int, run: int, streams: list[StreamResult]) -> LevelSample:
    return LevelSample(engine, concurrency, run, tuple(streams), 0.0)


# ---- parsing a stream --------------------------------------------------------------------------


def test_stream_result_takes_usage_not_the_number_of_chunks() -> None:
    # edgeserve coalesces text: 3 content chunks carried 40 tokens
    lines = [
        sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 0.05),
        sse(delta("Once"), 0.2),
        sse(delta(" upon a time"), 0.6),
        sse(delta(" there was"), 1.0),
        sse(delta(None, "length") | {"timings": {"predicted_n": 40, "prompt_n": 30}}, 1.01),
        sse({"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 40, "total_tokens": 71}}, 1.02),
        sse("[DONE]", 1.03),
    ]
    result = stream_result(0.0, 1.05, lines, max_tokens=40)
    assert (result.tokens, result.source, result.prompt_tokens) == (40, "usage", 31)
    assert result.ttft_ms == pytest.approx(200.0)  # the empty role delta is not a first token
    assert result.decode_tps == pytest.approx(39 / 0.8)


def test_completion_count_falls_back_in_order() -> None:
    timings = [delta("a"), {"choices": [], "timings": {"predicted_n": 7, "prompt_n": 3}}]
    assert completion_count(timings, 50) == (7, "timings", 3)
    # `usage: null` in every chunk (some servers send it) is no usage
    length = [delta("a") | {"usage": None}, delta(None, "length")]
    assert completion_count(length, 50) == (50, "length", None)
    stopped = [delta("one two"), delta(" three"), delta(None, "stop")]
    assert completion_count(stopped, 50, retokenize=lambda text: len(text.split())) == (3, "retokenized", None)
    with pytest.raises(RuntimeError, match="no completion token count"):
        completion_count(stopped, 50)


def test_a_stream_without_content_has_no_ttft_or_speed() -> None:
    result = stream_result(0.0, 0.5, [sse({"choices": [], "usage": {"completion_tokens": 0}}, 0.4)], 10)
    assert result.tokens == 0
    assert math.isnan(result.ttft_ms) and math.isnan(result.decode_tps)


# ---- aggregation -------------------------------------------------------------------------------


def test_aggregate_is_all_tokens_over_first_sent_to_last_ended() -> None:
    sample = level("edgeserve", 2, 0, [
        stream(sent=0.0, first=0.1, last=2.1, ended=2.2, tokens=201),
        stream(sent=0.5, first=0.7, last=3.7, ended=4.0, tokens=151),
    ])
    assert sample.wall_s == pytest.approx(4.0)
    assert sample.aggregate_tps == pytest.approx(352 / 4.0)
    assert sample.stream_tps == pytest.approx((100.0 + 50.0) / 2)  # median of two
    assert sample.ttft_ms(50) == pytest.approx(150.0)
    assert sample.ttft_ms(99) == pytest.approx(100 + 100 * 0.99)
    assert sample.tokens_mean == pytest.approx(176.0)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([3.0, 1.0, 2.0], 50, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([1.0, 2.0, 3.0, 4.0], 99, 3.97),
    ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
    ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
    ([5.0], 99, 5.0),
    ([1.0, math.nan, 3.0], 50, 2.0),
])
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50)) and math.isnan(percentile([math.nan], 99))


def test_median_spread() -> None:
    assert median_spread([3.0, 1.0, 2.0]) == "2.0 (1.0–3.0)"
    assert median_spread([1.234], 2) == "1.23"
    assert median_spread([math.nan]) == "n/a"


def test_ratios_pair_the_same_run() -> None:
    samples = [
        level("edgeserve", 4, 0, [stream(sent=0, ended=2.0, tokens=200)]),  # 100 tok/s
        level("llama-server", 4, 0, [stream(sent=0, ended=4.0, tokens=200)]),  # 50
        level("edgeserve", 4, 1, [stream(sent=0, ended=4.0, tokens=200)]),  # 50
        level("llama-server", 4, 1, [stream(sent=0, ended=2.0, tokens=200)]),  # 100
    ]
    assert per_run_ratios(samples, 4, "edgeserve", "llama-server", "aggregate") == pytest.approx([2.0, 0.5])
    assert per_run_ratios(samples, 8, "edgeserve", "llama-server", "aggregate") == []


# ---- the plan and the command lines ------------------------------------------------------------


def test_run_plan_interleaves_engines_per_level_and_in_process_only_alone() -> None:
    plan = run_plan([1, 4], 2, ["inprocess", "edgeserve", "llama-server"])
    assert plan == [
        (0, 1, "inprocess"), (0, 1, "edgeserve"), (0, 1, "llama-server"),
        (0, 4, "edgeserve"), (0, 4, "llama-server"),
        (1, 1, "inprocess"), (1, 1, "edgeserve"), (1, 1, "llama-server"),
        (1, 4, "edgeserve"), (1, 4, "llama-server"),
    ]


def test_parse_levels() -> None:
    assert parse_levels("8,1,2,4,2") == [1, 2, 4, 8]
    for bad in ("", "0,1", "a", "1,65"):
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_every_stream_has_its_own_prompt() -> None:
    prompts = [stream_messages(i)[0]["content"] for i in range(40)]
    assert len(set(prompts)) == 40


def test_servers_get_the_same_threads_and_context_per_sequence(tmp_path: Path) -> None:
    variant = VariantConfig(name="q8_0", n_ctx=2048, n_threads=2, n_batch=512)
    native = native_llama_server_command(Path("/opt/llama-server"), tmp_path / "m.gguf", variant, 8, 1234)
    pairs = dict(zip(native[1::2], native[2::2], strict=False))
    assert pairs["--threads"] == pairs["--threads-batch"] == "2"
    assert (pairs["--ctx-size"], pairs["--parallel"]) == ("16384", "8")
    assert "--cont-batching" in native
    queued = llama_cpp_server_queue_command(tmp_path / "m.gguf", variant, 1234)
    assert queued[queued.index("--interrupt_requests") + 1] == "False"
    assert queued[queued.index("--n_ctx") + 1] == "2048"


def test_pinned_models_file_serves_the_prepared_file_with_parallel(tmp_path: Path) -> None:
    variant = VariantConfig(name="q8_0", quant="Q8_0", n_ctx=2048, n_threads=2)
    parsed = tomllib.loads(pinned_variant_toml("smollm2-135m", variant, tmp_path / "Q8_0.gguf", 8))
    (only,) = parsed["families"][0]["variants"]
    assert only["path"] == str(tmp_path / "Q8_0.gguf") and "quant" not in only
    assert (only["parallel"], only["n_ctx"], only["n_threads"]) == (8, 2048, 2)


def test_the_cli_knows_the_concurrency_flags() -> None:
    args = build_parser().parse_args(["bench", "--concurrency", "1,2,4,8", "--llama-server", "/x/llama-server"])
    assert args.concurrency == "1,2,4,8" and args.llama_server == Path("/x/llama-server")


# ---- the report --------------------------------------------------------------------------------


def setup(engines: list[str], levels: list[int], llama_server: str | None = "`/x`, version: 1") -> ConcurrencySetup:
    return ConcurrencySetup(variant_id="fam:q8_0", levels=levels, runs=2, max_tokens=200, threads=2, n_ctx=2048,
                            n_batch=512, parallel=max(levels), engines=engines, llama_server=llama_server)


def sweep() -> list[LevelSample]:
    """Two runs at 1 and 4 streams: edgeserve 110/100 tok/s alone (in-process 100), 400/320 at 4 against
    llama-server's 350/350; edgeserve's last first token at 4 streams 0.4 s, llama-server's 0.25 s."""
    samples = []
    for run, (alone, four) in enumerate([(1.1, 4.0), (1.0, 3.2)]):
        samples.append(level("inprocess", 1, run, [stream(first=0.0, last=1.0, ended=1.0, tokens=101)]))
        samples.append(level("edgeserve", 1, run, [stream(first=0.0, last=1 / alone, ended=1.0, tokens=101)]))
        samples.append(level("edgeserve", 4, run, [stream(first=0.1 * (i + 1), ended=1.0, tokens=int(four * 25))
                                                   for i in range(4)]))
        samples.append(level("llama-server", 4, run, [stream(first=0.05 * (i + 1), ended=1.0, tokens=87)
                                                      for i in range(3)] + [stream(first=0.25, ended=1.0, tokens=89)]))
    return samples


def test_targets_are_judged_on_median_ratios() -> None:
    checks = {c.name: c for c in target_checks(sweep(), [1, 4])}
    four = checks["aggregate tok/s at 4 streams ≥ 1.0× llama-server"]
    assert four.met is True and four.measured == "1.03 (0.91–1.14)×"
    assert checks["aggregate tok/s at 8 streams ≥ 1.0× llama-server"].met is None
    ttft = checks["TTFT p99 at 4 streams ≤ llama-server's"]
    assert ttft.met is False and ttft.measured == "397 ms vs 247 ms"
    alone = checks["single-stream decode ≥ 0.95× the in-process loop"]
    assert alone.met is True and alone.measured == "1.050 (1.000–1.100)×"


def test_report_has_a_row_per_level_and_engine_and_says_what_was_skipped() -> None:
    report = render_concurrency_report(sweep(), setup(["inprocess", "edgeserve", "llama_cpp.server"], [1, 4],
                                                      llama_server=None))
    assert "llama-server: skipped (no --llama-server PATH given)." in report
    rows = [line for line in report.splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    engines = [row.split("|")[2].strip() for row in rows[:3]]
    assert engines == ["llama-cpp-python in-process", "edgeserve", "edgeserve"]
    assert "| 4 | edgeserve | 360.0 (320.0–400.0) |" in report
    assert "one model process at a time" in report.lower()
    assert "usage" in report and "**missed**" in report


def test_report_names_the_llama_server_binary() -> None:
    report = render_concurrency_report(sweep(), setup(["inprocess", "edgeserve", "llama-server"], [1, 4]))
    assert "llama-server: `/x`, version: 1." in report
    assert "| 4 | llama-server | 350.0 (350.0–350.0) |" in report
    assert "| 4 | 1.03 (0.91–1.14) |" in report
