"""A remote variant: any OpenAI-compatible server (llama-server, vLLM, another edgeserve).

Its costs are probed at start (round trip and time to first token at two prompt lengths, then
tokens per second) into the same CostProfile local variants have, and updated from traffic
like theirs. Requests stream from the remote (`stream: true`) whether or not the client streams,
so the deadline is enforced here: at the deadline the upstream stream is closed and the answer
ends with ``finish = "deadline"``. A failure to connect, a 5xx or a timeout before the first
token opens the circuit breaker: routing excludes the variant (saying why) until a health check
(``GET /models``, backing off) succeeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from edgeserve.config import VariantConfig
from edgeserve.errors import GenerationFailedError, RemoteUnavailableError
from edgeserve.logging import get_logger
from edgeserve.routing.costs import CostProfile, fit_profile, observe
from edgeserve.routing.policy import VariantCandidate
from edgeserve.runtime.breaker import CircuitBreaker
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.sequence import TAIL_RESERVE_S, Finish, GenerationJob, GenerationResult
from edgeserve.runtime.variant import Prompt, Variant, VariantInfo
from edgeserve.variant_id import VariantId

log = get_logger("edgeserve.remote")

PROBE_SHORT = "Count from one to twenty in words."
PROBE_LONG = " ".join(["The lighthouse keeper wrote down the weather every hour."] * 24) + " Summarise."


@dataclass(frozen=True)
class RemoteRequest:
    """What goes upstream: chat ``messages`` or a text ``prompt``, shaped by routing already."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    prompt_tokens: int  # counted with the family's local tokenizer


class RemoteGeneration(Generation):
    """A Generation fed by an asyncio task instead of a runner thread; cancel() also cancels
    the task, which closes the upstream stream."""

    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self._loop.call_soon_threadsafe(self.task.cancel)


class RemoteVariant:
    """A remote variant behind the Variant contract (see edgeserve.runtime.variant). `send` is the
    upstream call itself; `start` shapes a request for it from an admitted prompt."""

    def __init__(self, variant_id: VariantId, config: VariantConfig, counter: Variant | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert config.base_url is not None
        self._id = variant_id
        self.variant_id = str(variant_id)  # in log lines and error messages
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.model = config.model or config.name
        self.breaker = CircuitBreaker()
        self.profile: CostProfile | None = None
        self.in_flight = 0
        self._counter = counter  # the family's default local variant: counts prompt tokens
        self._clock = clock
        self._headers: dict[str, str] = {}
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env, "")
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning("remote_no_key", variant=self.variant_id,
                            detail=f"{config.api_key_env} is not set: requests go without a key")
        self._http: httpx.AsyncClient | None = None

    @property
    def _client(self) -> httpx.AsyncClient:
        """Created on first use, on the serving event loop."""
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                           timeout=httpx.Timeout(self.config.timeout_s))
        return self._http

    # ---- the Variant contract ------------------------------------------------------------------

    @property
    def id(self) -> VariantId:
        return self._id

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def ready(self) -> bool:
        return True  # one that is down does not hold the server back: routing skips it

    @property
    def shaped_by(self) -> VariantId:
        return self._tokenizer().id

    @property
    def answer_forcing(self) -> bool:
        return False  # feeding a prefix mid-answer needs token-level control of the decoder

    @property
    def samples_here(self) -> bool:
        return False  # the upstream samples: no log-probabilities or grammar of ours

    @property
    def starts_at_admission(self) -> bool:
        return True  # before the response begins: if it does not take the request, re-route

    def _tokenizer(self) -> Variant:
        if self._counter is None:
            raise RuntimeError(f"remote {self.variant_id} has no local variant to count its prompts with")
        return self._counter

    def candidate(self) -> VariantCandidate:
        return VariantCandidate(
            variant_id=self.variant_id, name=self._id.name, n_ctx=self.n_ctx,
            profile=self.profile or CostProfile(variant_id=self.variant_id, prefill_ms_per_token=0.0,
                                                decode_ms_per_token=0.0),
            available=self.available, unavailable_reason=self.unavailable_reason(),
            wait_ms=0.0,  # it does not wait for a local CPU slot
        )

    def prompt(self, messages: list[dict[str, str]] | None, text: str | None) -> Prompt:
        """The styled messages go upstream as they are; the family's local tokenizer counts them."""
        return self._tokenizer().prompt(messages, text)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        return self._tokenizer().tokenize(text, chat=chat)

    def reserve(self, job: GenerationJob) -> int | None:
        return None  # it does not share the local board

    def release(self, reservation: int | None) -> None:
        pass

    async def start(self, job: GenerationJob, prompt: Prompt, *, predicted_ms: float = 0.0,
                    min_run_ms: float = 0.0, reservation: int | None = None) -> tuple[Generation, float]:
        """Send it upstream; it queues there, not here (0 ms of local queue)."""
        request = RemoteRequest(prompt.messages, prompt.text if prompt.messages is None else None,
                                len(prompt.tokens))
        return await self.send(request, job), 0.0

    def observe(self, result: GenerationResult) -> None:
        if self.profile is not None and result.finish != "cancelled" and result.predicted_n:
            self.profile = observe(self.profile, result.prompt_evaluated, result.prompt_ms,
                                   len(result.token_ms), sum(result.token_ms))

    def info(self) -> VariantInfo:
        return VariantInfo(kind="remote", n_ctx=self.config.n_ctx, loaded=self.available,
                           base_url=self.base_url, remote_model=self.model,
                           status=None if self.available else self.unavailable_reason())

    # ---- health ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.profile is not None and self.breaker.allows()

    def unavailable_reason(self) -> str:
        if self.profile is None and not self.breaker.open:
            return "is not probed yet"
        return self.breaker.describe(self._clock())

    def _failed(self, reason: str) -> None:
        if self.breaker.record_failure(self._clock(), reason):
            log.warning("remote_down", variant=self.variant_id, reason=reason,
                        detail="excluded from routing until a health check succeeds")

    def _succeeded(self) -> None:
        if self.breaker.record_success():
            log.info("remote_up", variant=self.variant_id, detail="health check passed; routed to again")

    async def check_health(self) -> bool:
        try:
            response = await self._client.get("/models", timeout=min(5.0, self.config.timeout_s))
        except httpx.HTTPError as exc:
            self._failed(_describe(exc))
            return False
        if response.status_code != 200:
            self._failed(f"health check answered HTTP {response.status_code}")
            return False
        if self.profile is None:
            return await self.probe()
        self._succeeded()
        return True

    async def watch(self, interval_s: float = 0.5) -> None:
        """Run forever: check an open circuit when its back-off has passed (the first probe is
        the start-up's; if it fails, the circuit opens and this takes over)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.breaker.check_due(self._clock()):
                await self.check_health()

    async def probe(self) -> bool:
        """Measure round trip, time to first token and decode speed; False if unreachable."""
        prefill: list[tuple[int, float]] = []
        decode: list[tuple[int, float]] = []
        try:
            for text, tokens, new in ((PROBE_SHORT, 16, 24), (PROBE_LONG, 280, 4), (PROBE_SHORT, 16, 24)):
                result = await self._probe_once(text, tokens, new)
                prefill.append((tokens, result.prompt_ms))
                decode += [(tokens + i + 1, ms) for i, ms in enumerate(result.token_ms)]
        except GenerationFailedError as exc:
            self._failed(str(exc))
            return False
        try:
            self.profile = fit_profile(prefill, decode, variant_id=self.variant_id, host=self.base_url)
        except ValueError as exc:
            self._failed(f"probe gave unusable timings: {exc}")
            return False
        log.info("remote_probed", variant=self.variant_id, ttft_ms=round(self.profile.prefill_fixed_ms, 1),
                 decode_ms_per_token=round(self.profile.decode_ms_per_token, 2))
        self._succeeded()
        return True

    async def _probe_once(self, text: str, prompt_tokens: int, new_tokens: int) -> GenerationResult:
        request = RemoteRequest([{"role": "user", "content": text}], None, prompt_tokens)
        job = GenerationJob([], new_tokens)
        generation = await self.send(request, job, count_failure=False)
        await generation.text()
        assert generation.result is not None
        return generation.result

    # ---- generation --------------------------------------------------------------------------

    async def send(self, request: RemoteRequest, job: GenerationJob, on_done: Callable[[], object] | None = None,
                   *, count_failure: bool = True) -> RemoteGeneration:
        """Send the request and wait for the remote to accept it (status 200); then stream in
        the background. Raises RemoteUnavailableError (and opens the circuit) if it does not."""
        loop = asyncio.get_running_loop()
        generation = RemoteGeneration(loop)
        sent = time.perf_counter()
        path, body = self._body(request, job)
        try:
            stream = self._client.stream("POST", path, json=body, timeout=self._timeout(job))
            response = await stream.__aenter__()
        except httpx.HTTPError as exc:
            reason = _describe(exc)
            if count_failure:
                self._failed(reason)
            raise RemoteUnavailableError(f"remote {self.variant_id}: {reason}") from exc
        if response.status_code != 200:
            detail = (await response.aread())[:300].decode(errors="replace")
            await stream.__aexit__(None, None, None)
            reason = f"HTTP {response.status_code}: {detail}"
            if count_failure and response.status_code >= 500:
                self._failed(reason)
            raise RemoteUnavailableError(f"remote {self.variant_id}: {reason}")
        self.in_flight += 1

        async def run() -> None:
            try:
                result = await self._relay(response, generation, job, request.prompt_tokens, sent)
                generation._emit_end(result)
            except Exception as exc:  # reported to the request, never lost
                reason = _describe(exc) if isinstance(exc, httpx.HTTPError) else str(exc)
                if count_failure:
                    self._failed(f"failed mid-answer: {reason}")
                generation._emit_end(GenerationFailedError(f"remote {self.variant_id} failed mid-answer: {reason}"))
            finally:
                self.in_flight -= 1
                await stream.__aexit__(None, None, None)
                if on_done is not None:
                    on_done()

        generation.task = asyncio.create_task(run())
        return generation

    def _body(self, request: RemoteRequest, job: GenerationJob) -> tuple[str, dict[str, Any]]:
        sampling = job.sampling
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": job.max_tokens, "stream": True,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if job.stop:
            body["stop"] = list(job.stop)
        if request.messages is not None:
            return "/chat/completions", {**body, "messages": request.messages}
        return "/completions", {**body, "prompt": request.prompt or ""}

    def _timeout(self, job: GenerationJob) -> httpx.Timeout:
        timeout = self.config.timeout_s
        if job.deadline_at is not None:  # never wait for a connection past the deadline
            timeout = max(0.05, min(timeout, job.deadline_at - time.perf_counter()))
        return httpx.Timeout(self.config.timeout_s, connect=timeout)

    async def _relay(self, response: httpx.Response, generation: RemoteGeneration, job: GenerationJob,
                     prompt_tokens: int, sent: float) -> GenerationResult:
        """Pass the upstream pieces on until it ends, the deadline comes or the client leaves."""
        first: float | None = None
        pieces = 0
        usage_tokens: int | None = None
        finish: Finish = "length"
        stop_at = None if job.deadline_at is None else job.deadline_at - TAIL_RESERVE_S
        try:
            limit = asyncio.timeout(None) if stop_at is None else asyncio.timeout_at(_loop_time(stop_at))
            async with limit:
                async for event in _events(response.aiter_lines()):
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens", usage_tokens)
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                        if text:
                            first = first or time.perf_counter()
                            pieces += 1
                            generation._emit_text(text)
                        if choice.get("finish_reason"):
                            finish = "stop" if choice["finish_reason"] == "stop" else "length"
        except TimeoutError:
            finish = "deadline"
        except asyncio.CancelledError:
            finish = "cancelled"
        end = time.perf_counter()
        first = first or end
        n = usage_tokens if usage_tokens is not None else pieces
        decode_ms = (end - first) * 1000
        token_ms = [decode_ms / max(n - 1, 1)] * max(n - 1, 0)  # after the first token
        return GenerationResult(finish, prompt_tokens, (first - sent) * 1000, n, decode_ms, token_ms,
                                prompt_evaluated=max(1, prompt_tokens))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, until ``[DONE]``."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise GenerationFailedError(f"the remote sent an event that is not JSON: {data[:120]!r}") from exc
        if isinstance(event, dict) and "error" in event:
            raise GenerationFailedError(f"the remote reported an error: {str(event['error'])[:300]}")
        if isinstance(event, dict):
            yield event


def _loop_time(perf_deadline: float) -> float:
    """A time.perf_counter() instant on the event loop's clock (for asyncio.timeout)."""
    return asyncio.get_running_loop().time() + (perf_deadline - time.perf_counter())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})" if str(exc) else "cannot connect (connection refused)"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
