"""A GGUF file's metadata, read from its header without loading the model (llama.cpp's own
format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): enough to size a variant's
KV cache before deciding whether it fits in RAM."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# value types: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16

Value = int | float | bool | str | list["Value"]


class GGUFError(ValueError):
    """Not a GGUF file, or one whose header cannot be read."""


def read_metadata(path: Path) -> dict[str, Value]:
    """Every metadata key of the file's header (arrays of strings such as the vocabulary
    included); GGUFError when it is not a readable GGUF file."""
    try:
        with path.open("rb") as handle:
            magic, version, _tensors, count = struct.unpack("<4sIQQ", _exact(handle, 24))
            if magic != b"GGUF" or version < 2:
                raise GGUFError(f"{path}: not a GGUF file of version 2 or later")
            return {_string(handle): _value(handle, _unpack(handle, "<I")) for _ in range(count)}
    except (OSError, struct.error, UnicodeDecodeError, KeyError) as exc:
        raise GGUFError(f"{path}: cannot read its GGUF header ({exc})") from exc


def kv_bytes_per_token(metadata: dict[str, Value]) -> int | None:
    """Bytes of KV cache one token takes in every layer (f16 keys and values); None when the
    header lacks the attention shape (then nothing is assumed)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return None
    layers = metadata.get(f"{arch}.block_count")
    width = metadata.get(f"{arch}.embedding_length")
    heads = metadata.get(f"{arch}.attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not all(isinstance(v, int) and v > 0 for v in (layers, width, heads, kv_heads)):
        return None  # e.g. per-layer head counts (an array): not sized here
    assert isinstance(layers, int) and isinstance(width, int) and isinstance(heads, int)
    assert isinstance(kv_heads, int)
    key = metadata.get(f"{arch}.attention.key_length", width // heads)
    value = metadata.get(f"{arch}.attention.value_length", width // heads)
    if not isinstance(key, int) or not isinstance(value, int):
        return None
    return layers * kv_heads * (key + value) * KV_BYTES_PER_ELEMENT


def _exact(handle: BinaryIO, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise GGUFError("the header ends early (a truncated file)")
    return data


def _unpack(handle: BinaryIO, fmt: str) -> int:
    value: int = struct.unpack(fmt, _exact(handle, struct.calcsize(fmt)))[0]
    return value


def _string(handle: BinaryIO) -> str:
    return _exact(handle, _unpack(handle, "<Q")).decode("utf-8")


def _value(handle: BinaryIO, kind: int) -> Value:
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item_kind, count = _unpack(handle, "<I"), _unpack(handle, "<Q")
        return [_value(handle, item_kind) for _ in range(count)]
    fmt = _SCALARS[kind]
    value: int | float | bool = struct.unpack(fmt, _exact(handle, struct.calcsize(fmt)))[0]
    return value
