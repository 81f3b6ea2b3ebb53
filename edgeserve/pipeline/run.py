"""One admitted request from its start to its record.

`Run.start` waits for the variant to start the job (a CPU slot, earliest deadline first; a
remote variant is started at admission already); iterating the run yields the text pieces; the
record (cost update, metrics, the log line) is written once, when the text is complete
(`Run.text`) or when the response is closed (`Run.close`): a run abandoned mid-way (the client
left) is cancelled, and recorded with what it really did once the generation reports.

The deadline is not checked here: admission put it into the job (``GenerationJob.deadline_at``)
and the variant's generation stops at it by itself (see `edgeserve.pipeline`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from edgeserve.errors import EdgeserveError, GenerationFailedError
from edgeserve.pipeline.admission import Admission
from edgeserve.pipeline.record import Recorder
from edgeserve.pipeline.request import InferenceRequest
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.sequence import GenerationResult, TokenLogprob

if TYPE_CHECKING:
    from edgeserve.pipeline.pipeline import Pipeline

_background: set[asyncio.Task[None]] = set()


class Run:
    def __init__(self, pipeline: Pipeline, request: InferenceRequest, admission: Admission, *,
                 request_id: str, client: str, started: tuple[Generation, float] | None = None) -> None:
        self._pipeline = pipeline
        self.request = request
        self.admission = admission
        self.request_id = request_id
        self.client = client
        self.generation: Generation | None = None
        self.queue_ms = 0.0
        if started is not None:
            self.generation, self.queue_ms = started
        self._recorded = False
        self._failed = False
        self._closed = False

    @property
    def recorder(self) -> Recorder:
        return self._pipeline.recorder

    @property
    def result(self) -> GenerationResult | None:
        return None if self.generation is None else self.generation.result

    async def start(self) -> None:
        """Wait until the variant runs the job. Raises EdgeserveError when it is turned away
        after admission (the queue is full, the deadline expired while queued, shutting down)."""
        if self.generation is not None:
            return
        try:
            self.generation, self.queue_ms = await self._pipeline.start(self.admission)
        except asyncio.CancelledError:  # the client left while waiting for a slot
            self._record(None)
            raise
        except EdgeserveError as exc:
            self._recorded = True
            self.recorder.turned_away(exc, request_id=self.request_id, client=self.client,
                                      request=self.request, admission=self.admission, family=None)
            raise

    async def __aiter__(self) -> AsyncIterator[str]:
        """The text pieces, as the model makes them. Raises GenerationFailedError if the
        variant fails mid-answer (recorded as failed)."""
        assert self.generation is not None, "start() the run first"
        try:
            async for piece in self.generation:
                yield piece
        except GenerationFailedError:
            self._failed = True
            self._record(None, failed=True)
            raise

    def take_logprobs(self) -> list[TokenLogprob]:
        """The sampled tokens' log-probabilities received since the last call (see Generation)."""
        return [] if self.generation is None else self.generation.take_logprobs()

    async def text(self) -> str:
        """Start, generate all of it, and record it."""
        await self.start()
        text = "".join([piece async for piece in self])
        self._record(self.result)
        return text

    def close(self) -> None:
        """The response is complete or abandoned: stop the generation if it still runs (at its
        next token), make sure the request is recorded, and count it out of the in-flight ones."""
        if self._closed:
            return
        self._closed = True
        generation = self.generation
        if generation is not None:
            generation.cancel()  # no-op once finished; stops the token loop if the client left
        else:  # never started: off the board
            self.admission.variant.release(self.admission.reservation)
        if not self._recorded:
            if generation is not None and generation.result is None and not self._failed:
                # The token loop is still stopping: record what it really did once it reports.
                task = asyncio.create_task(self._record_when_done(generation))
                _background.add(task)
                task.add_done_callback(_background.discard)
            else:
                self._record(self.result)
        self._pipeline.finished()

    def _record(self, result: GenerationResult | None, failed: bool = False) -> None:
        if self._recorded:
            return
        self._recorded = True
        self.recorder.completed(self.admission, request_id=self.request_id, client=self.client,
                                arrived=self.request.arrived, deadline_ms=self.request.deadline_ms,
                                queue_ms=self.queue_ms, result=result, failed=failed)

    async def _record_when_done(self, generation: Generation) -> None:
        with contextlib.suppress(GenerationFailedError):  # recorded as cancelled like before
            async for _ in generation:  # the pieces it made before it saw the cancel flag
                pass
        self._record(generation.result)

