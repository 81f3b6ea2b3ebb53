"""`Pipeline`: the front door of the domain. `open` admits a request (re-routing it when a
remote variant does not take it) and returns its `Run`; it also knows what is in flight, so a
graceful stop can wait for it, refuse what still waits and cut what still runs."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Protocol

from edgeserve.errors import EdgeserveError, ModelNotFoundError, RemoteUnavailableError, ShuttingDownError
from edgeserve.logging import get_logger
from edgeserve.pipeline.admission import Admission, Admitter
from edgeserve.pipeline.record import MetricsSink, Recorder
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.pipeline.run import Run
from edgeserve.routing.policy_file import PolicyFile
from edgeserve.runtime.catalog import Catalog
from edgeserve.runtime.generation import Generation

log = get_logger("edgeserve.pipeline")


class LocalLoop(Protocol):
    """The stepping loop as the pipeline sees it: what a stop needs."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def refuse_waiting(self, error: Exception) -> int: ...


class Pipeline:
    def __init__(self, catalog: Catalog, queue: LocalLoop, policies: Mapping[str, PolicyFile],
                 metrics: MetricsSink | None = None) -> None:
        self.catalog = catalog
        self.queue = queue
        self.policies = policies
        self.admitter = Admitter(catalog, policies)
        self.recorder = Recorder(metrics)
        self.draining = False  # set on the first SIGTERM: finish what is admitted, admit nothing
        self.in_flight = 0  # admitted requests whose response is not finished (see `finished`)
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()  # started, maybe running

    @property
    def ready(self) -> bool:
        return self.catalog.ready

    def status(self) -> str:
        return self.catalog.status()

    async def open(self, request: InferenceRequest, *, request_id: str, client: str) -> Run:
        """Admit the request. A variant that starts at admission (a remote one) is started here,
        before any byte of the response: if it does not take the request, its circuit opens and
        the request is routed again (to a local variant, or another remote), so a remote that
        went down costs a retry, not an error. A request turned away is recorded and raised."""
        try:
            return await self._admit(request, request_id, client)
        except EdgeserveError as exc:
            self.recorder.turned_away(exc, request_id=request_id, client=client, request=request,
                                      admission=None, family=self._family_of(request.model))
            raise

    async def _admit(self, request: InferenceRequest, request_id: str, client: str) -> Run:
        attempts = 1 + len(self.catalog.remote)
        for attempt in range(attempts):
            admission = await self.admit(request)
            if not admission.variant.starts_at_admission:
                return Run(self, request, admission, request_id=request_id, client=client)
            try:
                started = await self.start(admission)
            except RemoteUnavailableError as exc:
                self.finished()
                if attempt == attempts - 1:
                    raise
                log.warning("remote_fallback", request_id=request_id, variant=str(admission.variant_id),
                            error=exc.message, detail="routing the request again without it")
                continue
            except BaseException:
                self.finished()
                raise
            return Run(self, request, admission, request_id=request_id, client=client, started=started)
        raise AssertionError("unreachable")

    async def admit(self, request: InferenceRequest) -> Admission:
        """Admission (see pipeline.admission); the request counts as in flight from here until
        its run is closed (`finished`)."""
        if self.draining:
            raise ShuttingDownError()
        admission = await self.admitter.admit(request)
        self.in_flight += 1
        return admission

    async def start(self, admission: Admission) -> tuple[Generation, float]:
        """Start the admitted job on its variant: the generation and the ms it waited."""
        generation, queue_ms = await admission.variant.start(
            admission.job, admission.prompt, predicted_ms=admission.decision.predicted_ms,
            min_run_ms=admission.min_run_ms, reservation=admission.reservation)
        self._generations.add(generation)
        return generation, queue_ms

    def finished(self) -> None:
        """The response of an admitted request is complete (or abandoned): a graceful stop waits
        for this, not only for the generation, so the last bytes reach the client."""
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.queue.running

    def cut_short(self) -> int:
        """The grace period of a stop is running out: refuse what still waits for a slot (503)
        and stop every running generation at its next token, so each response still ends
        properly (a final chunk and [DONE]) instead of being cut by the closing connection.
        Returns how many generations were told to stop."""
        self.queue.refuse_waiting(ShuttingDownError())
        running = [g for g in self._generations if g.result is None and not g.cancelled]
        for generation in running:
            generation.cancel()
        return len(running)

    def _family_of(self, model: str) -> str | None:
        try:
            return self.catalog.resolve(model).family.name
        except ModelNotFoundError:
            return None
