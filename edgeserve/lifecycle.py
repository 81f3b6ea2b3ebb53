"""Running under uvicorn with a graceful stop.

First SIGTERM (or SIGINT): stop admitting (503 with Retry-After), let the requests already
admitted — running or queued — finish within the grace period, then exit 0. Shortly before the
grace period ends, what still runs is stopped at its next token and what still waits is refused,
so every response ends properly (a final chunk, [DONE]) instead of being cut. A second signal
exits at once. (uvicorn alone would close the listening socket, so new clients would see a
refused connection instead of a 503, and it re-raises the signal, so the exit code is not 0.)
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from types import FrameType

import uvicorn
from litestar import Litestar

from edgeserve.http.protocol import OpenAIErrorHTTPProtocol
from edgeserve.logging import get_logger
from edgeserve.pipeline import Pipeline
from edgeserve.sdnotify import Notifier
from edgeserve.startup import Startup

log = get_logger("edgeserve")
# The stepping loop's thread gives up the GIL in every llama.cpp call and must win it back from
# the event loop's thread afterwards; Python makes a running thread let go only every switch
# interval (5 ms by default), so each decode step could stall up to 5 ms after llama_decode
# returned (seen with py-spy: ~4 % of the loop's time at 8 streams). 0.5 ms bounds that stall.
GIL_SWITCH_INTERVAL_S = 0.0005
CUT_RESERVE_S = 2.0  # before the grace period ends, running generations are stopped


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, pipeline: Pipeline, notifier: Notifier, grace_s: float) -> None:
        super().__init__(config)
        self.pipeline = pipeline
        self.notifier = notifier
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self.failure: str | None = None

    def fail(self, message: str) -> None:
        """The models could not be loaded (a corrupt GGUF, an unwritable cache): stop and exit
        non-zero, so the operator (or systemd's Restart=on-failure) sees it, rather than serve
        503 forever. Nothing was admitted yet, so there is nothing to drain."""
        self.failure = message
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs as the signal handler; it only schedules work on the event loop."""
        if self.pipeline.draining or self._loop is None:
            log.warning("stop_now", signal=sig, detail="second signal: exiting without waiting")
            os._exit(1)
        self.pipeline.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain = asyncio.create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        pipeline = self.pipeline
        log.info("draining", signal=sig, in_flight=pipeline.in_flight, running=pipeline.queue.running,
                 queued=pipeline.queue.queue_depth, grace_s=self.grace_s)
        self.notifier.stopping(f"draining {pipeline.in_flight} requests")
        deadline = time.monotonic() + self.grace_s
        cut_at = deadline - min(CUT_RESERVE_S, self.grace_s / 4)  # time for the cut responses to end
        if not await self._until_idle(cut_at):
            stopped = pipeline.cut_short()
            log.warning("grace_expiring", detail=f"stopping {stopped} running generations early",
                        in_flight=pipeline.in_flight)
            await self._until_idle(deadline)
        log.info("stopping", unfinished=pipeline.in_flight)
        # What remains of the grace period lets the last responses reach their clients.
        self.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()))
        self.should_exit = True

    async def _until_idle(self, until: float) -> bool:
        while not self.pipeline.idle:
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.05)
        return True


def serve(pipeline: Pipeline, app: Litestar, startup: Startup, host: str, port: int, notifier: Notifier,
          grace_s: float) -> int:
    """Serve until stopped; the exit code: 0, or 2 when the models could not be loaded."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=int(grace_s),
                            http=OpenAIErrorHTTPProtocol)  # its parser errors in the OpenAI format
    server = DrainingServer(config, pipeline, notifier, grace_s)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    startup.on_failed = server.fail
    server.run()
    if server.failure is not None:
        log.error("exiting", detail=f"the models could not be loaded: {server.failure}")
        return 2
    return 0
