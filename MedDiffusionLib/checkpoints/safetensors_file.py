"""Read a safetensors file once, validate its header the way the safetensors library does, and view its tensors.

The library's loaders open the path again after we looked at it, and ``load_file`` allocates every tensor
before our code could compare the header with the network the config describes. Here the header is parsed
from bytes already read (header-only for metadata, the whole file once for weights), checked (known dtypes,
non-negative shapes, byte ranges that match the shapes and tile the data exactly, no duplicate names), and
tensors are zero-copy views of the same buffer. Files are still written with the safetensors library.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["TensorEntry", "SafetensorsHeader", "MAX_HEADER_BYTES", "read_header", "read_file", "tensors_from"]

# Our headers list a few hundred tensors and a config (tens of KiB); the library allows 100 MB.
MAX_HEADER_BYTES = 16 << 20
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype, shape and its byte range in the data section."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: metadata strings, tensor entries and where the data section starts."""
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int  # file offset of the data section

    @property
    def numel(self) -> int:
        """Elements of all tensors the file holds (compared against what a network would allocate)."""
        return sum(math.prod(e.shape) for e in self.tensors.values())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate name '{k}'")
        out[k] = v
    return out


def _entry(name: str, raw: Any) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor '{name}' is described incompletely")
    dtype = _DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    shape, offsets = raw["shape"], raw["data_offsets"]
    if dtype is None:
        raise ValueError(f"tensor '{name}' has an unsupported dtype {raw['dtype']!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor '{name}' has invalid data offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * torch._utils._element_size(dtype):
        raise ValueError(f"tensor '{name}': shape {shape} does not match its {offsets[1] - offsets[0]} bytes")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _parse(head: bytes, data_len: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    try:
        raw = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("header nests too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    tensors = {name: _entry(name, value) for name, value in raw.items()}
    at = 0
    for e in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != at:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        at = e.end
    if at != data_len:
        raise ValueError(f"the tensors cover {at} bytes but the file holds {data_len}")
    return metadata, tensors


def _header_length(first8: bytes, file_size: int) -> int:
    if len(first8) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise ValueError(f"header length {n} is larger than allowed ({MAX_HEADER_BYTES}) or than the file")
    return n


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The validated header (metadata and tensor table) of a safetensors file, reading only the header."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = _header_length(fh.read(8), size)
            head = fh.read(n)
        meta, tensors = _parse(head, size - 8 - n)
    except ValueError as exc:
        raise CheckpointError(f"Cannot read '{p}': corrupt safetensors file ({exc})") from None
    return SafetensorsHeader(meta, tensors, 8 + n)


def read_file(path: str | os.PathLike[str]) -> tuple[SafetensorsHeader, bytearray]:
    """The whole file, read once, and its validated header (tensors not built yet: see :func:`tensors_from`)."""
    p = Path(path)
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        if fh.readinto(buf) != size or fh.read(1):
            raise CheckpointError(f"'{p}' changed while it was being read")
    try:
        n = _header_length(bytes(buf[:8]), size)
        meta, tensors = _parse(bytes(buf[8:8 + n]), size - 8 - n)
    except ValueError as exc:
        raise CheckpointError(f"Cannot read '{p}': corrupt safetensors file ({exc})") from None
    return SafetensorsHeader(meta, tensors, 8 + n), buf


def tensors_from(header: SafetensorsHeader, buf: bytearray) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (copied only where the bytes are misaligned for their dtype)."""
    out: dict[str, torch.Tensor] = {}
    for name, e in header.tensors.items():
        if e.end == e.begin:
            out[name] = torch.empty(e.shape, dtype=e.dtype)
            continue
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=e.end - e.begin, offset=header.data_start + e.begin)
        if raw.data_ptr() % torch._utils._element_size(e.dtype):
            raw = raw.clone()
        out[name] = raw.view(e.dtype).view(e.shape)
    return out
