"""structlog, configured once: JSON lines for journald, a console renderer on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """`log_format` is `json`, `console` or `auto` (console when stdout is a terminal)."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stdout.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    for chatty in ("httpx", "httpcore"):  # a line per request to a remote variant otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
