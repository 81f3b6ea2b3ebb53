"""The composition root: the whole server built from one `ServerSettings`, in one place.

`serve(settings)` configures logging, `build`s the server and runs it until it is stopped.
`build` does the I/O of start-up that must succeed before the port opens (models.toml, the
policies, preparing the model files, the memory check); `assemble` wires the parts:

    Stepper (the one loop that owns the CPU) ─ ModelRegistry (a runner per local variant, each a
      lane of the loop) ─ ResidencyManager (memory budget)
      └ Catalog: LocalVariant / RemoteVariant, one contract ─ ProfileSaver (their profiles)
    Metrics ─ Pipeline (admission → run → record) ─ Startup (lifespan: load, calibrate, probe)
      └ the litestar app (edgeserve.http.app), served by edgeserve.lifecycle
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from litestar import Litestar

from edgeserve.cachedir import ensure_writable
from edgeserve.config import ModelsFile, load_models_file
from edgeserve.errors import ConfigError
from edgeserve.http.app import create_app
from edgeserve.http.auth import open_bind_warning
from edgeserve.lifecycle import serve as serve_until_stopped
from edgeserve.logging import configure_logging, get_logger
from edgeserve.metrics import Metrics
from edgeserve.pipeline import Pipeline
from edgeserve.policies import load_family_policies
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.runtime.calibrate import CalibrationPlan
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.loader import ResidencyManager
from edgeserve.runtime.memory import check_memory, format_bytes
from edgeserve.runtime.prepare import PreparedVariant, prepare_models
from edgeserve.runtime.registry import ModelRegistry
from edgeserve.runtime.stepper import Stepper
from edgeserve.sdnotify import Notifier
from edgeserve.settings import ServerSettings
from edgeserve.startup import ProfileSaver, Startup

log = get_logger("edgeserve")


@dataclass(frozen=True)
class Server:
    settings: ServerSettings
    app: Litestar
    pipeline: Pipeline
    startup: Startup
    notifier: Notifier
    residency: ResidencyManager


def serve(settings: ServerSettings) -> int:
    """`edgeserve serve`: the exit code (0 after a graceful stop, 2 when the models could not
    be loaded)."""
    configure_logging(settings.log_format)
    if warning := open_bind_warning(settings.host, settings.api_keys):
        log.warning("UNAUTHENTICATED_PUBLIC_BIND", detail=warning)
    if settings.api_keys:
        log.info("auth", api_keys=len(settings.api_keys),
                 open_paths="/health, /ready" + (", /metrics" if settings.metrics_public else ""))
    server = build(settings)
    log.info("serving", host=settings.host, port=settings.port, prefill_chunk=settings.prefill_chunk,
             variants=[str(vid) for vid in server.pipeline.catalog.local], grace_s=settings.grace_s)
    return serve_until_stopped(server.pipeline, server.app, server.startup, settings.host, settings.port,
                               server.notifier, settings.grace_s)


def build(settings: ServerSettings, notifier: Notifier | None = None) -> Server:
    """Read and check what the server serves, prepare the model files, then `assemble`."""
    models = load_models_file(settings.models_path)
    ensure_writable(settings.cache_dir)
    policies = load_family_policies(models, settings.models_path, settings.policy_path)
    log.info("policies", sources=policies.sources)
    for warning in policies.warnings:
        log.warning("policy", detail=warning)
    prepared = prepare_models(models, settings.models_path.resolve().parent, settings.cache_dir,
                              lambda line: log.info("prepare", detail=line))
    kv_tokens = {f"{family.name}:{v.name}": v.n_ctx * (v.parallel + family.pair_sequences(v.name))
                 for family in models.families for v in family.variants}
    memory = check_memory([(item.path, kv_tokens.get(vid, 0)) for vid, item in prepared.items()])
    if not memory.fits and settings.memory_check == "refuse":
        raise ConfigError(memory.message())
    if settings.memory_check != "off":
        (log.info if memory.fits else log.warning)("memory", detail=memory.message())
    return assemble(settings, models, prepared, policies.policies, notifier or Notifier())


def assemble(settings: ServerSettings, models: ModelsFile, prepared: dict[str, PreparedVariant],
             policies: Mapping[str, PolicyFile], notifier: Notifier) -> Server:
    """Wire the parts (no I/O but reading the model files' sizes); nothing runs until the app's
    lifespan starts."""
    stepper = Stepper(settings.prefill_chunk, settings.max_queue)
    registry = ModelRegistry(models, prepared, stepper)
    residency = ResidencyManager(registry.file_runners, settings.memory_budget_bytes, settings.min_residency_s)
    if registry.pairs and not residency.fits_all:
        raise ConfigError(f"speculative pairs ({', '.join(registry.pairs)}) need their target and draft resident "
                          "together, but the memory budget cannot hold every variant: raise --memory-budget "
                          "or remove `draft` from models.toml")
    log.info("residency", budget=format_bytes(residency.budget_bytes) if residency.budget_bytes is not None
             else "unlimited", min_residency_s=settings.min_residency_s,
             detail="every variant stays loaded" if residency.fits_all else
             "the variants do not all fit: they are loaded on demand, least recently used evicted")
    catalog = Catalog.build(registry, residency, on_observed=lambda: saver.changed())
    saver = ProfileSaver(catalog.local_profiles, settings.cache_dir)  # at most every 30 s, and at exit
    metrics = Metrics(catalog, stepper, residency)
    pipeline = Pipeline(catalog, stepper, policies, metrics)
    plan = CalibrationPlan.quick() if settings.calibration == "quick" else CalibrationPlan()
    startup = Startup(catalog, residency, settings.cache_dir, plan, notifier, saver)
    app = create_app(pipeline, metrics, startup, settings)
    return Server(settings, app, pipeline, startup, notifier, residency)
