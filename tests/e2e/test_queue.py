"""A full queue answers 429 `queue_full`: as a status before the body, or, for a stream whose 200
is already sent, as an OpenAI error event followed by [DONE]. The queued request still runs.

The queue holds the requests waiting for a place in their variant's batch: with every place of
a pinned variant taken by a long request (`parallel` of them) and a queue of one, one more
request waits and the next is refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.config import load_models_file
from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import FAMILY, MODELS_TOML, STARTUP_TIMEOUT_S
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
SHORT = [{"role": "user", "content": "Say hi."}]
PINNED = f"{FAMILY}:q2_k"
_config = load_models_file(MODELS_TOML).families[0].variant("q2_k")
assert _config is not None
PLACES = _config.parallel


@pytest.fixture(scope="module")
def base(prepared: dict[str, PreparedVariant], cache_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("edgeserve-queue") / "server.log"
    with running_server(MODELS_TOML, cache_dir, "--max-queue", "1", log_path=log_path,
                        timeout_s=STARTUP_TIMEOUT_S) as url:
        yield url


def post(base: str, messages: list[dict[str, str]], max_tokens: int, results: list[httpx.Response]) -> None:
    body = {"model": PINNED, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    results.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120))


def test_a_full_queue_refuses_plain_and_streamed_requests(base: str) -> None:
    running: list[httpx.Response] = []
    queued: list[httpx.Response] = []
    long_ones = [threading.Thread(target=post, args=(base, LONG, 200, running)) for _ in range(PLACES)]
    for thread in long_ones:
        thread.start()
    time.sleep(0.5)  # the long ones hold every place of the variant
    second = threading.Thread(target=post, args=(base, SHORT, 4, queued))
    second.start()
    time.sleep(0.5)  # the short one fills the queue of one

    plain = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                       json={"model": PINNED, "messages": SHORT, "max_tokens": 4})
    assert plain.status_code == 429
    assert plain.json()["error"]["code"] == "queue_full"
    assert int(plain.headers["Retry-After"]) >= 1

    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                      json={"model": PINNED, "messages": SHORT, "max_tokens": 4, "stream": True}) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    assert "queue is full" in error["message"]

    for thread in long_ones:
        thread.join(120)
    second.join(120)
    assert [r.status_code for r in running] == [200] * PLACES and queued[0].status_code == 200
