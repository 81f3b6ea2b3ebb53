"""The cache directory check (issue 8): created when missing, a clear error when it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.cachedir import ensure_writable
from edgeserve.errors import ConfigError


def test_a_missing_cache_directory_is_created_and_left_clean(tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b"
    assert ensure_writable(cache) == cache
    assert cache.is_dir() and list(cache.iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("where", ["the path itself", "a parent"])
def test_a_file_in_the_way_is_named(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = blocker if where == "the path itself" else blocker / "cache"
    with pytest.raises(ConfigError, match=f"the cache directory {cache} cannot be written") as raised:
        ensure_writable(cache)
    assert "a file, not a directory, is in the way" in raised.value.message
    assert "--cache-dir" in raised.value.message
