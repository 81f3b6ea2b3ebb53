"""Small JSON state files (manifests, cost profiles): read leniently, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


def read_json(path: Path, kind: type[T]) -> T | None:
    """The decoded file, or None when it is missing or unreadable (it is then rebuilt)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=kind)
    except (OSError, msgspec.DecodeError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Write beside the target and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(value)))
    partial.replace(path)
