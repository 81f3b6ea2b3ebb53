"""Why llama.cpp could not open a model file, in words an operator can act on.

llama-cpp-python only says "Failed to load model from file"; the header tells a file that is
not a GGUF at all (a wrong path, an HTML error page saved as .gguf) from one that starts like
a GGUF and is truncated or corrupt further on (an interrupted copy or download).
"""

from __future__ import annotations

import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count


def diagnose(path: Path) -> str:
    """One sentence on what is wrong with the file at `path` (which llama.cpp refused)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(HEADER.size)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if len(head) < len(GGUF_MAGIC) or head[:4] != GGUF_MAGIC:
        return f"it is not a GGUF file (it does not start with {GGUF_MAGIC!r}; {size:,} bytes)"
    if len(head) < HEADER.size:
        return f"it is a truncated GGUF file (only {size:,} bytes)"
    _, version, tensors, _ = HEADER.unpack(head)
    return (f"it starts like a GGUF file (version {version}, {tensors} tensors) but llama.cpp cannot "
            f"read it: truncated or corrupt ({size:,} bytes); copy or prepare it again")
