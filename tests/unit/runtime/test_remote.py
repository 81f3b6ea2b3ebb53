"""edgeserve/runtime/remote.py: reading an upstream event stream (no network here; the remote
itself is exercised against a real llama_cpp.server in tests/e2e/test_remote.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edgeserve.errors import GenerationFailedError
from edgeserve.runtime.remote import _events


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


def collect(*items: str) -> list[dict[str, object]]:
    async def run() -> list[dict[str, object]]:
        return [event async for event in _events(lines(*items))]
    return asyncio.run(run())


def test_events_are_read_until_done_and_other_lines_skipped() -> None:
    events = collect(": keep-alive", "", 'data: {"choices": [{"delta": {"content": "4"}}]}', "",
                     "event: ping", "data: [DONE]", 'data: {"after": "done"}')
    assert events == [{"choices": [{"delta": {"content": "4"}}]}]


@pytest.mark.parametrize("line,message", [
    ("data: {not json", "not JSON"),
    ('data: {"error": {"message": "model overloaded"}}', "model overloaded"),
])
def test_a_broken_or_error_event_fails_the_generation_with_what_the_remote_said(line: str, message: str) -> None:
    with pytest.raises(GenerationFailedError, match=message):
        collect(line)
