"""Optional API keys: `Authorization: Bearer KEY`, checked by a litestar guard.

Keys come from `--api-key` (repeatable), EDGESERVE_API_KEYS (comma-separated) and
`--api-key-file` (one key per line, `#` comments); any of them is accepted. Without keys the
server is open, as before. `/health` and `/ready` stay open (liveness and readiness probes,
systemd, load balancers carry no key); `/metrics` is protected unless made public.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

ALWAYS_OPEN = frozenset({"/health", "/ready"})
METRICS = "/metrics"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgeserve"'}


class ApiKeyError(ValueError):
    """A key that cannot work (empty, whitespace, not printable ASCII), or an unreadable file."""


def _checked(key: str, source: str) -> str:
    # Keys travel in a header, which arrives decoded as latin-1: only printable ASCII without
    # spaces compares reliably, so anything else is refused at start-up, not silently never matched.
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ApiKeyError(f"{source}: an API key must be printable ASCII without spaces, got {key[:4]!r}…")
    return key


def parse_key_list(text: str, source: str) -> list[str]:
    """EDGESERVE_API_KEYS: comma-separated; blanks around the commas are ignored."""
    return [_checked(part.strip(), source) for part in text.split(",") if part.strip()]


def parse_key_file(text: str, source: str) -> list[str]:
    """A key file: one key per line; blank lines and lines starting with `#` are skipped."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keys.append(_checked(stripped, f"{source} line {number}"))
    return keys


def load_api_keys(flags: Sequence[str], env_value: str | None, key_file: Path | None) -> tuple[str, ...]:
    """Every configured key, in order, without duplicates; empty means no authentication."""
    keys = [_checked(key, "--api-key") for key in flags]
    if env_value:
        keys += parse_key_list(env_value, "EDGESERVE_API_KEYS")
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"--api-key-file {key_file}: cannot read it ({exc})") from exc
        found = parse_key_file(text, str(key_file))
        if not found:
            raise ApiKeyError(f"--api-key-file {key_file}: no key in it (one key per line, # comments)")
        keys += found
    return tuple(dict.fromkeys(keys))


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Constant time in the key's content: every configured key is compared, no early exit."""
    given_bytes = given.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("ascii"))
    return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_guard(keys: Sequence[str], *, metrics_public: bool) -> Guard:
    """A guard for every route: open paths pass, the rest need one of `keys` (401 otherwise)."""
    open_paths = ALWAYS_OPEN | ({METRICS} if metrics_public else frozenset())
    frozen = tuple(keys)

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.url.path in open_paths:
            return
        header = connection.headers.get("authorization")
        token = bearer_token(header)
        if token is not None and key_matches(token, frozen):
            return
        if header is None:
            message = ("Missing API key: send it as the header 'Authorization: Bearer KEY' "
                       "(the OpenAI client's api_key does this).")
        elif token is None:
            message = "Malformed Authorization header: use 'Authorization: Bearer KEY'."
        else:
            message = "Incorrect API key: it is none of the keys this server was started with."
        raise NotAuthorizedException(detail=message, headers=CHALLENGE)

    return guard


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def open_bind_warning(host: str, keys: Sequence[str]) -> str | None:
    """What to shout at start-up when the server is reachable from other machines without a key."""
    if keys or is_loopback(host):
        return None
    return (f"binding {host} WITHOUT an API key: anyone who can reach this port can run the models "
            "and read /metrics. Set --api-key, EDGESERVE_API_KEYS or --api-key-file, or bind 127.0.0.1.")
