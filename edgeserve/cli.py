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
from typing import Any, TypeVar, cast

from edgeserve.cachedir import ensure_writable
from edgeserve.config import (
    default_cache_dir,
    default_models_path,
    load_models_file,
)
from edgeserve.errors import EdgeserveError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=default_models_path(),
                        help="models file (env EDGESERVE_MODELS; default ./models.toml)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where prepared models go (env EDGESERVE_CACHE_DIR)")


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    from edgeserve.settings import add_serve_arguments

    add_serve_arguments(serve)


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
        if p.tokens_per_step > 1:
            print(f"  speculative pair: {p.tokens_per_step:.2f} tokens per step on the calibration text")
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
    """One settings object from the flags and the environment; the composition root does the rest."""
    from edgeserve.server import serve
    from edgeserve.settings import build_settings

    return serve(build_settings(args, os.environ))


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
