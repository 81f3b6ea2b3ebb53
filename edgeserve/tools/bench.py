"""`edgeserve bench`: decode tokens/s and time to first token, side by side.

For one variant, one thread count, one n_ctx and one prompt, three engines are measured with
their runs interleaved (a, b, c, a, b, c, ...) so that machine noise hits all three alike:

  (a) a plain in-process llama-cpp-python loop (`Llama.generate` on the chat-templated prompt),
  (b) edgeserve over HTTP streaming (a subprocess serving only that variant),
  (c) llama-cpp-python's own server (`python -m llama_cpp.server`) over HTTP streaming.

TTFT is the first non-empty content delta (for (a): the first generated token) minus the moment
the request was sent; decode tokens/s is (tokens - 1) / (last token time - first token time).
Every run of index i uses the same prompt in all three engines, and each index a different one,
so no engine decodes a prompt whose KV cache the previous run left behind.

With `--concurrency 1,2,4,8` it measures C clients streaming at once instead (see "concurrency"
below): aggregate and per-stream decode tokens/s and TTFT p50/p99 of edgeserve, llama.cpp's own
`llama-server` (`--llama-server PATH`) and llama_cpp.server, one server process at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec

from edgeserve.config import (
    FamilyConfig,
    VariantConfig,
    default_cache_dir,
    default_models_path,
    load_models_file,
    resolve_path,
)
from edgeserve.errors import ConfigError, EdgeserveError
from edgeserve.tools.processes import free_port, server_process, vm_rss_mib

Messages = list[dict[str, str]]

DEFAULT_VARIANT = "smollm2-135m:q8_0"
PROMPT = "Write a long story about a lighthouse keeper named {name}."
KEEPER_NAMES = ("Ada", "Bram", "Celia", "Dorian", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas")
WARMUP_NAME = "Warden"
WARMUP_TOKENS = 8
QUIET_WAIT_S = 120.0
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
# Sampling shared by all three engines. temperature 0 is greedy; repeat_penalty is sent
# explicitly because llama_cpp.server's default for it is 1.1, edgeserve's is 1.0.
TEMPERATURE = 0.0
REPEAT_PENALTY = 1.0
# edgeserve would otherwise append its budget hint to the prompt (max_tokens is set), and the
# prompt must be the same for all three engines.
EDGESERVE_HEADERS = {"X-Budget-Hint": "off", "X-Answer-Forcing": "off"}
ENGINES = {
    "a": "(a) llama-cpp-python in-process",
    "b": "(b) edgeserve HTTP",
    "c": "(c) llama_cpp.server HTTP",
}


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def messages_for(index: int | None) -> Messages:
    """Run i's prompt (the same for a, b and c); None is the warm-up prompt."""
    name = WARMUP_NAME if index is None else KEEPER_NAMES[index % len(KEEPER_NAMES)]
    return [{"role": "user", "content": PROMPT.format(name=name)}]


# ---- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ttft_ms: float
    decode_tps: float  # nan when fewer than two tokens came
    tokens: int
    other_cores: float = math.nan  # CPU other processes used meanwhile, in cores


def sample_from(sent: float, stamps: list[float], tokens: int | None = None) -> Sample:
    """Times are time.perf_counter() values: request sent, then one per content chunk. A
    server that sends several tokens per chunk (edgeserve batches its hand-offs) reports the
    token count itself; the first token always comes alone, so the span still covers
    tokens - 1 decode steps."""
    if not stamps:
        return Sample(math.nan, math.nan, 0)
    count = len(stamps) if tokens is None else tokens
    span = stamps[-1] - stamps[0]
    decode = (count - 1) / span if count > 1 and span > 0 else math.nan
    return Sample((stamps[0] - sent) * 1000, decode, count)


class Engine(Protocol):
    def run(self, messages: Messages, max_tokens: int) -> Sample: ...


class InProcessEngine:
    """(a): the loop a user of llama-cpp-python would write, with the same load settings."""

    def __init__(self, path: Path, variant: VariantConfig) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        self.llm: Any = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=variant.n_ctx,
            n_batch=variant.n_batch,
            n_threads=variant.threads,
            n_threads_batch=variant.threads,
            verbose=False,
        )
        template = variant.chat_template or self.llm.metadata["tokenizer.chat_template"]
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        self.formatter: Any = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
        )
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def run(self, messages: Messages, max_tokens: int) -> Sample:
        sent, stamps = self.generate(messages, max_tokens)
        return sample_from(sent, stamps)

    def generate(self, messages: Messages, max_tokens: int) -> tuple[float, list[float]]:
        """The time the request began and one time per generated token (end of sequence excluded)."""
        sent = time.perf_counter()
        prompt = self.formatter(messages=messages).prompt
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        stamps: list[float] = []
        text = bytearray()  # detokenized like a real consumer would, though nobody reads it
        generator = self.llm.generate(tokens, top_k=40, top_p=1.0, min_p=0.05, temp=TEMPERATURE,
                                      repeat_penalty=REPEAT_PENALTY)
        for token in generator:
            now = time.perf_counter()
            if self._llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            stamps.append(now)
            text += self.llm.detokenize([token])
            if len(stamps) >= max_tokens:
                break
        generator.close()
        return sent, stamps

    def close(self) -> None:
        self.llm.close()


class HttpEngine:
    """(b) and (c): one streaming chat request; lines are timestamped as they arrive and
    parsed only after the stream ends, so the client spends as little CPU as it can."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None) -> None:
        self.model = model
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def run(self, messages: Messages, max_tokens: int) -> Sample:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "repeat_penalty": REPEAT_PENALTY,
            "stream": True,
        }
        lines: list[tuple[float, str]] = []
        sent = time.perf_counter()
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"{self.client.base_url} answered {response.status_code}: "
                                   f"{response.text[:500]}")
            for line in response.iter_lines():
                lines.append((time.perf_counter(), line))
        return sample_from(sent, content_stamps(lines), reported_tokens(lines))

    def close(self) -> None:
        self.client.close()


def reported_tokens(lines: list[tuple[float, str]]) -> int | None:
    """`timings.predicted_n` of the final chunk, where the server sends one (edgeserve does)."""
    for _, line in reversed(lines):
        payload = line[len("data:"):].strip() if line.startswith("data:") else ""
        if payload and payload != "[DONE]":
            timings = json.loads(payload).get("timings")
            if timings:
                return int(timings["predicted_n"])
    return None


def content_stamps(lines: list[tuple[float, str]]) -> list[float]:
    """The arrival time of every SSE event that carries a non-empty content delta."""
    stamps: list[float] = []
    for stamp, line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if not payload or payload == "[DONE]":
            continue
        chunk = json.loads(payload)
        if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
            stamps.append(stamp)
    return stamps


def single_variant_toml(family: FamilyConfig, variant: VariantConfig, base_dir: Path) -> str:
    """A models file with only this variant, so edgeserve loads it alone (and its RSS is its own).
    Relative paths of the original file are made absolute."""

    def quoted(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    def location(value: str) -> str:
        return value if value.startswith("package://") else str(resolve_path(base_dir, value))

    lines = ["[[families]]", f"name = {quoted(family.name)}",
             f"default_variant = {quoted(variant.name)}"]
    if family.source is not None:
        lines.append(f"source = {quoted(location(family.source))}")
    if family.source_sha256 is not None:
        lines.append(f"source_sha256 = {quoted(family.source_sha256)}")
    if family.source_quant is not None:
        lines.append(f"source_quant = {quoted(family.source_quant)}")
    lines += ["", "[[families.variants]]", f"name = {quoted(variant.name)}"]
    if variant.quant is not None:
        lines.append(f"quant = {quoted(variant.quant)}")
    if variant.path is not None:
        lines.append(f"path = {quoted(location(variant.path))}")
    lines += [f"n_ctx = {variant.n_ctx}", f"n_threads = {variant.threads}",
              f"n_batch = {variant.n_batch}"]
    if variant.chat_template is not None:
        lines.append(f"chat_template = {quoted(variant.chat_template)}")
    return "\n".join(lines) + "\n"


def edgeserve_command(models: Path, cache_dir: Path, port: int, policy: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(models),
               "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", str(port)]
    return command if policy is None else [*command, "--policy", str(policy)]


def llama_server_command(path: Path, variant: VariantConfig, port: int) -> list[str]:
    threads = str(variant.threads)
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
            "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", str(variant.n_ctx),
            "--n_batch", str(variant.n_batch), "--host", "127.0.0.1", "--port", str(port),
            "--verbose", "False"]


# ---- noise -------------------------------------------------------------------------------------


def busy_jiffies() -> int | None:
    """CPU time (clock ticks, all CPUs) the whole machine spent busy, steal included."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def process_jiffies(pid: int) -> int:
    """utime + stime of a process, all its threads included; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """How much CPU processes other than the bench and its servers used: the noise that
    interleaving alone does not cancel (llama.cpp's spinning threads slow down many-fold when
    another process takes one of their cores)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def snapshot(self) -> tuple[float, int | None, int]:
        ours = sum(process_jiffies(pid) for pid in self.pids)
        return time.monotonic(), busy_jiffies(), ours

    def other_cores(self, before: tuple[float, int | None, int],
                    after: tuple[float, int | None, int]) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = before, after
        if busy0 is None or busy1 is None or t1 <= t0:
            return math.nan
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / self.hz / (t1 - t0)


def wait_for_quiet(meter: CpuMeter, threshold: float, max_wait_s: float = QUIET_WAIT_S) -> float:
    """Wait (at most max_wait_s) for a one-second window in which other processes used no more
    than `threshold` cores, so a run does not start in the middle of someone else's burst."""
    started = time.monotonic()
    while True:
        before = meter.snapshot()
        time.sleep(1.0)
        other = meter.other_cores(before, meter.snapshot())
        if not other > threshold or time.monotonic() - started > max_wait_s:
            return other
        progress(f"waiting for other processes to quiet down ({other:.2f} cores busy)")


def measured_run(engine: Engine, meter: CpuMeter, messages: Messages, max_tokens: int) -> Sample:
    before = meter.snapshot()
    sample = engine.run(messages, max_tokens)
    return dataclasses.replace(sample, other_cores=meter.other_cores(before, meter.snapshot()))


# ---- one variant -------------------------------------------------------------------------------


@dataclass
class VariantResult:
    variant_id: str
    variant: VariantConfig
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in ENGINES})
    rss_mib: dict[str, float | None] = field(default_factory=dict)
    repeated: int = 0  # run triples measured again because other processes were busy
    disturbed: int = 0  # run triples kept although still disturbed after the last retry


@dataclass(frozen=True)
class Target:
    family: FamilyConfig
    variant: VariantConfig
    path: Path

    @property
    def variant_id(self) -> str:
        return f"{self.family.name}:{self.variant.name}"


def bench_variant(target: Target, args: argparse.Namespace, workdir: Path) -> VariantResult:
    result = VariantResult(target.variant_id, target.variant)
    slug = target.variant_id.replace(":", "_")
    models = workdir / f"{slug}.models.toml"
    models.write_text(single_variant_toml(target.family, target.variant,
                                          args.models.resolve().parent))
    es_port, ls_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        progress(f"starting edgeserve and llama_cpp.server for {target.variant_id}")
        edgeserve = stack.enter_context(server_process(
            "edgeserve", edgeserve_command(models, args.cache_dir, es_port),
            f"http://127.0.0.1:{es_port}/ready", workdir / f"{slug}.edgeserve.log",
            env={"EDGESERVE_LOG_FORMAT": "json"}, timeout_s=READY_TIMEOUT_S)).process
        llama_server = stack.enter_context(server_process(
            "llama_cpp.server", llama_server_command(target.path, target.variant, ls_port),
            f"http://127.0.0.1:{ls_port}/v1/models", workdir / f"{slug}.llama_server.log",
            timeout_s=READY_TIMEOUT_S)).process
        progress(f"loading {target.variant_id} in-process")
        inprocess = InProcessEngine(target.path, target.variant)
        stack.callback(inprocess.close)
        es_client = HttpEngine(f"http://127.0.0.1:{es_port}", target.variant_id, EDGESERVE_HEADERS)
        stack.callback(es_client.close)
        ls_client = HttpEngine(f"http://127.0.0.1:{ls_port}", target.variant_id)
        stack.callback(ls_client.close)
        engines: dict[str, Engine] = {"a": inprocess, "b": es_client, "c": ls_client}

        for key, engine in engines.items():
            engine.run(messages_for(None), WARMUP_TOKENS)
            progress(f"warmed up {ENGINES[key]}")
        result.rss_mib = {"b": vm_rss_mib(edgeserve.pid), "c": vm_rss_mib(llama_server.pid)}

        meter = CpuMeter([os.getpid(), edgeserve.pid, llama_server.pid])
        for index in range(args.runs):
            for key, sample in run_triple(engines, meter, index, args, result).items():
                result.samples[key].append(sample)
    return result


def run_triple(engines: dict[str, Engine], meter: CpuMeter, index: int,
               args: argparse.Namespace, result: VariantResult) -> dict[str, Sample]:
    """Run index `index` on a, b and c once the machine is quiet; measure the triple again (up to
    --noise-retries times) when other processes used more than --noise-cores during any of its
    three runs."""
    attempt = 0
    while True:
        wait_for_quiet(meter, args.noise_cores)
        triple: dict[str, Sample] = {}
        for key, engine in engines.items():
            sample = measured_run(engine, meter, messages_for(index), args.max_tokens)
            triple[key] = sample
            progress(f"{result.variant_id} run {index + 1}/{args.runs} {ENGINES[key]}: "
                     f"{sample.decode_tps:.1f} tok/s, TTFT {sample.ttft_ms:.0f} ms, "
                     f"{sample.tokens} tokens, other processes {sample.other_cores:.2f} cores")
        noise = max(s.other_cores for s in triple.values())
        if not noise > args.noise_cores:  # also when noise is nan (no /proc)
            return triple
        if attempt >= args.noise_retries:
            result.disturbed += 1
            progress(f"run {index + 1} kept although disturbed ({noise:.2f} cores)")
            return triple
        attempt += 1
        result.repeated += 1
        progress(f"run {index + 1} disturbed ({noise:.2f} cores > {args.noise_cores}); "
                 f"measuring it again (retry {attempt}/{args.noise_retries})")


# ---- report ------------------------------------------------------------------------------------


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def median_of(values: list[float]) -> float:
    finite = _finite(values)
    return statistics.median(finite) if finite else math.nan


def mean_of(values: list[float]) -> float:
    finite = _finite(values)
    return statistics.fmean(finite) if finite else math.nan


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def median_decode(result: VariantResult, key: str) -> float:
    return median_of([s.decode_tps for s in result.samples[key]])


def paired_ratio(result: VariantResult, top: str, bottom: str) -> float:
    """Median over run indices of decode(top) / decode(bottom) within the same triple."""
    pairs = zip(result.samples[top], result.samples[bottom], strict=True)
    return median_of([t.decode_tps / b.decode_tps for t, b in pairs if b.decode_tps > 0])


def engine_cells(result: VariantResult, key: str) -> str:
    samples = result.samples[key]
    decode = [s.decode_tps for s in samples]
    ttft = [s.ttft_ms for s in samples]
    finite = _finite(decode)
    spread = f"{min(finite):.1f}–{max(finite):.1f}" if finite else "n/a"
    cells = [_fmt(median_of(decode)), _fmt(mean_of(decode)), spread, _fmt(median_of(ttft)),
             _fmt(mean_of(ttft)), _fmt(mean_of([float(s.tokens) for s in samples])),
             _fmt(result.rss_mib.get(key), 0), _fmt(mean_of([s.other_cores for s in samples]), 2)]
    return " | ".join(cells)


def render_report(results: list[VariantResult], args: argparse.Namespace, load_before: str) -> str:
    first = results[0].variant if results else None
    header = [
        f"Measured {dt.datetime.now().astimezone().isoformat(timespec='minutes')} on "
        f"{platform.node() or 'this host'} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, llama-cpp-python {_llama_cpp_version()}, "
        f"edgeserve {_source_version()}); load average {load_before} before, "
        f"{_load_average()} after.",
        f"{args.runs} runs per engine, interleaved a,b,c; max_tokens {args.max_tokens}; "
        f"temperature {TEMPERATURE}; prompt \"{PROMPT}\" with one keeper name per run index "
        "(edgeserve gets X-Budget-Hint: off, so all three see the same prompt).",
    ]
    if first is not None:
        source = "--threads" if args.threads is not None else "models.toml"
        header.append(f"n_threads {first.threads} (from {source}), n_ctx {first.n_ctx}, "
                      f"n_batch {first.n_batch} for all three engines.")
    rows = [
        "| variant | engine | decode tok/s median | decode tok/s mean | decode tok/s min–max "
        "| TTFT ms median | TTFT ms mean | tokens/run mean | VmRSS MiB | other CPU, cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for key, label in ENGINES.items():
            rows.append(f"| {result.variant_id} | {label} | {engine_cells(result, key)} |")
    ratios = [
        "| variant | (b)/(a) of median decode | (b)/(c) of median decode "
        "| (b)/(a) per-run median | (b)/(c) per-run median "
        "| triples repeated for noise | kept disturbed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        a, b, c = (median_decode(result, k) for k in ("a", "b", "c"))
        ratios.append(f"| {result.variant_id} | {_fmt(b / a, 3)} | {_fmt(b / c, 3)} "
                      f"| {_fmt(paired_ratio(result, 'b', 'a'), 3)} "
                      f"| {_fmt(paired_ratio(result, 'b', 'c'), 3)} "
                      f"| {result.repeated} | {result.disturbed} |")
    footnote = (
        "VmRSS: of the (b) edgeserve subprocess serving only that variant and of the (c) "
        "llama_cpp.server subprocess, each read from /proc right after loading the variant and "
        f"generating {WARMUP_TOKENS} warm-up tokens; (a) runs inside the bench process and is not "
        "measured. Other CPU: mean CPU used by processes other than the bench and its two "
        "servers during a run (from /proc/stat); a triple where it exceeded "
        f"{args.noise_cores} cores was measured again, up to {args.noise_retries} times, and "
        f"each triple waited (up to {QUIET_WAIT_S:.0f} s) for a quiet second first. "
        "Per-run median: the median over run indices of the ratio within one triple. "
        "Targets: (b) >= 0.95 x (a) and (b) >= 1.10 x (c) in median decode tok/s."
    )
    return "\n".join([*header, "", *rows, "", *ratios, "", footnote]) + "\n"


def _source_version() -> str:
    """The git commit edgeserve ran from, marked when the work tree had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} + uncommitted changes" if dirty.strip() else commit


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _llama_cpp_version() -> str:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except ImportError:
        return "?"


# ---- concurrency: C clients streaming at once ---------------------------------------------------
#
# `edgeserve bench --concurrency 1,2,4,8`: for each concurrency C, C clients stream at once, each its
# own prompt. Engines: edgeserve (parallel = the largest C), llama.cpp's own `llama-server` (--parallel
# the largest C, -c n_ctx × that, so every slot has edgeserve's per-sequence context; --cont-batching)
# and `python -m llama_cpp.server` (one request at a time), plus the in-process loop at C = 1. Only one
# model process runs at a time: each (run, C, engine) starts its server, warms it up, measures and
# stops it, in the order run 1: C=1 every engine, C=2 every engine, …; run 2: …

CONCURRENT_ENGINES = {
    "inprocess": "llama-cpp-python in-process",
    "edgeserve": "edgeserve",
    "llama-server": "llama-server",
    "llama_cpp.server": "llama_cpp.server",
}
# one name per stream: stream i gets the same prompt in every engine and every run
STREAM_NAMES = ("Ada", "Bram", "Celia", "Dorian", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas",
                "Katja", "Lior", "Mira", "Nils", "Olga", "Piet")
CONCURRENT_READY_TIMEOUT_S = 600.0  # edgeserve's first start may measure its batching factors


def stream_messages(stream: int) -> Messages:
    """Stream i's prompt, the same in every engine and run; servers restart for every
    measurement, so a prompt never meets a KV cache a previous measurement left behind."""
    name = STREAM_NAMES[stream % len(STREAM_NAMES)]
    if stream >= len(STREAM_NAMES):
        name = f"{name} the {stream // len(STREAM_NAMES) + 1}."
    return [{"role": "user", "content": PROMPT.format(name=name)}]


def parse_levels(text: str) -> list[int]:
    """`--concurrency 1,2,4,8` → [1, 2, 4, 8] (sorted, without repeats); ValueError otherwise."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--concurrency wants comma-separated integers, got '{text}'") from None
    if not levels or levels[0] < 1 or levels[-1] > 64:
        raise ValueError(f"--concurrency levels must be in 1..64, got '{text}'")
    return levels


def run_plan(levels: list[int], runs: int, engines: list[str]) -> list[tuple[int, int, str]]:
    """(run, concurrency, engine) in the order they are measured: every engine at the first level,
    then every engine at the next, …, the whole sweep `runs` times. The in-process loop serves one
    stream, so it runs at C = 1 only."""
    return [(run, level, engine) for run in range(runs) for level in levels for engine in engines
            if engine != "inprocess" or level == 1]


@dataclass(frozen=True)
class StreamResult:
    """One client's stream; times are time.perf_counter() values (nan: no content came)."""

    sent: float
    first: float  # first non-empty content delta
    last: float  # last non-empty content delta
    ended: float  # the stream closed
    tokens: int  # completion tokens as the server reported them (never counted from SSE chunks)
    source: str  # where `tokens` came from: usage, timings, length, retokenized, generated
    prompt_tokens: int | None = None

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.sent) * 1000

    @property
    def decode_tps(self) -> float:
        """This stream's decode speed: (tokens - 1) / (last delta - first delta). The first token
        comes alone (edgeserve hands later text over in ~25 ms pieces), so the span covers
        tokens - 1 steps."""
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else math.nan


def _payloads(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    payloads = []
    for _, line in lines:
        payload = line[len("data:"):].strip() if line.startswith("data:") else ""
        if payload and payload != "[DONE]":
            payloads.append(json.loads(payload))
    return payloads


def completion_count(payloads: list[dict[str, Any]], max_tokens: int,
                     retokenize: Any = None) -> tuple[int, str, int | None]:
    """(completion tokens, where the figure came from, prompt tokens or None) of one stream:
    `usage` (stream_options.include_usage) first, then llama-server-style `timings.predicted_n`,
    then finish_reason `length` (exactly max_tokens), and only then the streamed text tokenized
    again by `retokenize` (text → count), for a server that reports none of these."""
    for chunk in reversed(payloads):
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            return int(usage["completion_tokens"]), "usage", usage.get("prompt_tokens")
    for chunk in reversed(payloads):
        timings = chunk.get("timings")
        if timings and timings.get("predicted_n") is not None:
            return int(timings["predicted_n"]), "timings", timings.get("prompt_n")
    finishes = [c.get("finish_reason") for chunk in payloads for c in chunk.get("choices") or []]
    if "length" in finishes:
        return max_tokens, "length", None
    if retokenize is not None:
        text = "".join((c.get("delta") or {}).get("content") or ""
                       for chunk in payloads for c in chunk.get("choices") or [])
        return int(retokenize(text)), "retokenized", None
    raise RuntimeError("the server reported no completion token count (no usage, no timings)")


def stream_result(sent: float, ended: float, lines: list[tuple[float, str]], max_tokens: int,
                  retokenize: Any = None) -> StreamResult:
    stamps = content_stamps(lines)
    tokens, source, prompt = completion_count(_payloads(lines), max_tokens, retokenize)
    first, last = (stamps[0], stamps[-1]) if stamps else (math.nan, math.nan)
    return StreamResult(sent, first, last, ended, tokens, source, prompt)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of the finite values, interpolated linearly between the two
    nearest ranks (numpy's default); nan when there are none."""
    finite = sorted(_finite(values))
    if not finite:
        return math.nan
    position = (len(finite) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(finite) - 1)
    return finite[low] + (finite[high] - finite[low]) * (position - low)


@dataclass(frozen=True)
class LevelSample:
    """One engine at one concurrency in one run: C streams started together."""

    engine: str
    concurrency: int
    run: int
    streams: tuple[StreamResult, ...]
    other_cores: float = math.nan

    @property
    def wall_s(self) -> float:
        """From the first request sent to the last stream ended."""
        return max(s.ended for s in self.streams) - min(s.sent for s in self.streams)

    @property
    def aggregate_tps(self) -> float:
        """All streams' completion tokens over the wall time."""
        wall = self.wall_s
        return sum(s.tokens for s in self.streams) / wall if wall > 0 else math.nan

    @property
    def stream_tps(self) -> float:
        """The median stream's decode tokens/s."""
        return median_of([s.decode_tps for s in self.streams])

    def ttft_ms(self, q: float) -> float:
        return percentile([s.ttft_ms for s in self.streams], q)

    @property
    def tokens_mean(self) -> float:
        return mean_of([float(s.tokens) for s in self.streams])


def _aggregate(sample: LevelSample) -> float:
    return sample.aggregate_tps


def _stream(sample: LevelSample) -> float:
    return sample.stream_tps


def _ttft50(sample: LevelSample) -> float:
    return sample.ttft_ms(50)


def _ttft99(sample: LevelSample) -> float:
    return sample.ttft_ms(99)


# the figures of one LevelSample the report shows, by name
METRICS: dict[str, Callable[[LevelSample], float]] = {
    "aggregate": _aggregate, "stream": _stream, "ttft50": _ttft50, "ttft99": _ttft99,
}


def median_spread(values: list[float], digits: int = 1) -> str:
    """`median (min–max)` of the finite values, `n/a` without any."""
    finite = _finite(values)
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return _fmt(finite[0], digits)
    return f"{_fmt(statistics.median(finite), digits)} ({_fmt(min(finite), digits)}–{_fmt(max(finite), digits)})"


def select(samples: list[LevelSample], engine: str, level: int) -> list[LevelSample]:
    return sorted((s for s in samples if s.engine == engine and s.concurrency == level), key=lambda s: s.run)


def per_run_ratios(samples: list[LevelSample], level: int, top: str, bottom: str, metric: str,
                   bottom_level: int | None = None) -> list[float]:
    """metric(top) / metric(bottom) within each run (both measured in the same sweep)."""
    get = METRICS[metric]
    bottoms = {s.run: get(s) for s in select(samples, bottom, level if bottom_level is None else bottom_level)}
    ratios = []
    for sample in select(samples, top, level):
        low = bottoms.get(sample.run, math.nan)
        if math.isfinite(low) and low > 0:
            ratios.append(get(sample) / low)
    return ratios


def metric_median(samples: list[LevelSample], engine: str, level: int, metric: str) -> float:
    return median_of([METRICS[metric](s) for s in select(samples, engine, level)])


@dataclass(frozen=True)
class TargetCheck:
    name: str
    measured: str
    met: bool | None  # None: not measured


def target_checks(samples: list[LevelSample], levels: list[int]) -> list[TargetCheck]:
    """Issue 13's targets, judged on the medians (ratios: the median of the per-run ratios)."""
    checks: list[TargetCheck] = []
    for level in (4, 8):
        ratios = per_run_ratios(samples, level, "edgeserve", "llama-server", "aggregate")
        name = f"aggregate tok/s at {level} streams ≥ 1.0× llama-server"
        if level not in levels or not ratios:
            checks.append(TargetCheck(name, "not measured", None))
            continue
        value = statistics.median(ratios)
        checks.append(TargetCheck(name, f"{median_spread(ratios, 2)}×", value >= 1.0))
    es, ls = (metric_median(samples, e, 4, "ttft99") for e in ("edgeserve", "llama-server"))
    name = "TTFT p99 at 4 streams ≤ llama-server's"
    if 4 in levels and math.isfinite(es) and math.isfinite(ls):
        checks.append(TargetCheck(name, f"{es:.0f} ms vs {ls:.0f} ms", es <= ls))
    else:
        checks.append(TargetCheck(name, "not measured", None))
    ratios = per_run_ratios(samples, 1, "edgeserve", "inprocess", "stream")
    name = "single-stream decode ≥ 0.95× the in-process loop"
    if ratios:
        checks.append(TargetCheck(name, f"{median_spread(ratios, 3)}×", statistics.median(ratios) >= 0.95))
    else:
        checks.append(TargetCheck(name, "not measured", None))
    return checks


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def concurrency_table(samples: list[LevelSample], levels: list[int], engines: list[str]) -> list[str]:
    rows = [
        "| streams | engine | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p99 ms "
        "| tokens/stream | other CPU, cores |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        for engine in engines:
            chosen = select(samples, engine, level)
            if not chosen:
                continue
            cells = [median_spread([METRICS[m](s) for s in chosen], 0 if m.startswith("ttft") else 1)
                     for m in METRICS]
            tokens = _fmt(mean_of([s.tokens_mean for s in chosen]), 1)
            other = _fmt(mean_of([s.other_cores for s in chosen]), 2)
            rows.append(f"| {level} | {CONCURRENT_ENGINES[engine]} | {' | '.join(cells)} | {tokens} | {other} |")
    return rows


def ratio_table(samples: list[LevelSample], levels: list[int]) -> list[str]:
    rows = [
        "| streams | aggregate edgeserve / llama-server | aggregate edgeserve / llama_cpp.server "
        "| TTFT p99 edgeserve / llama-server | per-stream edgeserve / in-process |",
        "|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        cells = [
            median_spread(per_run_ratios(samples, level, "edgeserve", "llama-server", "aggregate"), 2),
            median_spread(per_run_ratios(samples, level, "edgeserve", "llama_cpp.server", "aggregate"), 2),
            median_spread(per_run_ratios(samples, level, "edgeserve", "llama-server", "ttft99"), 2),
            median_spread(per_run_ratios(samples, level, "edgeserve", "inprocess", "stream", 1), 3)
            if level == 1 else "—",
        ]
        rows.append(f"| {level} | {' | '.join(cells)} |")
    return rows


@dataclass(frozen=True)
class ConcurrencySetup:
    variant_id: str
    levels: list[int]
    runs: int
    max_tokens: int
    threads: int
    n_ctx: int
    n_batch: int
    parallel: int
    engines: list[str]
    llama_server: str | None  # the binary's path and version, or None when not given
    load_before: str = "n/a"
    load_after: str = "n/a"
    repeated: int = 0  # measurements taken again because other processes were busy
    disturbed: int = 0  # measurements kept although still disturbed after the last retry
    noise_cores: float = 0.25
    noise_retries: int = 3
    when: str = ""
    machine: str = ""


def token_sources(samples: list[LevelSample]) -> dict[str, list[str]]:
    sources: dict[str, set[str]] = {}
    for sample in samples:
        sources.setdefault(sample.engine, set()).update(s.source for s in sample.streams)
    return {engine: sorted(found) for engine, found in sources.items()}


def render_concurrency_report(samples: list[LevelSample], setup: ConcurrencySetup) -> str:
    levels, engines = setup.levels, setup.engines
    header = [
        f"Measured {setup.when or 'n/a'} on {setup.machine or 'this host'}; load average "
        f"{setup.load_before} before, {setup.load_after} after.",
        f"Variant {setup.variant_id}; concurrency {', '.join(map(str, levels))}; {setup.runs} runs; "
        f"max_tokens {setup.max_tokens}; temperature {TEMPERATURE}; stream i's prompt \"{PROMPT}\" with "
        "the i-th name, the same in every engine and run; no engine was asked to ignore end of sequence "
        "(edgeserve has no such field), so tokens/stream shows how long the answers ran.",
        f"n_threads {setup.threads} for every engine; n_ctx {setup.n_ctx} per sequence (edgeserve "
        f"parallel = {setup.parallel}; llama-server --parallel {setup.parallel} -c "
        f"{setup.n_ctx * setup.parallel} --cont-batching; llama_cpp.server --n_ctx {setup.n_ctx}, one "
        f"request at a time); n_batch {setup.n_batch}.",
        "One model process at a time: for every (run, streams, engine) the server was started, warmed "
        "up with one short request, measured and stopped; runs interleave the engines at each level.",
    ]
    if setup.llama_server is None:
        header.append("llama-server: skipped (no --llama-server PATH given).")
    else:
        header.append(f"llama-server: {setup.llama_server}.")
    sources = token_sources(samples)
    header.append("Completion tokens per stream as the server reported them: " + "; ".join(
        f"{CONCURRENT_ENGINES[e]}: {', '.join(sources[e])}" for e in engines if e in sources) + ".")
    checks = [
        "| target | measured | |",
        "|---|---:|---|",
        *(f"| {c.name} | {c.measured} | {_verdict(c.met)} |" for c in target_checks(samples, levels)),
    ]
    footnote = (
        "Cells: median over runs (min–max). Aggregate tok/s: the completion tokens of all streams "
        "(as each server reported them, never counted from SSE chunks: usage = `usage.completion_tokens`, "
        "length = finish_reason `length`, i.e. exactly max_tokens, retokenized = the streamed text "
        "tokenized again, generated = counted in-process) over the wall time from the first request "
        "sent to the last stream ended. Per-stream tok/s: the median stream's (tokens − 1) / (last "
        "content delta − first). TTFT: first non-empty content delta − request sent, p50/p99 over the "
        "streams of one run (linear interpolation). Ratios: within each run, then median (min–max) "
        "over runs. Other CPU: cores used by other processes during a measurement; one above "
        f"{setup.noise_cores} cores was measured again (server restarted), up to {setup.noise_retries} "
        f"times: {setup.repeated} repeated, {setup.disturbed} kept disturbed."
    )
    return "\n".join([*header, "", *concurrency_table(samples, levels, engines), "",
                      *ratio_table(samples, levels), "", *checks, "", footnote]) + "\n"


# -- running it --


def pinned_variant_toml(family: str, variant: VariantConfig, gguf: Path, parallel: int) -> str:
    """A models file serving one prepared GGUF file (`path =`) with `parallel` places."""

    def quoted(value: str) -> str:
        return json.dumps(value)

    lines = ["[[families]]", f"name = {quoted(family)}", f"default_variant = {quoted(variant.name)}", "",
             "[[families.variants]]", f"name = {quoted(variant.name)}", f"path = {quoted(str(gguf))}",
             f"n_ctx = {variant.n_ctx}", f"n_threads = {variant.threads}", f"n_batch = {variant.n_batch}",
             f"parallel = {parallel}"]
    if variant.chat_template is not None:
        lines.append(f"chat_template = {quoted(variant.chat_template)}")
    return "\n".join(lines) + "\n"


def native_llama_server_command(binary: Path, path: Path, variant: VariantConfig, parallel: int,
                                port: int) -> list[str]:
    """llama.cpp's own server with `parallel` slots of n_ctx tokens each, the variant's threads."""
    threads = str(variant.threads)
    return [str(binary), "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
            "--threads", threads, "--threads-batch", threads, "--ctx-size", str(variant.n_ctx * parallel),
            "--parallel", str(parallel), "--cont-batching", "--batch-size", str(variant.n_batch),
            "--no-webui"]


def llama_cpp_server_queue_command(path: Path, variant: VariantConfig, port: int) -> list[str]:
    """llama_cpp.server, queueing concurrent requests (by default a new one interrupts the running one)."""
    return [*llama_server_command(path, variant, port), "--interrupt_requests", "False"]


def llama_server_version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"version unknown ({exc})"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    wanted = [line for line in lines if line.startswith(("version", "built with"))]
    return "; ".join(wanted or lines[-2:]) or "version unknown"


def http_streams(base_url: str, model: str, headers: dict[str, str] | None, prompts: list[Messages],
                 max_tokens: int) -> list[tuple[float, float, list[tuple[float, str]]]]:
    """Send every prompt at once, each on its own connection and thread, streaming; returns per
    stream (sent, ended, timestamped lines). Lines are parsed only afterwards."""
    barrier = threading.Barrier(len(prompts))

    def one(messages: Messages) -> tuple[float, float, list[tuple[float, str]]]:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": TEMPERATURE,
                "repeat_penalty": REPEAT_PENALTY, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[tuple[float, str]] = []
        with httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
            barrier.wait(timeout=60)
            sent = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise RuntimeError(f"{base_url} answered {response.status_code}: {response.text[:500]}")
                for line in response.iter_lines():
                    lines.append((time.perf_counter(), line))
            return sent, time.perf_counter(), lines

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(one, messages) for messages in prompts]
        try:
            return [future.result() for future in futures]
        except BaseException:
            barrier.abort()
            raise


class ConcurrentBench:
    """Starts one engine at a time for one target and measures C streams on it."""

    def __init__(self, target: Target, args: argparse.Namespace, workdir: Path, parallel: int) -> None:
        self.target, self.args, self.workdir, self.parallel = target, args, workdir, parallel
        self.models = workdir / "edgeserve.models.toml"
        self.models.write_text(pinned_variant_toml(target.family.name, target.variant, target.path, parallel))
        # edgeserve keeps its cost profiles here, not in --cache-dir: a copy of the stored ones (so it
        # need not calibrate at every start), updated by its own runs only
        self.cache_dir = workdir / "edgeserve-cache"
        stored = args.cache_dir / "profiles"
        if stored.is_dir():
            shutil.copytree(stored, self.cache_dir / "profiles")
        self._tokenizer: Any = None

    def retokenize(self, text: str) -> int:
        if self._tokenizer is None:
            import llama_cpp

            self._tokenizer = llama_cpp.Llama(model_path=str(self.target.path), vocab_only=True, verbose=False)
        return len(self._tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()

    def measure(self, engine: str, level: int, run: int, meter_cores: float) -> tuple[LevelSample, int]:
        """Measure `engine` at `level`, again with a freshly started engine while other processes
        disturbed it (up to --noise-retries times); returns the sample and how often it was repeated."""
        attempt = 0
        while True:
            sample = self._measure_once(engine, level, run)
            if not sample.other_cores > meter_cores or attempt >= self.args.noise_retries:
                return sample, attempt
            attempt += 1
            progress(f"{engine} at {level} streams disturbed ({sample.other_cores:.2f} cores > {meter_cores}); "
                     f"measuring again (retry {attempt}/{self.args.noise_retries})")

    def _measure_once(self, engine: str, level: int, run: int) -> LevelSample:
        prompts = [stream_messages(i) for i in range(level)]
        max_tokens = self.args.max_tokens
        if engine == "inprocess":
            inprocess = InProcessEngine(self.target.path, self.target.variant)
            try:
                inprocess.run(messages_for(None), WARMUP_TOKENS)
                meter = CpuMeter([os.getpid()])
                wait_for_quiet(meter, self.args.noise_cores)
                before = meter.snapshot()
                sent, stamps = inprocess.generate(prompts[0], max_tokens)
                ended = time.perf_counter()
                other = meter.other_cores(before, meter.snapshot())
            finally:
                inprocess.close()
            first, last = (stamps[0], stamps[-1]) if stamps else (math.nan, math.nan)
            alone = StreamResult(sent, first, last, ended, len(stamps), "generated")
            return LevelSample(engine, level, run, (alone,), other)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = self.workdir / f"{engine}.c{level}.r{run + 1}.log"
        headers: dict[str, str] | None = None
        env: dict[str, str] | None = None
        if engine == "edgeserve":
            command = edgeserve_command(self.models, self.cache_dir, port)
            ready, headers, env = f"{base}/ready", EDGESERVE_HEADERS, {"EDGESERVE_LOG_FORMAT": "json"}
        elif engine == "llama-server":
            command = native_llama_server_command(self.args.llama_server, self.target.path, self.target.variant,
                                                  self.parallel, port)
            ready = f"{base}/health"
        else:
            command = llama_cpp_server_queue_command(self.target.path, self.target.variant, port)
            ready = f"{base}/v1/models"
        model = self.target.variant_id
        retokenize = self.retokenize if engine == "llama_cpp.server" else None
        with server_process(engine, command, ready, log, env=env, timeout_s=CONCURRENT_READY_TIMEOUT_S) as server:
            http_streams(base, model, headers, [messages_for(None)], WARMUP_TOKENS)
            meter = CpuMeter([os.getpid(), server.process.pid])
            wait_for_quiet(meter, self.args.noise_cores)
            before = meter.snapshot()
            raw = http_streams(base, model, headers, prompts, max_tokens)
            other = meter.other_cores(before, meter.snapshot())
        streams = tuple(stream_result(sent, ended, lines, max_tokens, retokenize) for sent, ended, lines in raw)
        return LevelSample(engine, level, run, streams, other)


def bench_concurrency(target: Target, args: argparse.Namespace, levels: list[int], workdir: Path) -> str:
    parallel = max(levels)
    engines = ["inprocess", "edgeserve"] if 1 in levels else ["edgeserve"]
    version = None
    if args.llama_server is not None:
        engines.append("llama-server")
        version = f"`{args.llama_server}`, {llama_server_version(args.llama_server)}"
    engines.append("llama_cpp.server")
    setup = ConcurrencySetup(
        variant_id=target.variant_id, levels=levels, runs=args.runs, max_tokens=args.max_tokens,
        threads=target.variant.threads, n_ctx=target.variant.n_ctx, n_batch=target.variant.n_batch,
        parallel=parallel, engines=engines, llama_server=version, load_before=_load_average(),
        noise_cores=args.noise_cores, noise_retries=args.noise_retries,
        when=dt.datetime.now().astimezone().isoformat(timespec="minutes"),
        machine=(f"{platform.node() or 'this host'} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}, llama-cpp-python {_llama_cpp_version()}, edgeserve "
                 f"{_source_version()})"))
    bench = ConcurrentBench(target, args, workdir, parallel)
    samples: list[LevelSample] = []
    repeated = disturbed = 0
    try:
        for run, level, engine in run_plan(levels, args.runs, engines):
            sample, retries = bench.measure(engine, level, run, args.noise_cores)
            repeated += retries
            disturbed += int(sample.other_cores > args.noise_cores)
            samples.append(sample)
            progress(f"run {run + 1}/{args.runs}, {level} streams, {engine}: {sample.aggregate_tps:.1f} tok/s "
                     f"aggregate, {sample.stream_tps:.1f} per stream, TTFT p50 {sample.ttft_ms(50):.0f} ms "
                     f"p99 {sample.ttft_ms(99):.0f} ms, {sample.tokens_mean:.0f} tokens/stream, "
                     f"other processes {sample.other_cores:.2f} cores")
    finally:
        bench.close()
    setup = dataclasses.replace(setup, load_after=_load_average(), repeated=repeated, disturbed=disturbed)
    return render_concurrency_report(samples, setup)


# ---- command line ------------------------------------------------------------------------------


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    """The arguments of `edgeserve bench` (the subcommand is in edgeserve.cli's table)."""
    bench.add_argument("--models", type=Path, default=default_models_path(),
                       help="models file (env EDGESERVE_MODELS; default ./models.toml)")
    bench.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help="where prepared models go (env EDGESERVE_CACHE_DIR)")
    bench.add_argument("--variant", default=DEFAULT_VARIANT,
                       help=f"family:variant to bench, a family (its default variant) or `all` "
                            f"(default {DEFAULT_VARIANT})")
    bench.add_argument("--runs", type=int, default=5, help="measured runs per engine (default 5)")
    bench.add_argument("--max-tokens", type=int, default=128,
                       help="tokens to generate per run (default 128)")
    bench.add_argument("--noise-cores", type=float, default=0.25,
                       help="a run triple during which other processes used more CPU than this "
                            "(in cores) is measured again (default 0.25)")
    bench.add_argument("--noise-retries", type=int, default=3,
                       help="how often to measure a disturbed triple again before keeping it "
                            "(default 3; 0 keeps every triple)")
    bench.add_argument("--threads", type=int,
                       help="override n_threads (and n_threads_batch) of models.toml for all engines")
    bench.add_argument("--out", type=Path, help="also write the markdown report to this file")
    bench.add_argument("--concurrency", metavar="LIST",
                       help="concurrency mode: for each C in this comma-separated list (e.g. 1,2,4,8), C clients "
                            "stream at once; aggregate and per-stream tok/s, TTFT p50/p99 of edgeserve "
                            "(parallel = the largest C), llama-server and llama_cpp.server, one server at a time")
    bench.add_argument("--llama-server", type=Path, metavar="PATH",
                       help="llama.cpp's llama-server binary, measured in the concurrency mode with --parallel "
                            "the largest C (skipped, and said so in the report, without it)")


def with_threads(variant: VariantConfig, threads: int | None) -> VariantConfig:
    return variant if threads is None else msgspec.structs.replace(variant, n_threads=threads)


def select_targets(spec: str, args: argparse.Namespace) -> list[Target]:
    from edgeserve.runtime.prepare import prepare_models

    models = load_models_file(args.models)
    prepared = prepare_models(models, args.models.resolve().parent, args.cache_dir, progress)
    targets = [Target(f, with_threads(v, args.threads), prepared[f"{f.name}:{v.name}"].path)
               for f in models.families for v in f.variants]
    if spec == "all":
        return targets
    family_name, _, variant_name = spec.partition(":")
    family = next((f for f in models.families if f.name == family_name), None)
    variant_name = variant_name or (family.default.name if family else "")
    chosen = [t for t in targets if t.variant_id == f"{family_name}:{variant_name}"]
    if not chosen:
        known = ", ".join(t.variant_id for t in targets)
        raise ConfigError(f"unknown variant '{spec}'; use `all` or one of {known}")
    return chosen


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench as `args` say; prints the markdown report and returns an exit code."""
    if (args.runs < 1 or args.max_tokens < 2 or args.noise_retries < 0
            or (args.threads is not None and args.threads < 1)):
        print("edgeserve bench: --runs and --threads must be >= 1, --max-tokens >= 2, "
              "--noise-retries >= 0", file=sys.stderr)
        return 2
    levels: list[int] | None = None
    if getattr(args, "concurrency", None):
        try:
            levels = parse_levels(args.concurrency)
        except ValueError as exc:
            print(f"edgeserve bench: {exc}", file=sys.stderr)
            return 2
        binary = getattr(args, "llama_server", None)
        if binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
            print(f"edgeserve bench: --llama-server {binary} is not an executable file", file=sys.stderr)
            return 2
    try:
        targets = select_targets(args.variant, args)
    except EdgeserveError as exc:
        print(f"edgeserve bench: {exc.message}", file=sys.stderr)
        return 2
    if levels is not None:
        return run_concurrency_bench(targets, args, levels)
    results: list[VariantResult] = []
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="edgeserve-bench-") as tmp:
        try:
            for target in targets:
                results.append(bench_variant(target, args, Path(tmp)))
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"edgeserve bench: {exc}", file=sys.stderr)
            return 1
    report = render_report(results, args, load_before)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        progress(f"wrote {args.out}")
    return 0


def run_concurrency_bench(targets: list[Target], args: argparse.Namespace, levels: list[int]) -> int:
    if getattr(args, "llama_server", None) is None:
        progress("no --llama-server PATH: llama-server is skipped")
    # SIGTERM unwinds like an error (SystemExit), so the server being measured is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reports: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeserve-bench-") as tmp:
        try:
            for target in targets:
                workdir = Path(tmp) / target.variant_id.replace(":", "_")
                workdir.mkdir()
                reports.append(bench_concurrency(target, args, levels, workdir))
        except (RuntimeError, httpx.HTTPError, threading.BrokenBarrierError) as exc:
            print(f"edgeserve bench: {exc}", file=sys.stderr)
            return 1
    report = "\n".join(reports)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        progress(f"wrote {args.out}")
    return 0
