"""The one contract every variant a request can run on fulfils, local or remote.

Two implementations: `edgeserve.runtime.local.LocalVariant` (a GGUF on this board: its runner,
the CPU slots and the memory budget) and `edgeserve.runtime.remote.RemoteVariant` (an
OpenAI-compatible server elsewhere). The pipeline sees only this contract; what differs between
the two lives in them:

- **prompt**: a local variant renders the styled messages with its own chat template and
  tokenizes them; a remote one sends the styled messages as they are and counts their tokens
  with its family's default local variant (``shaped_by`` says whose tokenizer counted).
- **cost profile**: measured by calibration (local) or probed (remote); ``observe`` folds every
  finished request into it (EWMA), so the next decision sees throttling or a busy upstream.
- **candidate**: how routing sees it right now (available? load time? its own wait?).
- **start**: local waits for a CPU slot (earliest deadline first) and may load the variant
  first; remote sends the request and waits for the upstream to accept it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from edgeserve.routing.costs import CostProfile
from edgeserve.routing.policy import VariantCandidate
from edgeserve.runtime.generation import Generation
from edgeserve.runtime.sequence import GenerationJob, GenerationResult
from edgeserve.variant_id import VariantId


@dataclass(frozen=True)
class Prompt:
    """A request's prompt, shaped (style instruction and budget hint applied) and counted.

    ``messages``: the styled chat messages (None for a text completion, whose ``text`` is the
    client's prompt); ``text``: what the model reads (the chat template applied); ``tokens``: that
    text tokenized by ``shaped_by``'s tokenizer."""

    text: str
    tokens: list[int]
    messages: list[dict[str, str]] | None
    shaped_by: VariantId
    hint_tokens: int | None = None


@dataclass(frozen=True)
class VariantInfo:
    """What `GET /v1/models` shows of a variant."""

    kind: Literal["variant", "remote"]
    n_ctx: int
    loaded: bool
    quant: str | None = None
    path: str | None = None
    base_url: str | None = None
    remote_model: str | None = None
    status: str | None = None


class Variant(Protocol):
    """A variant requests can be routed to. Everything here is called on the event loop."""

    @property
    def id(self) -> VariantId: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def profile(self) -> CostProfile | None:
        """Its live cost profile; None until calibrated (local) or probed (remote)."""

    @property
    def ready(self) -> bool:
        """Whether the server may report ready as far as this variant goes (a remote that is
        down does not hold the server back: routing skips it and says why)."""

    @property
    def shaped_by(self) -> VariantId:
        """The local variant whose chat template and tokenizer shape this variant's prompts."""

    @property
    def answer_forcing(self) -> bool:
        """Whether it can feed the forced-answer prefix mid-generation (needs token control)."""

    @property
    def samples_here(self) -> bool:
        """Whether its tokens are sampled by this server's sampler chain: then it can return their
        log-probabilities and follow a grammar (structured output)."""

    @property
    def starts_at_admission(self) -> bool:
        """True when `start` does not wait here (a remote: it only waits for the upstream to
        accept): the pipeline then starts it before the response begins, so that a refusal can
        still be routed elsewhere. False: it waits for a local CPU slot inside the response,
        where a client that leaves while queued is noticed."""

    def candidate(self) -> VariantCandidate:
        """This variant as routing sees it now (profile, availability, load time, own wait)."""

    def prompt(self, messages: list[dict[str, str]] | None, text: str | None) -> Prompt:
        """Render and count the (already styled) ``messages``, or the raw completion ``text``.
        Blocking (tokenizing): the pipeline calls it in a worker thread."""

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        """Tokens of ``text`` (chat: special tokens allowed, no BOS added)."""

    def reserve(self, job: GenerationJob) -> int | None:
        """Count an admitted job where routing sees it until `start` takes it (a local variant:
        on the stepping loop's board); the key to give `start`, or None (nothing to count)."""

    def release(self, reservation: int | None) -> None:
        """Forget a reservation whose request will not start (turned away, abandoned)."""

    async def start(self, job: GenerationJob, prompt: Prompt, *, predicted_ms: float,
                    min_run_ms: float, reservation: int | None = None) -> tuple[Generation, float]:
        """Start generating; returns the running generation and the ms it waited to start.
        ``predicted_ms`` is the decision's prediction (its slot in the queue model) and
        ``min_run_ms`` the shortest useful run (a queued request that can no longer fit it is
        refused), ``reservation`` what `reserve` returned for the job. Raises RefusedError (queue
        full, deadline no longer feasible), RemoteUnavailableError (a remote did not take it) or
        ShuttingDownError."""

    def observe(self, result: GenerationResult) -> None:
        """Fold a finished generation's timings into the cost profile (EWMA)."""

    def info(self) -> VariantInfo: ...
