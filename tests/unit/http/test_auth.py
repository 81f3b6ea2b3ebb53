"""edgeserve/http/auth.py: loading API keys, the bearer guard on a tiny app, the bind warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar, get
from litestar.exceptions import HTTPException
from litestar.testing import TestClient

from edgeserve.cli import build_parser
from edgeserve.http.auth import (
    ApiKeyError,
    api_key_guard,
    bearer_token,
    is_loopback,
    key_matches,
    load_api_keys,
    open_bind_warning,
    parse_key_file,
    parse_key_list,
)
from edgeserve.http.errors import handle_http_exception
from edgeserve.settings import build_settings


def test_key_file_skips_comments_and_blank_lines() -> None:
    text = "# production keys\n\nsk-one\n  sk-two  \n# sk-old (revoked)\n"
    assert parse_key_file(text, "keys.txt") == ["sk-one", "sk-two"]


def test_key_list_is_comma_separated() -> None:
    assert parse_key_list(" sk-a, sk-b,,", "EDGESERVE_API_KEYS") == ["sk-a", "sk-b"]


def test_keys_from_every_source_in_order_without_duplicates(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("sk-file\nsk-flag\n")
    assert load_api_keys(["sk-flag"], "sk-env,sk-flag", key_file) == ("sk-flag", "sk-env", "sk-file")
    assert load_api_keys([], None, None) == ()
    assert load_api_keys([], "", None) == ()


@pytest.mark.parametrize("bad", ["sk one", "sk-\u00e9", "sk-\x01", ""])
def test_unusable_keys_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ApiKeyError, match="printable ASCII"):
        load_api_keys([bad], None, None)


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="cannot read"):
        load_api_keys([], None, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="no key in it"):
        load_api_keys([], None, empty)
    bad = tmp_path / "bad"
    bad.write_text("sk-ok\nsk bad\n")
    with pytest.raises(ApiKeyError, match="line 2"):
        load_api_keys([], None, bad)


def test_key_matches_any_configured_key_exactly() -> None:
    keys = ("sk-one", "sk-two")
    assert key_matches("sk-two", keys)
    assert not key_matches("sk-tw", keys)
    assert not key_matches("sk-two ", keys)
    assert not key_matches("SK-TWO", keys)
    assert not key_matches("sk-\u00e9", keys)  # a non-ASCII header value is a mismatch, not an error
    assert not key_matches("sk-one", ())


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer sk-1", "sk-1"), ("bearer   sk-1 ", "sk-1"), ("Basic c2s=", None), ("Bearer", None),
    ("Bearer ", None), (None, None), ("sk-1", None),
])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def tiny_app(metrics_public: bool) -> Litestar:
    """The routes the guard treats differently, wired like edgeserve's app."""

    @get(["/health", "/ready", "/metrics", "/v1/models"], sync_to_thread=False)
    def ok() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([ok], guards=[api_key_guard(["sk-one", "sk-two"], metrics_public=metrics_public)],
                    exception_handlers={HTTPException: handle_http_exception})


def error_of(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.json.decode(response.content)
    assert set(body) == {"error"}
    return dict(body["error"])


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer sk-three"}, "Incorrect API key"),
    ({"Authorization": "Basic c2stb25l"}, "Malformed Authorization"),
])
def test_guard_refuses_in_openai_format(headers: dict[str, str], says: str) -> None:
    with TestClient(app=tiny_app(metrics_public=False)) as client:
        response = client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = error_of(response)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert says in error["message"], error["message"]


@pytest.mark.parametrize("metrics_public", [False, True])
def test_guard_paths(metrics_public: bool) -> None:
    with TestClient(app=tiny_app(metrics_public)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == (200 if metrics_public else 401)
        assert client.get("/v1/models").status_code == 401
        for key in ("sk-one", "sk-two"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert client.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("board.local", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_bind_warning_only_without_key_off_loopback() -> None:
    warning = open_bind_warning("0.0.0.0", ())
    assert warning is not None and "--api-key" in warning and "0.0.0.0" in warning
    assert open_bind_warning("0.0.0.0", ("sk-one",)) is None
    assert open_bind_warning("127.0.0.1", ()) is None


def test_serve_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGESERVE_MEMORY_BUDGET", "1GiB")
    settings = build_settings(build_parser().parse_args(["serve", "--api-key", "sk-1", "--api-key", "sk-2"]))
    assert settings.api_keys == ("sk-1", "sk-2")
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.metrics_public is False

    keys = tmp_path / "keys"
    keys.write_text("sk-3\n")
    monkeypatch.setenv("EDGESERVE_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("EDGESERVE_METRICS_PUBLIC", "true")
    monkeypatch.setenv("EDGESERVE_API_KEY_FILE", str(keys))
    settings = build_settings(build_parser().parse_args(["serve"]))
    assert settings.max_body_bytes == 4096
    assert settings.metrics_public is True
    assert settings.api_keys == ("sk-3",)
