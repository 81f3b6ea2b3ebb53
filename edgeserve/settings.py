"""The one settings object of `edgeserve serve`, built and validated in one function.

`add_serve_arguments` declares the flags (no defaults of their own: an absent flag is None);
`build_settings` takes the parsed flags and the environment, applies flag > environment >
default, checks every value and returns a complete, frozen `ServerSettings`, or raises a
SettingsError naming the flag. Nothing reads the environment for serving after that: the
settings are passed down (composition root: `edgeserve.server`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar, cast

import msgspec

from edgeserve.config import default_cache_dir, default_models_path
from edgeserve.errors import ConfigError

LogFormat = Literal["auto", "json", "console"]
MemoryCheck = Literal["warn", "refuse", "off"]
Calibration = Literal["quick", "full"]
MAX_DEADLINE_MS = 3_600_000
T = TypeVar("T")


class SettingsError(ConfigError):
    """A flag or environment variable of `edgeserve serve` has a value that cannot work."""


class ServerSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything one `edgeserve serve` is configured with; passed down, never global.
    (It holds the API keys: do not log it whole.)"""

    models_path: Path
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    prefill_chunk: int = 64  # prompt tokens evaluated per step beside the running streams
    max_queue: int = 64  # requests waiting for a place in a batch before new ones get 429
    default_deadline_ms: int | None = None  # for requests without X-Deadline-Ms; None: best quality
    max_body_bytes: int = 1024 * 1024
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    metrics_public: bool = False  # /metrics without a key
    memory_budget_bytes: int | None = None  # for resident variants; None: no limit
    min_residency_s: float = 5.0
    memory_check: MemoryCheck = "warn"  # when the variants do not fit in available RAM
    log_format: LogFormat = "auto"
    policy_path: Path | None = None  # --policy: overrides one family's policy file
    calibration: Calibration = "quick"  # the plan for variants without a stored profile
    grace_s: float = 30.0  # on SIGTERM, how long admitted requests may take to finish


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags of `edgeserve serve`; their environment variables and defaults are applied by
    `build_settings`, not here."""
    serve.add_argument("--models", type=Path, help="models file (env EDGESERVE_MODELS; default ./models.toml)")
    serve.add_argument("--cache-dir", type=Path, help="where prepared models go (env EDGESERVE_CACHE_DIR)")
    serve.add_argument("--host", help="bind address (env EDGESERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env EDGESERVE_PORT; default 8080)")
    serve.add_argument("--prefill-chunk", type=int,
                       help="prompt tokens evaluated per step next to the running streams: a long prompt "
                            "delays them by at most one chunk (env EDGESERVE_PREFILL_CHUNK; default 64). "
                            "How many requests share a batch is `parallel` per variant in models.toml")
    serve.add_argument("--log-format", choices=["auto", "json", "console"],
                       help="log lines as JSON or for a terminal (env EDGESERVE_LOG_FORMAT; default auto)")
    serve.add_argument("--policy", type=Path,
                       help="a routing policy file overriding its family's (env EDGESERVE_POLICY; default: "
                            "each family's own, see policies/README.md)")
    serve.add_argument("--default-deadline-ms", type=int,
                       help="deadline for requests without X-Deadline-Ms (env EDGESERVE_DEFAULT_DEADLINE_MS; "
                            "default none = best quality)")
    serve.add_argument("--grace-s", type=float,
                       help="on SIGTERM, how long admitted requests may take to finish (env EDGESERVE_GRACE_S; "
                            "default 30)")
    serve.add_argument("--memory-check", choices=["warn", "refuse", "off"],
                       help="when the variants do not fit in available RAM (env EDGESERVE_MEMORY_CHECK; "
                            "default warn)")
    serve.add_argument("--memory-budget",
                       help="memory for resident variants, e.g. 600MiB, 1.5GiB or bytes; variants that do not "
                            "all fit are loaded on demand, least recently used evicted (env "
                            "EDGESERVE_MEMORY_BUDGET; default: available RAM minus a margin)")
    serve.add_argument("--min-residency-s", type=float,
                       help="a loaded variant is not evicted for this long, so alternating requests do not "
                            "thrash (env EDGESERVE_MIN_RESIDENCY_S; default 5)")
    serve.add_argument("--max-queue", type=int,
                       help="requests waiting for a slot before new ones get 429 (env EDGESERVE_MAX_QUEUE; "
                            "default 64)")
    # -- bad input and authentication (issue 8) --
    serve.add_argument("--max-body-bytes", type=int,
                       help="larger request bodies get 413 (env EDGESERVE_MAX_BODY_BYTES; default 1 MiB)")
    serve.add_argument("--api-key", action="append", default=[],
                       help="accept this key as 'Authorization: Bearer KEY'; repeatable (env EDGESERVE_API_KEYS, "
                            "comma-separated); without any key the server is open")
    serve.add_argument("--api-key-file", type=Path,
                       help="a file of keys, one per line, # comments (env EDGESERVE_API_KEY_FILE)")
    serve.add_argument("--metrics-public", action="store_true", default=None,
                       help="serve /metrics without a key (env EDGESERVE_METRICS_PUBLIC=1); /health and /ready "
                            "are always open")


def build_settings(flags: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """Flag, else environment variable, else default; every value checked. Raises SettingsError
    naming the flag (or the variable) whose value cannot work."""

    def pick(flag: str, env: str, parse: Callable[[str], T], default: T) -> T:
        value = getattr(flags, flag, None)
        if value is not None:
            return cast(T, value)  # argparse typed it
        text = environ.get(env)
        if text is None or text == "":
            return default
        try:
            return parse(text)
        except ValueError:
            raise SettingsError(f"{env}={text!r} is not a valid value") from None

    def number(text: str) -> float:
        return float(text)

    host = pick("host", "EDGESERVE_HOST", str, "127.0.0.1")
    port = pick("port", "EDGESERVE_PORT", int, 8080)
    prefill_chunk = pick("prefill_chunk", "EDGESERVE_PREFILL_CHUNK", int, 64)
    max_queue = pick("max_queue", "EDGESERVE_MAX_QUEUE", int, 64)
    deadline = pick("default_deadline_ms", "EDGESERVE_DEFAULT_DEADLINE_MS", int, 0) or None
    max_body = pick("max_body_bytes", "EDGESERVE_MAX_BODY_BYTES", int, 1024 * 1024)
    grace_s = pick("grace_s", "EDGESERVE_GRACE_S", number, 30.0)
    min_residency_s = pick("min_residency_s", "EDGESERVE_MIN_RESIDENCY_S", number, 5.0)
    log_format = pick("log_format", "EDGESERVE_LOG_FORMAT", str, "auto")
    memory_check = pick("memory_check", "EDGESERVE_MEMORY_CHECK", str, "warn")
    budget_text = pick("memory_budget", "EDGESERVE_MEMORY_BUDGET", str, "")
    policy = pick("policy", "EDGESERVE_POLICY", Path, None)
    key_file = pick("api_key_file", "EDGESERVE_API_KEY_FILE", Path, None)
    metrics_public = getattr(flags, "metrics_public", None)
    if metrics_public is None:
        metrics_public = environ.get("EDGESERVE_METRICS_PUBLIC", "").lower() in ("1", "true", "yes")

    checks = [
        (prefill_chunk >= 1, "--prefill-chunk must be at least 1"),
        (max_queue >= 0, "--max-queue must not be negative"),
        (0 <= port <= 65535, f"--port {port} is not a TCP port (0 to 65535)"),
        (deadline is None or 1 <= deadline <= MAX_DEADLINE_MS, "--default-deadline-ms must be from 1 to 3600000"),
        (max_body >= 1, "--max-body-bytes must be at least 1"),
        (min_residency_s >= 0, "--min-residency-s must not be negative"),
        (grace_s >= 0, "--grace-s must not be negative"),
        (log_format in ("auto", "json", "console"), f"--log-format {log_format!r}: use auto, json or console"),
        (memory_check in ("warn", "refuse", "off"), f"--memory-check {memory_check!r}: use warn, refuse or off"),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    return ServerSettings(
        models_path=getattr(flags, "models", None) or default_models_path(environ),
        cache_dir=getattr(flags, "cache_dir", None) or default_cache_dir(environ),
        host=host, port=port, prefill_chunk=prefill_chunk, max_queue=max_queue, default_deadline_ms=deadline,
        max_body_bytes=max_body,
        api_keys=_api_keys(getattr(flags, "api_key", None) or [], environ.get("EDGESERVE_API_KEYS"), key_file),
        metrics_public=metrics_public,
        memory_budget_bytes=_memory_budget(budget_text),
        min_residency_s=min_residency_s,
        memory_check=cast(MemoryCheck, memory_check),  # checked above
        log_format=cast(LogFormat, log_format),
        policy_path=policy,
        grace_s=grace_s,
    )


def _api_keys(flags: list[str], env_value: str | None, key_file: Path | None) -> tuple[str, ...]:
    from edgeserve.http.auth import ApiKeyError, load_api_keys

    try:
        return load_api_keys(flags, env_value, key_file)
    except ApiKeyError as exc:
        raise SettingsError(str(exc)) from None


def _memory_budget(text: str) -> int | None:
    """--memory-budget, else available RAM at start-up minus a margin (None: unknown, no limit)."""
    from edgeserve.runtime.memory import default_budget, parse_size

    if not text:
        return default_budget()
    try:
        return parse_size(text)
    except ValueError as exc:
        raise SettingsError(f"--memory-budget {exc}") from None
