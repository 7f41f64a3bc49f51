"""NRRD and NIfTI headers parsed from bytes that may be hostile, before any imaging library sees the file.

An uploaded header can name another file as its data (NRRD ``data file``, NIfTI ``.hdr``/``.img`` pairs) and can
declare far more voxels than it carries. Here a header is parsed with every line-ending convention an NRRD
reader accepts (``\\n``, ``\\r\\n``, ``\\r``), detached data in any spelling is refused, the declared data size is
computed, and the data actually present is measured (gzip streams are decompressed in bounded chunks and never
beyond the declared size + 1 byte). ``canonical_nrrd`` rewrites an accepted NRRD with a header built only from
the fields understood here, so the reader that later decodes it cannot interpret anything we did not check.
"""
from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Optional

from ..errors import InputError

__all__ = ["NRRD_HEADER_CAP", "HeaderError", "NrrdHeader", "NiftiHeader", "parse_nrrd_header", "canonical_nrrd",
           "parse_nifti_header", "gzip_length", "data_length"]

NRRD_HEADER_CAP = 64 * 1024   # a real header is a few hundred bytes
_CHUNK = 1 << 20              # read / decompress granularity: memory stays O(1 MB) whatever the file claims


class HeaderError(InputError):
    """The header is malformed, names a detached data file, or does not match the data that follows it."""


# NRRD type names (any case, any spacing) -> bytes per sample. 'block' has no fixed size and is refused.
_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_TYPE_BYTES = {" ".join(name.split()): size for size, names in _NRRD_TYPES.items() for name in names}
_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}
# Fields kept in the canonical header (they decide decoding and geometry), by their name with spaces removed.
_KEPT_FIELDS = {
    "type": "type", "dimension": "dimension", "space": "space", "spacedimension": "space dimension",
    "sizes": "sizes", "spacings": "spacings", "axismins": "axis mins", "axismaxs": "axis maxs",
    "spacedirections": "space directions", "centers": "centers", "centerings": "centers", "kinds": "kinds",
    "endian": "endian", "encoding": "encoding", "spaceorigin": "space origin", "spaceunits": "space units",
    "measurementframe": "measurement frame",
}
# Known fields that only describe the data (names, units, ranges): dropped.
_DROPPED_FIELDS = {"content", "number", "labels", "units", "sampleunits", "min", "max", "oldmin", "oldmax",
                   "thicknesses"}
# Fields that move the data start; only the value 0 (their default) is accepted.
_SKIP_FIELDS = {"lineskip", "byteskip"}
_MAGIC_RE = re.compile(rb"NRRD000[1-5]\Z")
_SAFE_VALUE_RE = re.compile(r"[\x20-\x7e\t]*\Z")

DETACHED_MESSAGE = ("NRRD headers with a detached data file (.nhdr, 'data file:') are not accepted; save "
                    "the volume as a single .nrrd file")


@dataclass
class NrrdHeader:
    """What an NRRD header says: the kept fields, sizes and bytes per sample (checked before reading data)."""
    magic: str
    fields: dict[str, str]      # canonical field name -> value (only _KEPT_FIELDS)
    sizes: tuple[int, ...]
    bytes_per_sample: int
    encoding: str               # "raw" | "gzip"
    data_offset: int            # where the data starts in the received file

    @property
    def voxels(self) -> int:
        """Number of voxels the header declares."""
        return math.prod(self.sizes)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header declares."""
        return self.voxels * self.bytes_per_sample


def _lines(data: bytes) -> "list[tuple[bytes, int]]":
    """Split like an NRRD reader does (a line ends at \\n, \\r\\n or a lone \\r) up to the first empty line;
    returns (line, offset after its terminator) pairs, the empty line last. None when no empty line is found."""
    out, pos, n = [], 0, len(data)
    while pos < n:
        cr, lf = data.find(b"\r", pos), data.find(b"\n", pos)
        ends = [e for e in (cr, lf) if e >= 0]
        if not ends:
            return []
        end = min(ends)
        nxt = end + 2 if data[end:end + 2] == b"\r\n" else end + 1
        line = data[pos:end]
        out.append((line, nxt))
        if not line:
            return out
        pos = nxt
    return []


def _normal(name: str) -> str:
    return "".join(name.split()).lower()


def parse_nrrd_header(head: bytes, max_voxels: Optional[int] = None) -> NrrdHeader:
    """Parse the header at the start of ``head`` (pass at least ``NRRD_HEADER_CAP`` bytes, or the whole file
    if shorter). Refuses detached data in any spelling, unknown fields, encodings other than raw/gzip, a
    header without its terminating blank line inside the cap, and more than ``max_voxels`` voxels."""
    lines = _lines(head[:NRRD_HEADER_CAP])
    if not lines:
        raise HeaderError(f"the NRRD header does not end with a blank line within its first "
                          f"{NRRD_HEADER_CAP // 1024} KB (or the file holds no data after it)")
    magic = lines[0][0]
    if not _MAGIC_RE.match(magic):
        raise HeaderError("the file does not start with an NRRD magic line (NRRD0001 to NRRD0005)")
    fields: dict[str, str] = {}
    for raw, _ in lines[1:-1]:
        text = raw.decode("latin-1")
        key_part = text.split(":", 1)[0]
        if "datafile" in _normal(key_part) or _normal(text).startswith("datafile"):
            raise HeaderError(DETACHED_MESSAGE)
        if text.startswith("#"):
            continue  # comment
        keysep, colon = text.find(":="), text.find(": ")
        if keysep >= 0 and (colon < 0 or keysep < colon):
            continue  # key/value metadata: not needed to decode the volume, not copied
        if colon < 0:
            raise HeaderError(f"malformed NRRD header line '{text[:60]}' (expected 'field: value')")
        name, value = _normal(text[:colon]), text[colon + 2:].strip()
        if name in _SKIP_FIELDS:
            if value != "0":
                raise HeaderError(f"the NRRD field '{text[:colon].strip()}: {value[:20]}' is not supported; "
                                  "save the volume as a plain single .nrrd file")
            continue
        if name in _DROPPED_FIELDS:
            continue
        if name not in _KEPT_FIELDS:
            raise HeaderError(f"unknown NRRD header field '{text[:colon].strip()[:40]}'")
        canonical = _KEPT_FIELDS[name]
        if canonical in fields:
            raise HeaderError(f"the NRRD field '{canonical}' appears twice")
        if not _SAFE_VALUE_RE.match(value):
            raise HeaderError(f"the NRRD field '{canonical}' holds control or non-ASCII characters")
        fields[canonical] = value
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise HeaderError(f"the NRRD header has no '{required}' field")
    type_name = " ".join(fields["type"].lower().split())
    if type_name not in _TYPE_BYTES:
        raise HeaderError(f"unsupported NRRD sample type '{fields['type'][:30]}'")
    encoding = _ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise HeaderError(f"NRRD encoding '{fields['encoding'][:20]}' is not accepted; use raw or gzip")
    try:
        dimension = int(fields["dimension"])
        sizes = tuple(int(s) for s in fields["sizes"].split())
    except ValueError:
        raise HeaderError("the NRRD 'dimension' and 'sizes' fields must be whole numbers") from None
    if not 1 <= dimension <= 16 or len(sizes) != dimension or min(sizes) < 1:
        raise HeaderError(f"the NRRD sizes {fields['sizes'][:60]} do not match dimension {fields['dimension']}")
    header = NrrdHeader(magic.decode("ascii"), fields, sizes, _TYPE_BYTES[type_name], encoding, lines[-1][1])
    if _TYPE_BYTES[type_name] > 1 and "endian" not in fields:
        raise HeaderError("the NRRD header has no 'endian' field (needed for multi-byte samples)")
    if max_voxels is not None and header.voxels > max_voxels:
        raise HeaderError(f"the volume declares {header.voxels} voxels ({'x'.join(map(str, sizes))}); at most "
                          f"{max_voxels} are accepted")
    return header


def canonical_nrrd(header: NrrdHeader) -> bytes:
    """The header rebuilt from the checked fields only, with '\\n' line ends and its blank line; fields in the
    order NRRD readers need (dimension before sizes, space before space directions)."""
    order = list(dict.fromkeys(_KEPT_FIELDS.values()))
    names = sorted(header.fields, key=order.index)
    lines = [header.magic] + [f"{name}: {header.fields[name]}" for name in names]
    return ("\n".join(lines) + "\n\n").encode("ascii")


@dataclass
class NiftiHeader:
    """What a NIfTI header says: dimensions, bytes per voxel and where the data start."""
    dims: tuple[int, ...]
    bytes_per_voxel: int
    data_offset: int

    @property
    def voxels(self) -> int:
        """Number of voxels the header declares."""
        return math.prod(self.dims)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header declares."""
        return self.voxels * self.bytes_per_voxel


def parse_nifti_header(head: bytes, max_voxels: Optional[int] = None) -> NiftiHeader:
    """Parse a single-file NIfTI-1 ('n+1') or NIfTI-2 ('n+2') header (the first 540 bytes, decompressed).
    Two-file NIfTI ('ni1', '.hdr' + '.img') is refused: its data lives in another file."""
    if len(head) >= 348 and head[344:348] == b"ni1\x00":
        raise HeaderError("two-file NIfTI (.hdr + .img) is not accepted; save the volume as a single .nii or "
                          ".nii.gz file")
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\x00":
            ndim = struct.unpack(endian + "h", head[40:42])[0]
            dims = struct.unpack(endian + "7h", head[42:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = struct.unpack(endian + "f", head[108:112])[0]
            minimum_offset = 348
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\x00":
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            ndim = struct.unpack(endian + "q", head[16:24])[0]
            dims = struct.unpack(endian + "7q", head[24:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            minimum_offset = 540
            break
    else:
        raise HeaderError("not a single-file NIfTI-1/NIfTI-2 header")
    if not 1 <= ndim <= 7:
        raise HeaderError(f"the NIfTI header declares {ndim} dimensions (1 to 7 are valid)")
    dims = tuple(int(d) for d in dims[:ndim])
    if min(dims) < 1:
        raise HeaderError(f"the NIfTI header declares a size of {'x'.join(map(str, dims))}")
    if bitpix <= 0 or bitpix % 8:
        raise HeaderError(f"the NIfTI header declares {bitpix} bits per voxel")
    if not math.isfinite(offset) or offset < minimum_offset or offset != int(offset):
        raise HeaderError(f"the NIfTI header's data offset ({offset}) is not valid")
    header = NiftiHeader(dims, bitpix // 8, int(offset))
    if max_voxels is not None and header.voxels > max_voxels:
        raise HeaderError(f"the volume declares {header.voxels} voxels ({'x'.join(map(str, dims))}); at most "
                          f"{max_voxels} are accepted")
    return header


def gzip_length(fh: BinaryIO, limit: int) -> int:
    """Decompressed length of the gzip stream(s) read from ``fh``, counting in bounded chunks and stopping
    as soon as ``limit`` bytes are exceeded (then some value > limit is returned). Corrupt or truncated
    streams raise HeaderError. Memory stays about 2 MB whatever the stream expands to."""
    total = 0
    d: Optional["zlib._Decompress"] = None  # None between members (a finished member is complete)
    seen = False
    try:
        while buf := fh.read(_CHUNK):
            while buf:
                if d is None:
                    d, seen = zlib.decompressobj(wbits=31), True
                out = d.decompress(buf, _CHUNK)
                total += len(out)
                # Output capped at _CHUNK: drain what the input already produced before reading more.
                while len(out) == _CHUNK and not d.eof and not d.unconsumed_tail and total <= limit:
                    out = d.decompress(b"", _CHUNK)
                    total += len(out)
                if total > limit:
                    return total
                if d.eof:
                    buf, d = d.unused_data, None  # the next gzip member, if any
                else:
                    buf = d.unconsumed_tail
    except zlib.error as exc:
        raise HeaderError(f"the gzip-compressed data is corrupt ({exc})") from None
    if not seen or d is not None:
        raise HeaderError("the gzip-compressed data is truncated")
    return total


def data_length(fh: BinaryIO, offset: int, encoding: str, declared: int, file_size: int) -> int:
    """Bytes of sample data present after ``offset`` (decompressed for gzip, counting at most declared + 1)."""
    if encoding == "raw":
        return max(0, file_size - offset)
    fh.seek(offset)
    return gzip_length(fh, declared)
