"""Domain errors. They carry what went wrong and which parameter; HTTP codes live in http/errors.py."""

from __future__ import annotations


class EdgeserveError(Exception):
    """Base of every error edgeserve reports to a client or an operator."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ConfigError(EdgeserveError):
    """A configuration file is missing, malformed or inconsistent."""


class ModelPreparationError(EdgeserveError):
    """A model file could not be found, verified or quantized."""


class InvalidRequestError(EdgeserveError):
    """The client sent something the server cannot act on."""


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus at least one new token) does not fit in the variant's context."""

    def __init__(self, prompt_tokens: int, n_ctx: int, variant: str, param: str = "messages") -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{prompt_tokens} tokens (variant {variant}); shorten the {param}.",
            param=param,
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class ModelNotFoundError(EdgeserveError):
    """The `model` field names no configured family or variant."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"The model '{name}' does not exist. Known models: {', '.join(known)}.",
            param="model",
            code="model_not_found",
        )


class NotReadyError(EdgeserveError):
    """Models are still loading."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"edgeserve is still loading models ({detail}); retry shortly.",
                         code="not_ready")


class ShuttingDownError(EdgeserveError):
    """The server is draining before it stops; another instance (or this one, restarted) will serve."""

    def __init__(self) -> None:
        super().__init__("edgeserve is shutting down and admits no new requests; retry shortly.",
                         code="shutting_down")


class GenerationFailedError(EdgeserveError):
    """The runtime failed while generating (not the client's fault)."""


class RemoteUnavailableError(GenerationFailedError):
    """A remote variant did not take the request (refused, 5xx, timeout before any token)."""


class RefusedError(EdgeserveError):
    """The request cannot be served in time or the queue is full; the client may retry later."""

    def __init__(self, message: str, *, code: str, retry_after_s: int,
                 min_deadline_ms: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, retry_after_s)
        self.min_deadline_ms = min_deadline_ms
