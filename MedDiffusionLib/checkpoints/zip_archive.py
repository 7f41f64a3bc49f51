"""Strict reader for the zip layout that ``torch.save`` writes, applied to bytes already in memory.

Zip readers disagree on malformed archives, and that disagreement is an attack: Python's ``zipfile`` reads the
central directory that sits just before the end record and shifts every offset by the difference, while
torch's reader (miniz) reads the directory at the absolute offset the end record names. An archive carrying
two directories therefore showed ``zipfile`` a harmless checkpoint and torch a TorchScript program (measured
with torch 2.13: ``torch._C.PyTorchFileReader`` listed ``code/`` and ``constants.pkl``, ``zipfile`` did not).

This reader accepts only archives on which every reader must agree: one end record at the very end of the
file (no comment), the directory right before it (or before its zip64 records) at the offset it names,
entries stored uncompressed, one after another from byte 0 to the directory with no gap, overlap or
duplicate name, each local header repeating its directory entry, and every CRC correct. The project never
hands such a file to another zip reader anyway: records are sliced from the validated buffer.
"""
from __future__ import annotations

import binascii
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["ZipRecord", "ZipLayoutError", "read_zip_records", "ZIP_MAGIC"]

ZIP_MAGIC = b"PK\x03\x04"
_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory (22 bytes)
_Z64_LOCATOR = struct.Struct("<4sIQI")  # zip64 end locator (20 bytes)
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # zip64 end record (56 bytes)
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory entry (46 bytes)
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header (30 bytes)
_U32_MAX = 0xFFFFFFFF
_ALLOWED_FLAGS = 0x0808  # bit 3: sizes in a data descriptor (torch); bit 11: UTF-8 names
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


class ZipLayoutError(ValueError):
    """The bytes are not a zip archive every reader would read the same way."""


@dataclass(frozen=True)
class ZipRecord:
    """One stored record: its name and where its bytes lie in the buffer."""

    name: str
    offset: int
    size: int


def _zip64_extra(extra: bytes, need: list[str], values: dict[str, int], where: str) -> None:
    """Replace 0xFFFFFFFF fields by their zip64 values (extra block 0x0001), in the order the spec sets."""
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise ZipLayoutError(f"{where}: truncated extra field")
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        if len(body) != size:
            raise ZipLayoutError(f"{where}: truncated extra field")
        if tag == 0x0001 and need:
            if size < 8 * len(need):
                raise ZipLayoutError(f"{where}: zip64 field too short")
            for i, key in enumerate(need):
                values[key] = struct.unpack_from("<Q", body, 8 * i)[0]
            need = []
        pos += 4 + size
    if need:
        raise ZipLayoutError(f"{where}: zip64 sizes missing")


def _end_records(buf: memoryview) -> tuple[int, int, int]:
    """(number of entries, directory offset, directory end) from the end record(s) at the end of ``buf``."""
    n = len(buf)
    if n < _EOCD.size:
        raise ZipLayoutError("too short for a zip archive")
    sig, disk, cd_disk, n_here, n_total, cd_size, cd_off, comment = _EOCD.unpack_from(buf, n - _EOCD.size)
    if sig != b"PK\x05\x06":
        raise ZipLayoutError("no end-of-directory record at the end of the file (appended data or a comment)")
    if comment or disk or cd_disk or n_here != n_total:
        raise ZipLayoutError("unsupported end-of-directory record (comment or multi-disk archive)")
    cd_end = n - _EOCD.size
    loc_at = cd_end - _Z64_LOCATOR.size
    if loc_at >= 0 and bytes(buf[loc_at:loc_at + 4]) == b"PK\x06\x07":
        _, loc_disk, z_off, disks = _Z64_LOCATOR.unpack_from(buf, loc_at)
        if loc_disk != 0 or disks != 1 or z_off != loc_at - _Z64_EOCD.size:
            raise ZipLayoutError("zip64 end record is not where its locator says")
        (z_sig, z_size, _, _, z_disk, z_cd_disk, z_here, z_total, z_cd_size,
         z_cd_off) = _Z64_EOCD.unpack_from(buf, z_off)
        if z_sig != b"PK\x06\x06" or z_size != _Z64_EOCD.size - 12 or z_disk or z_cd_disk or z_here != z_total:
            raise ZipLayoutError("malformed zip64 end record")
        for small, big in ((n_total, z_total), (cd_size, z_cd_size), (cd_off, z_cd_off)):
            if small not in (big, 0xFFFF, _U32_MAX):
                raise ZipLayoutError("the zip and zip64 end records disagree")
        n_total, cd_size, cd_off, cd_end = z_total, z_cd_size, z_cd_off, z_off
    elif 0xFFFF == n_total or _U32_MAX in (cd_size, cd_off):
        raise ZipLayoutError("zip64 end records missing")
    if cd_off + cd_size != cd_end:
        raise ZipLayoutError("the central directory is not where the end record says (a second directory or "
                             "data before the archive)")
    return n_total, cd_off, cd_end


def _central_entries(buf: memoryview, count: int, cd_off: int, cd_end: int,
                     check_name: Optional[Callable[[str], None]]) -> list[tuple[str, bytes, int, int, int, int]]:
    """(name, raw name, flags, crc, size, local header offset) for each directory entry, in order."""
    entries = []
    pos = cd_off
    for i in range(count):
        if pos + _CENTRAL.size > cd_end:
            raise ZipLayoutError("central directory truncated")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _,
         local) = _CENTRAL.unpack_from(buf, pos)
        if sig != b"PK\x01\x02":
            raise ZipLayoutError(f"central directory entry {i} has a bad signature")
        raw = bytes(buf[pos + 46:pos + 46 + nlen])
        extra = bytes(buf[pos + 46 + nlen:pos + 46 + nlen + elen])
        pos += 46 + nlen + elen + clen
        if pos > cd_end:
            raise ZipLayoutError("central directory truncated")
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ZipLayoutError(f"record name {raw!r} is not plain ASCII") from None
        if check_name is not None:  # the caller's verdict on a name comes first: the clearest message
            check_name(name)
        if flags & ~_ALLOWED_FLAGS or method != 0 or clen or disk:
            raise ZipLayoutError(f"record '{name}' is compressed, encrypted or commented (torch.save writes "
                                 "none of these)")
        values = {"usize": usize, "csize": csize, "local": local}
        _zip64_extra(extra, [k for k in ("usize", "csize", "local") if values[k] == _U32_MAX], values,
                     f"record '{name}'")
        if values["usize"] != values["csize"]:
            raise ZipLayoutError(f"record '{name}': stored size differs from its size")
        if not _NAME_RE.fullmatch(name) or ".." in name.split("/"):
            raise ZipLayoutError(f"record name {name!r} is not allowed")
        entries.append((name, raw, flags, crc, values["usize"], values["local"]))
    if pos != cd_end:
        raise ZipLayoutError("central directory has trailing bytes")
    return entries


def _data_descriptor(buf: memoryview, at: int, crc: int, size: int, next_at: int) -> int:
    """Length of the data descriptor at ``at`` that repeats (crc, size) and ends at ``next_at``."""
    for length, fmt in ((16, "<4sIII"), (24, "<4sIQQ"), (12, "<III"), (20, "<IQQ")):
        if at + length != next_at:
            continue
        fields = struct.unpack_from(fmt, buf, at)
        if len(fields) == 4:
            if fields[0] != b"PK\x07\x08":
                continue
            fields = fields[1:]
        if fields == (crc, size, size):
            return length
    raise ZipLayoutError("a data descriptor does not match its directory entry")


def read_zip_records(data: bytes | bytearray | memoryview,
                     check_name: Optional[Callable[[str], None]] = None) -> dict[str, ZipRecord]:
    """Validate ``data`` as a torch.save-style zip archive and return its records by name.

    ``check_name`` is called with each directory name before anything else about the entry is checked (it
    raises to refuse). Raises :class:`ZipLayoutError` (a ``ValueError``) naming the first inconsistency.
    """
    buf = memoryview(data).cast("B")
    if bytes(buf[:4]) != ZIP_MAGIC:
        raise ZipLayoutError("data before the first zip record")
    count, cd_off, cd_end = _end_records(buf)
    entries = _central_entries(buf, count, cd_off, cd_end, check_name)
    records: dict[str, ZipRecord] = {}
    expected_at = 0
    for idx, (name, raw, flags, crc, size, local) in enumerate(entries):
        if name in records:
            raise ZipLayoutError(f"record '{name}' appears twice")
        if local != expected_at:
            raise ZipLayoutError(f"record '{name}' does not start where the previous one ends (gap, overlap "
                                 "or hidden data)")
        if local + _LOCAL.size > cd_off:
            raise ZipLayoutError(f"record '{name}': local header truncated")
        (sig, _, l_flags, l_method, _, _, l_crc, l_csize, l_usize, nlen,
         elen) = _LOCAL.unpack_from(buf, local)
        if sig != ZIP_MAGIC or l_flags != flags or l_method != 0:
            raise ZipLayoutError(f"record '{name}': local header does not match its directory entry")
        if bytes(buf[local + 30:local + 30 + nlen]) != raw:
            raise ZipLayoutError(f"record '{name}': local header names another file")
        start = local + 30 + nlen + elen
        l_extra = bytes(buf[local + 30 + nlen:start])
        if not flags & 0x08:  # sizes in the local header: they must agree with the directory
            values = {"usize": l_usize, "csize": l_csize}
            _zip64_extra(l_extra, [k for k in ("usize", "csize") if values[k] == _U32_MAX], values,
                         f"record '{name}'")
            if l_crc != crc or values["usize"] != size or values["csize"] != size:
                raise ZipLayoutError(f"record '{name}': local header sizes differ from the directory")
        else:
            _zip64_extra(l_extra, [], {}, f"record '{name}'")  # structure check only
        end = start + size
        next_at = entries[idx + 1][5] if idx + 1 < len(entries) else cd_off
        if end > next_at:
            raise ZipLayoutError(f"record '{name}' overlaps the next one")
        if flags & 0x08:
            end += _data_descriptor(buf, end, crc, size, next_at)
        if binascii.crc32(buf[start:start + size]) != crc:
            raise ZipLayoutError(f"record '{name}' is corrupt (CRC mismatch)")
        records[name] = ZipRecord(name, start, size)
        expected_at = end
    if expected_at != cd_off:
        raise ZipLayoutError("bytes between the last record and the central directory")
    return records
