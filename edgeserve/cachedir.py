"""The cache directory (prepared models, cost profiles) must be writable: checked at start-up.

Without this check an unwritable cache shows up late and obscurely — a quantization that
cannot be saved, or a profile write failing inside the background load — so every command
that writes there checks first and fails with the path and the reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgeserve.errors import ConfigError


def ensure_writable(path: Path) -> Path:
    """Create `path` if needed and prove a file can be written in it; ConfigError otherwise.
    (A probe file, not os.access: as root, access() says yes to a read-only mount.)"""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".edgeserve-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError | NotADirectoryError):
            reason = "a file, not a directory, is in the way"
        culprit = f": {exc.filename}" if exc.filename and Path(exc.filename) != path else ""
        raise ConfigError(
            f"the cache directory {path} cannot be written ({reason}{culprit}); point --cache-dir "
            "(env EDGESERVE_CACHE_DIR) at a writable directory") from exc
    return path
