"""Coming up and going down: what runs in the app's lifespan, beside the requests.

At start-up, in the background (so /health answers at once and /ready says 503 meanwhile):
load every local variant and find or measure its cost profile (`load_and_cost`), probe the
remote variants, then report ready (systemd: STATUS= lines, then READY=1). While serving: the
systemd watchdog, a health watcher per remote variant, and the `ProfileSaver`. At shutdown: the
profiles are saved one last time and the models closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edgeserve.errors import EdgeserveError
from edgeserve.logging import get_logger
from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.calibrate import CalibrationPlan, store_profiles
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.loader import ResidencyManager, load_and_cost
from edgeserve.runtime.runner import LlamaRunner
from edgeserve.sdnotify import Notifier

log = get_logger("edgeserve")
SAVE_INTERVAL_S = 30.0


class ProfileSaver:
    """Writes the live (EWMA-updated) cost profiles of the local variants to the cache, so a
    restart — or a crash — starts from what was last seen: at most every `interval_s` while
    requests update them, and once more at shutdown."""

    def __init__(self, profiles: Callable[[], dict[str, CostProfile]], cache_dir: Path,
                 interval_s: float = SAVE_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._profiles = profiles
        self._cache_dir = cache_dir
        self._interval_s = interval_s
        self._clock = clock
        self._changed = asyncio.Event()
        self._last_save = -float("inf")
        self.saves = 0

    def changed(self) -> None:
        """A profile was updated (called on the event loop, by LocalVariant.observe)."""
        self._changed.set()

    @property
    def pending(self) -> bool:
        return self._changed.is_set()

    async def run(self) -> None:
        """Forever: after a change, wait out the interval since the last save, then save."""
        while True:
            await self._changed.wait()
            wait_s = self._last_save + self._interval_s - self._clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            self._changed.clear()
            profiles = self._profiles()
            await asyncio.to_thread(store_profiles, profiles, self._cache_dir)
            self._saved()

    def save(self) -> None:
        """Now (at shutdown)."""
        self._changed.clear()
        store_profiles(self._profiles(), self._cache_dir)
        self._saved()

    def _saved(self) -> None:
        self._last_save = self._clock()
        self.saves += 1


class Startup:
    """The app's lifespan (`lifespan`). ``error`` is set when the models cannot be loaded (a
    corrupt GGUF, an unwritable cache), and ``on_failed`` is then called with it (the process
    exits non-zero rather than serve 503 forever: see edgeserve.lifecycle)."""

    def __init__(self, catalog: Catalog, residency: ResidencyManager | None, cache_dir: Path,
                 plan: CalibrationPlan, notifier: Notifier, saver: ProfileSaver) -> None:
        self.catalog = catalog
        self.residency = residency
        self.cache_dir = cache_dir
        self.plan = plan
        self.notify = notifier
        self.saver = saver
        self.error: str | None = None
        self.on_failed: Callable[[str], None] | None = None

    async def load(self) -> None:
        """Load and cost every local variant, probe the remote ones, then report ready. A remote
        that is down now is re-checked in the background (its watcher) and does not hold this up."""
        catalog, notify = self.catalog, self.notify
        try:
            notify.status(f"loading {len(catalog.local)} variants")
            profiles = await load_and_cost(catalog.registry, self.residency, self.cache_dir, self.plan,
                                           self._loaded, self._calibrating)
            for remote in catalog.remote.values():
                notify.status(f"probing remote {remote.variant_id}")
                await remote.probe()
            catalog.set_profiles(profiles)  # ready from here on
            log.info("ready", detail=catalog.status())
            notify.ready(f"serving {', '.join(str(vid) for vid in catalog.local)}")
        except (EdgeserveError, OSError) as exc:  # a bad model file; a cache that cannot be written
            message = exc.message if isinstance(exc, EdgeserveError) else str(exc)
            self.error = message
            log.error("load_failed", error=message)
            notify.status(f"failed: {message}")
            if self.on_failed is not None:
                self.on_failed(message)

    def _loaded(self, runner: LlamaRunner) -> None:
        log.info("variant_loaded", variant=runner.variant_id, load_ms=round(runner.load_ms or 0, 1))
        self.notify.status(f"loaded {self.catalog.registry.loading_status()}")

    def _calibrating(self, line: str) -> None:
        log.info("calibration", detail=line)
        self.notify.status(f"calibrating: {line}")

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        remotes = list(self.catalog.remote.values())
        tasks = [asyncio.create_task(self.load()), asyncio.create_task(self.notify.watchdog()),
                 asyncio.create_task(self.saver.run())]
        tasks += [asyncio.create_task(remote.watch()) for remote in remotes]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for remote in remotes:
                await remote.aclose()
            if self.catalog.ready:
                self.saver.save()
            self.catalog.registry.close()
