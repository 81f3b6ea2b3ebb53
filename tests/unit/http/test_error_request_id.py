"""Server-side failures name the request id (issue 8): in a 500/502 body and in a stream's error
event; refusals and bad input do not need it."""

from __future__ import annotations

import msgspec
import pytest

from edgeserve.errors import GenerationFailedError, RefusedError
from edgeserve.http.errors import error_frame, with_request_id


@pytest.mark.parametrize(("status", "named"), [(500, True), (502, True), (503, False), (429, False),
                                               (400, False)])
def test_only_server_failures_carry_the_request_id(status: int, named: bool) -> None:
    message = with_request_id("it broke", status, "req-42")
    assert message.startswith("it broke")
    assert ("req-42" in message) is named


def test_without_a_request_id_the_message_is_unchanged() -> None:
    assert with_request_id("it broke", 500, None) == "it broke"


def test_a_stream_error_event_names_the_request_of_a_failed_generation() -> None:
    frame = error_frame(GenerationFailedError("generation failed: boom"), "req-7")
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    error = msgspec.json.decode(frame[len(b"data: "):])["error"]
    assert error["type"] == "server_error" and "req-7" in error["message"]
    refused = msgspec.json.decode(error_frame(RefusedError("full", code="queue_full", retry_after_s=1),
                                              "req-8")[len(b"data: "):])["error"]
    assert refused["message"] == "full" and refused["code"] == "queue_full"
