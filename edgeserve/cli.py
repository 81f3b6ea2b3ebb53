"""edgeserve serve | models prepare | bench"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from edgeserve.cachedir import ensure_writable
from edgeserve.config import (
    ServerSettings,
    default_cache_dir,
    default_models_path,
    load_models_file,
    load_policy,
)
from edgeserve.errors import EdgeserveError
from edgeserve.routing.policy_file import PolicyFile

if TYPE_CHECKING:
    from edgeserve.runtime.loader import ResidencyManager
    from edgeserve.runtime.registry import ModelRegistry


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"edgeserve: {name}={value!r} is not an integer") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=default_models_path(),
                        help="models file (env EDGESERVE_MODELS; default ./models.toml)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where prepared models go (env EDGESERVE_CACHE_DIR)")


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    _add_common(serve)
    serve.add_argument("--host", default=os.environ.get("EDGESERVE_HOST", "127.0.0.1"),
                       help="bind address (env EDGESERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=_env_int("EDGESERVE_PORT", 8080),
                       help="port (env EDGESERVE_PORT; default 8080)")
    serve.add_argument("--slots", type=int, default=_env_int("EDGESERVE_SLOTS", 1),
                       help="generations at once across all variants (env EDGESERVE_SLOTS; default 1)")
    serve.add_argument("--log-format", choices=["auto", "json", "console"],
                       default=os.environ.get("EDGESERVE_LOG_FORMAT", "auto"))
    serve.add_argument("--policy", type=Path, default=os.environ.get("EDGESERVE_POLICY"),
                       help="routing policy file (env EDGESERVE_POLICY; default: policies/default.toml "
                            "beside the models file, else built-in settings without quality curves)")
    serve.add_argument("--default-deadline-ms", type=int,
                       default=_env_int("EDGESERVE_DEFAULT_DEADLINE_MS", 0) or None,
                       help="deadline for requests without X-Deadline-Ms (env EDGESERVE_DEFAULT_DEADLINE_MS; "
                            "default none = best quality)")
    serve.add_argument("--grace-s", type=float, default=float(_env_int("EDGESERVE_GRACE_S", 30)),
                       help="on SIGTERM, how long admitted requests may take to finish (env EDGESERVE_GRACE_S)")
    serve.add_argument("--memory-check", choices=["warn", "refuse", "off"],
                       default=os.environ.get("EDGESERVE_MEMORY_CHECK", "warn"),
                       help="when the variants do not fit in available RAM (env EDGESERVE_MEMORY_CHECK)")
    serve.add_argument("--memory-budget", default=os.environ.get("EDGESERVE_MEMORY_BUDGET"),
                       help="memory for resident variants, e.g. 600MiB, 1.5GiB or bytes; variants that do not "
                            "all fit are loaded on demand, least recently used evicted (env "
                            "EDGESERVE_MEMORY_BUDGET; default: available RAM minus a margin)")
    serve.add_argument("--min-residency-s", type=float,
                       default=float(os.environ.get("EDGESERVE_MIN_RESIDENCY_S", "5")),
                       help="a loaded variant is not evicted for this long, so alternating requests do not "
                            "thrash (env EDGESERVE_MIN_RESIDENCY_S; default 5)")
    serve.add_argument("--max-queue", type=int, default=_env_int("EDGESERVE_MAX_QUEUE", 64),
                       help="requests waiting for a slot before new ones get 429 (env EDGESERVE_MAX_QUEUE)")
    # -- bad input and authentication (issue 8) --
    serve.add_argument("--max-body-bytes", type=int, default=_env_int("EDGESERVE_MAX_BODY_BYTES", 1024 * 1024),
                       help="larger request bodies get 413 (env EDGESERVE_MAX_BODY_BYTES; default 1 MiB)")
    serve.add_argument("--api-key", action="append", default=[],
                       help="accept this key as 'Authorization: Bearer KEY'; repeatable (env EDGESERVE_API_KEYS, "
                            "comma-separated); without any key the server is open")
    serve.add_argument("--api-key-file", type=Path, default=os.environ.get("EDGESERVE_API_KEY_FILE"),
                       help="a file of keys, one per line, # comments (env EDGESERVE_API_KEY_FILE)")
    serve.add_argument("--metrics-public", action="store_true",
                       default=os.environ.get("EDGESERVE_METRICS_PUBLIC", "").lower() in ("1", "true", "yes"),
                       help="serve /metrics without a key (env EDGESERVE_METRICS_PUBLIC=1); /health and /ready "
                            "are always open")


def _calibrate_arguments(calibrate: argparse.ArgumentParser) -> None:
    _add_common(calibrate)
    calibrate.add_argument("--quick", action="store_true", help="fewer points (what serve does)")


def _models_arguments(models: argparse.ArgumentParser) -> None:
    models_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = models_commands.add_parser(
        "prepare", help="derive the configured quantizations (or those of --from FILE) and cache them")
    _add_common(prepare)
    prepare.add_argument("--from", dest="source", type=Path,
                         help="a GGUF file of your own to derive variants from")
    prepare.add_argument("--family", help="family name for --from (for example llama31-8b)")
    prepare.add_argument("--quants", default="Q2_K,Q8_0", help="comma-separated, for --from")


def _load_policy(given: Path | None, models_path: Path) -> tuple[PolicyFile, str]:
    """The policy named, else policies/default.toml beside models.toml, else the built-in one."""
    from edgeserve.routing.policy_file import default_policy

    if given is not None:
        return load_policy(given), str(given)
    beside = models_path.resolve().parent / "policies" / "default.toml"
    if beside.is_file():
        return load_policy(beside), str(beside)
    return default_policy(), "built-in (no quality curves)"


def _calibrate_command(args: argparse.Namespace) -> int:
    return asyncio.run(_calibrate(args))


async def _calibrate(args: argparse.Namespace) -> int:
    from edgeserve.runtime.calibrate import CalibrationPlan, ensure_profiles, profile_path
    from edgeserve.runtime.prepare import prepare_models
    from edgeserve.runtime.registry import ModelRegistry

    models = load_models_file(args.models)
    prepared = prepare_models(models, args.models.resolve().parent, ensure_writable(args.cache_dir), print)
    registry = ModelRegistry(models, prepared)
    started = time.perf_counter()
    try:
        await registry.load_all(lambda r: print(f"{r.variant_id}: loaded in {r.load_ms or 0:.0f} ms"))
        plan = CalibrationPlan.quick() if args.quick else CalibrationPlan()
        profiles = await ensure_profiles(list(registry.runners.values()), args.cache_dir, plan, print, force=True)
    finally:
        registry.close()
    print(f"\n{'variant':22s} {'load ms':>8s} {'prefill ms/tok':>15s} {'+/1k ctx':>9s} {'decode ms/tok':>14s} "
          f"{'+/1k ctx':>9s} {'fit MAPE':>9s}")
    for variant_id, p in profiles.items():
        mape = max(p.prefill_mape or 0.0, p.decode_mape or 0.0)
        print(f"{variant_id:22s} {p.load_ms:8.0f} {p.prefill_ms_per_token:15.3f} "
              f"{p.prefill_growth_ms_per_token_per_1k_ctx:9.3f} {p.decode_ms_per_token:14.2f} "
              f"{p.decode_growth_ms_per_token_per_1k_ctx:9.3f} {mape:9.1%}")
        print(f"  -> {profile_path(args.cache_dir, p.gguf_sha256, p.n_threads, p.host)}")
    print(f"calibrated {len(profiles)} variants in {time.perf_counter() - started:.0f} s")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from edgeserve.runtime.prepare import prepare_from_file, prepare_models, sha256_of

    ensure_writable(args.cache_dir)
    if args.source is not None:
        if not args.family:
            raise SystemExit("edgeserve: --from needs --family NAME")
        quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
        results = prepare_from_file(args.source, args.family, quants, args.cache_dir, print)
        print(f"\n# add to {args.models}:\n[[families]]\nname = \"{args.family}\"")
        print(f"source = \"{args.source.resolve()}\"\nsource_sha256 = \"{sha256_of(args.source)}\"")
        for quant in results:
            print(f"\n[[families.variants]]\nname = \"{quant.lower()}\"\nquant = \"{quant}\"")
        return 0
    models = load_models_file(args.models)
    prepared = prepare_models(models, args.models.resolve().parent, args.cache_dir, print)
    for item in prepared.values():
        print(f"{item.variant_id:28s} {item.action:8s} {item.path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from edgeserve.http.app import create_app
    from edgeserve.lifecycle import serve
    from edgeserve.logging import configure_logging, get_logger
    from edgeserve.routing.policy import uncovered_variants
    from edgeserve.runtime.memory import check_memory
    from edgeserve.runtime.prepare import prepare_models
    from edgeserve.runtime.registry import ModelRegistry
    from edgeserve.runtime.scheduler import Scheduler
    from edgeserve.sdnotify import Notifier
    from edgeserve.service import Engine

    settings = ServerSettings(models_path=args.models, cache_dir=args.cache_dir, host=args.host,
                              port=args.port, slots=args.slots, log_format=args.log_format)
    if settings.slots < 1:
        raise SystemExit("edgeserve: --slots must be at least 1")
    if args.default_deadline_ms is not None and not 1 <= args.default_deadline_ms <= 3_600_000:
        raise SystemExit("edgeserve: --default-deadline-ms must be from 1 to 3600000")
    configure_logging(settings.log_format)
    log = get_logger("edgeserve")
    api_keys = _api_keys(args, settings.host, log)
    models = load_models_file(settings.models_path)
    ensure_writable(settings.cache_dir)
    policy, policy_source = _load_policy(args.policy, settings.models_path)
    prepared = prepare_models(models, settings.models_path.resolve().parent, settings.cache_dir,
                              lambda line: log.info("prepare", detail=line))
    memory = check_memory(sorted({item.path for item in prepared.values()}))
    if not memory.fits and args.memory_check == "refuse":
        raise SystemExit(f"edgeserve: {memory.message()}")
    if args.memory_check != "off":
        (log.info if memory.fits else log.warning)("memory", detail=memory.message())
    names = [v.name for f in models.families for v in f.variants]
    if missing := uncovered_variants(policy, names):
        log.warning("no_quality_curves", policy=policy_source, variants=missing,
                    detail="these variants are ranked as accuracy 0: the router picks them only when "
                           "nothing better fits; run the GSM8K sweep to write their curves")
    registry = ModelRegistry(models, prepared)
    engine = Engine(registry, Scheduler(settings.slots, args.max_queue), policy,
                    residency=_residency(args, registry, log))
    notifier = Notifier()
    app = create_app(engine, cache_dir=settings.cache_dir, default_deadline_ms=args.default_deadline_ms,
                     notifier=notifier, max_body_bytes=args.max_body_bytes, api_keys=api_keys,
                     metrics_public=args.metrics_public)
    log.info("serving", host=settings.host, port=settings.port, slots=settings.slots, policy=policy_source,
             variants=list(prepared), grace_s=args.grace_s)
    return serve(engine, app, settings.host, settings.port, notifier, args.grace_s)


def _residency(args: argparse.Namespace, registry: ModelRegistry, log: Any) -> ResidencyManager:
    """The memory budget of the local variants (issue 7) from --memory-budget/--min-residency-s."""
    from edgeserve.runtime.loader import ResidencyManager
    from edgeserve.runtime.memory import default_budget, format_bytes, parse_size

    if args.min_residency_s < 0:
        raise SystemExit("edgeserve: --min-residency-s must not be negative")
    try:
        budget = parse_size(args.memory_budget) if args.memory_budget else default_budget()
    except ValueError as exc:
        raise SystemExit(f"edgeserve: --memory-budget {exc}") from None
    manager = ResidencyManager(registry.runners, budget, args.min_residency_s)
    log.info("residency", budget=format_bytes(budget) if budget is not None else "unlimited",
             min_residency_s=args.min_residency_s,
             detail="every variant stays loaded" if manager.fits_all else
             "the variants do not all fit: they are loaded on demand, least recently used evicted")
    return manager


def _api_keys(args: argparse.Namespace, host: str, log: Any) -> tuple[str, ...]:
    """The API keys of --api-key/EDGESERVE_API_KEYS/--api-key-file (issue 8), and the warning
    when the server is reachable from other machines without one."""
    from edgeserve.http.auth import ApiKeyError, load_api_keys, open_bind_warning

    if args.max_body_bytes < 1:
        raise SystemExit("edgeserve: --max-body-bytes must be at least 1")
    try:
        keys = load_api_keys(args.api_key, os.environ.get("EDGESERVE_API_KEYS"), args.api_key_file)
    except ApiKeyError as exc:
        raise SystemExit(f"edgeserve: {exc}") from None
    if warning := open_bind_warning(host, keys):
        log.warning("UNAUTHENTICATED_PUBLIC_BIND", detail=warning)
    if keys:
        log.info("auth", api_keys=len(keys),
                 open_paths="/health, /ready" + (", /metrics" if args.metrics_public else ""))
    return keys


# ---- the subcommands: one table ------------------------------------------------------------------
# A tool's arguments and handler are "module:function" strings, imported only when its subcommand is
# parsed or run: building the parser, and `edgeserve serve`, import nothing from edgeserve.tools.

Arguments = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Arguments | str  # adds the subcommand's arguments to its parser
    run: Handler | str  # runs it; returns the exit code


COMMANDS: tuple[Command, ...] = (
    Command("serve", "serve the configured models over the OpenAI API", _serve_arguments, _serve),
    Command("calibrate", "measure every variant's costs on this board", _calibrate_arguments, _calibrate_command),
    Command("models", "manage model files", _models_arguments, _prepare),
    Command("simulate", "replay a trace through the routing policy and a simulated queue (no models)",
            "edgeserve.tools.simulate:add_simulate_arguments", "edgeserve.tools.simulate:run_simulate"),
    Command("eval", "evaluate a running edgeserve (GSM8K accuracy under deadlines, quality sweeps)",
            "edgeserve.tools.eval.cli:add_eval_arguments", "edgeserve.tools.eval.cli:run_eval"),
    Command("bench-routing", "measure the deadline router on a real server: prediction error, deadlines met",
            "edgeserve.tools.routing_bench:add_routing_bench_arguments",
            "edgeserve.tools.routing_bench:run_routing_bench"),
    Command("bench", "decode tok/s and TTFT: in-process llama-cpp-python vs edgeserve vs llama_cpp.server, "
                     "interleaved",
            "edgeserve.tools.bench:add_bench_arguments", "edgeserve.tools.bench:run_bench"),
    Command("loadtest", "Locust scenarios (steady, overload, burst) against edgeserve and llama_cpp.server, "
                        "side by side",
            "edgeserve.tools.loadtest:add_loadtest_arguments", "edgeserve.tools.loadtest:run_loadtest"),
)


def _resolve(ref: _F | str) -> _F:
    """A function, or the one a "module:function" string names (importing its module)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return cast(_F, getattr(importlib.import_module(module), name))


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser that gets its arguments when it is first used (parsed, or its help or
    usage shown), so that only the subcommand that runs has its module imported."""

    pending: Arguments | str | None = None

    def _complete(self) -> None:
        if self.pending is not None:
            add, self.pending = self.pending, None
            _resolve(add)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)
    for command in COMMANDS:
        commands.add_parser(command.name, help=command.help).pending = command.arguments
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = next(c.run for c in COMMANDS if c.name == args.command)
    try:
        return _resolve(run)(args)
    except EdgeserveError as exc:
        print(f"edgeserve: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
