"""API keys and a configured body limit against a real edgeserve process started with
`--api-key`, `--api-key-file` and `--max-body-bytes 4096`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from edgeserve.runtime.prepare import PreparedVariant
from tests.e2e.conftest import FAMILY, MODELS_TOML, STARTUP_TIMEOUT_S, TIMEOUT_S
from tests.e2e.server import running_server

pytestmark = pytest.mark.e2e

FLAG_KEY = "sk-e2e-flag-0123456789"
FILE_KEY = "sk-e2e-file-9876543210"
BODY_LIMIT = 4096
HELLO = {"model": FAMILY, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def base(prepared: dict[str, PreparedVariant], cache_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("edgeserve-auth")
    key_file = tmp / "keys"
    key_file.write_text(f"# keys of the e2e test\n\n{FILE_KEY}\n")
    with running_server(MODELS_TOML, cache_dir, "--api-key", FLAG_KEY, "--api-key-file", str(key_file),
                        "--max-body-bytes", str(BODY_LIMIT), log_path=tmp / "server.log",
                        timeout_s=STARTUP_TIMEOUT_S) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def check_401(response: httpx.Response) -> str:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    message: str = error["message"]
    return message


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "Missing API key"),
    (bearer("sk-wrong"), "Incorrect API key"),
    (bearer(FLAG_KEY[:-1]), "Incorrect API key"),
    ({"Authorization": FLAG_KEY}, "Malformed Authorization"),
])
def test_without_a_valid_key_401(base: str, headers: dict[str, str], says: str) -> None:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/v1/models"), ("GET", "/metrics")]:
            body = HELLO if path == "/v1/chat/completions" else {"model": FAMILY, "prompt": "hi", "max_tokens": 2}
            response = http.request(method, path, headers=headers, json=body if method == "POST" else None)
            assert says in check_401(response)
        # the next request, with a key, succeeds
        assert http.post("/v1/chat/completions", json=HELLO, headers=bearer(FLAG_KEY)).status_code == 200


@pytest.mark.parametrize("key", [FLAG_KEY, FILE_KEY])
def test_openai_client_with_either_key(base: str, key: str) -> None:
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S) as client:
        reply = client.chat.completions.create(model=FAMILY, messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=2)
        assert reply.choices[0].message.content
        assert FAMILY in [m.id for m in client.models.list()]


def test_openai_client_with_a_wrong_key(base: str) -> None:
    with openai.OpenAI(base_url=base + "/v1", api_key="sk-nope", max_retries=0, timeout=TIMEOUT_S) as client, \
            pytest.raises(openai.AuthenticationError) as refused:
        client.models.list()
    assert refused.value.code == "invalid_api_key"


def test_probes_open_metrics_protected(base: str) -> None:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        check_401(http.get("/metrics"))
        metrics = http.get("/metrics", headers=bearer(FILE_KEY))
        assert metrics.status_code == 200
        assert "edgeserve_" in metrics.text


def test_configured_body_limit(base: str) -> None:
    """--max-body-bytes 4096: a bigger body is a 413 naming the limit; the next request succeeds."""
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    with httpx.Client(base_url=base, timeout=TIMEOUT_S, headers=bearer(FLAG_KEY)) as http:
        response = http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert "4,096 bytes" in error["message"]
        assert http.post("/v1/chat/completions", json=HELLO).status_code == 200
