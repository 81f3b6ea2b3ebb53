"""Fault injection, for the fault tests only: off unless EDGESERVE_FAULT_MARKER is set.

No request can make llama.cpp fail on demand (prompts are tokenized by the server, so a decode
never sees a bad token id), yet the path of a runner that raises mid-generation — the 500 or
the stream's error event, the slot and the in-flight count given back, the server serving on —
must be tested against a real server. So a server started with EDGESERVE_FAULT_MARKER=TEXT
makes the token loop raise `InjectedFault` (a RuntimeError, like a failed `llama_decode` in
llama-cpp-python) right after the first token of any prompt containing TEXT. The variable is
read once, when a runner is created, and a warning is logged: it must never be set in service.
"""

from __future__ import annotations

import os

from edgeserve.logging import get_logger

FAULT_MARKER_ENV = "EDGESERVE_FAULT_MARKER"


class InjectedFault(RuntimeError):
    """The failure a fault test asked for."""


def fault_marker() -> str | None:
    """The marker of EDGESERVE_FAULT_MARKER, or None (the normal case)."""
    marker = os.environ.get(FAULT_MARKER_ENV) or None
    if marker is not None:
        get_logger("edgeserve.faults").warning(
            "fault_injection_enabled", marker=marker,
            detail=f"{FAULT_MARKER_ENV} is set: prompts containing the marker fail on purpose (tests only)")
    return marker
