"""Receiving and checking uploaded volumes before any job is queued.

The multipart body is parsed while it streams in, so the size limit is enforced on the bytes received, never
after buffering the whole upload. The file is written under a server-chosen random name whose suffix comes
from the file's magic bytes; the client's file name is never used on disk. Only single-file NRRD and NIfTI
are accepted (a detached header could name any file on the server as its data): the header is parsed here
first (``io.headers``), the declared data size must equal the data received, and an NRRD is rewritten with a
header holding only the checked fields, so SimpleITK only ever decodes the bytes the client sent.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import math
import os
import secrets
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

import numpy as np
import SimpleITK as sitk
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..io.headers import HeaderError, canonical_nrrd, data_length, parse_nifti_header, parse_nrrd_header
from ..io.headers import NRRD_HEADER_CAP

MAX_FIELDS = 32
MAX_FIELD_BYTES = 4096
MAX_SPACING_MM = 100.0
# After the limit is hit the rest of the body is read and discarded up to this much, so an ordinary client
# receives the 413 instead of a reset connection; beyond it the connection is simply closed.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
FRAMING_LIMIT_BYTES = 64 * 1024 + MAX_FIELDS * MAX_FIELD_BYTES
IO_BY_SUFFIX = {".nrrd": "NrrdImageIO", ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}
# Decoding an upload holds up to its declared size in memory: one at a time, the others wait (then 503).
MAX_CONCURRENT_VALIDATIONS = 1
VALIDATION_WAIT_S = 120.0
# Uploads being received at once (each holds a connection and an open file); beyond: 503 at once.
MAX_CONCURRENT_UPLOADS = 4
_VALIDATION_SLOTS = threading.BoundedSemaphore(MAX_CONCURRENT_VALIDATIONS)


class _TooLarge(Exception):
    pass


class UploadError(Exception):
    """A rejected upload; ``status`` is the HTTP code (400 or 413) and the message the response detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """A multipart upload being received: its form fields and the file written so far."""
    fields: dict[str, str] = field(default_factory=dict)
    path: Optional[Path] = None      # the received file (random name, no suffix yet)
    filename: str = ""               # as the client called it: for messages only
    size: int = 0

    def discard(self) -> None:
        """Delete the received file, if any."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


async def receive_multipart(content_type: str, stream: AsyncIterator[bytes], dest_dir: Path,
                            max_bytes: int, declared_length: Optional[int] = None) -> Upload:
    """Parse a multipart/form-data body from ``stream``: form fields into memory, the 'file' part to disk."""
    ctype, opts = parse_options_header(content_type or "")
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadError(400, "send the volume as multipart/form-data with a 'file' part")
    limit_mb = max_bytes / 2**20
    # The limit is on the file; form fields and multipart framing are bounded separately (MAX_FIELDS etc.).
    body_limit = max_bytes + FRAMING_LIMIT_BYTES
    if declared_length is not None and declared_length > body_limit + DRAIN_LIMIT_BYTES:
        raise UploadError(413, f"the upload ({declared_length / 2**20:.1f} MB) exceeds the server's limit of "
                          f"{limit_mb:g} MB")

    up = Upload()
    state: dict = {"name": None, "filename": None, "buf": None, "fh": None, "hfield": b"", "hvalue": b"",
                   "headers": {}, "file_bytes": 0}

    def on_part_begin() -> None:
        state.update(name=None, filename=None, buf=None, fh=None, headers={})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hfield"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hfield"].lower()] = state["hvalue"]
        state["hfield"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        disp, params = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disp != b"form-data" or not name:
            raise UploadError(400, "every multipart part needs a Content-Disposition: form-data name")
        state["name"] = name
        if name == "file":
            if up.path is not None:
                raise UploadError(400, "send exactly one 'file' part")
            up.filename = params.get(b"filename", b"").decode("utf-8", "replace")[:255]
            up.path = dest_dir / f"upload-{secrets.token_hex(12)}.part"
            state["fh"] = open(up.path, "xb")
        else:
            if name in up.fields or len(up.fields) >= MAX_FIELDS:
                raise UploadError(400, f"repeated form field '{name[:40]}' or too many fields")
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["fh"] is not None:
            state["file_bytes"] += end - start
            if state["file_bytes"] > max_bytes:
                raise _TooLarge()
            state["fh"].write(data[start:end])
        else:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise UploadError(400, f"form field '{state['name'][:40]}' is too long")

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        elif state["name"] is not None:
            up.fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field,
                     on_header_value=on_header_value, on_header_end=on_header_end,
                     on_headers_finished=on_headers_finished, on_part_data=on_part_data, on_part_end=on_part_end)
    # python-multipart types the callbacks as a TypedDict of exact signatures; ours take the same arguments.
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        try:
            async for chunk in stream:
                received += len(chunk)
                if received > body_limit:
                    raise _TooLarge()
                parser.write(chunk)
            parser.finalize()
        except _TooLarge:
            if state["fh"] is not None:
                state["fh"].close()
                state["fh"] = None
            up.discard()
            async for more in stream:  # drain (bounded) so the client can read our answer
                received += len(more)
                if received > body_limit + DRAIN_LIMIT_BYTES:
                    break
            raise UploadError(413, f"the upload exceeds the server's limit of {limit_mb:g} MB "
                              "(server option --max-upload-mb)") from None
    except MultipartParseError as exc:
        up.discard()
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    except BaseException:
        if state["fh"] is not None:
            state["fh"].close()
        up.discard()
        raise
    if up.path is None:
        raise UploadError(400, "no 'file' part: upload the volume (NRRD or NIfTI) as the form field 'file'")
    up.size = up.path.stat().st_size
    if up.size == 0:
        up.discard()
        raise UploadError(400, "the uploaded file is empty")
    return up


def detect_suffix(path: Path, filename: str = "") -> str:
    """'.nrrd', '.nii' or '.nii.gz' from the magic bytes; the client's file name only appears in messages."""
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head.startswith(b"NRRD"):
        return ".nrrd"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(352)
        except (OSError, EOFError):
            inner = b""
        if _is_nifti(inner):
            return ".nii.gz"
    if _is_nifti(head):
        return ".nii"
    # The magic bytes decide: a file named .nii.gz that is not gzip'd NIfTI would only fail later, less clearly.
    named = f" '{filename[:80]}'" if filename else ""
    raise UploadError(400, f"the uploaded file{named} is neither NRRD nor NIfTI (its first bytes match neither "
                      "format); send a single-file .nrrd, .nii or .nii.gz (detached headers such "
                      "as .nhdr, .mhd/.mha or .hdr/.img are not accepted)")


def _is_nifti(head: bytes) -> bool:
    # Single-file NIfTI-1 ('n+1' at byte 344) or NIfTI-2 ('n+2' at byte 4); 'ni1' pairs need a second file.
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def _compare_sizes(declared: int, present: int, encoding: str) -> None:
    if present != declared:
        what = "decompressed data" if encoding == "gzip" else "data"
        amount = "more" if present > declared else f"{present}"
        raise HeaderError(f"the header declares {declared} bytes of voxel data but the file holds {amount} bytes of "
                          f"{what}: header and data do not match")


def _check_nifti(path: Path, suffix: str, max_voxels: int) -> None:
    opener = gzip.open if suffix == ".nii.gz" else open
    with opener(path, "rb") as fh:
        try:
            head = fh.read(540)
        except (OSError, EOFError) as exc:
            raise HeaderError(f"the gzip-compressed data is corrupt ({exc})") from None
    header = parse_nifti_header(head, max_voxels)
    needed = header.data_offset + header.data_bytes
    if suffix == ".nii.gz":
        with open(path, "rb") as raw:
            present = data_length(raw, 0, "gzip", needed, 0)
    else:
        present = path.stat().st_size
    _compare_sizes(needed, present, "gzip" if suffix == ".nii.gz" else "raw")


def _write_canonical_nrrd(src: Path, dest: Path, max_voxels: int) -> None:
    """Copy an uploaded NRRD to ``dest`` under a header rebuilt from the checked fields only."""
    with open(src, "rb") as fh:
        header = parse_nrrd_header(fh.read(NRRD_HEADER_CAP), max_voxels)
        present = data_length(fh, header.data_offset, header.encoding, header.data_bytes, src.stat().st_size)
        _compare_sizes(header.data_bytes, present, header.encoding)
        fh.seek(header.data_offset)
        with open(dest, "xb") as out:
            out.write(canonical_nrrd(header))
            shutil.copyfileobj(fh, out, 1 << 20)


def check_volume(path: Path, suffix: str, max_voxels: int) -> sitk.Image:
    """Check an upload and return its decoded image: our own header parse first (detached data, declared vs
    present size, voxel count), then the reader its magic bytes name decodes it (an NRRD through a canonical
    copy, see module doc), then what reconstruction needs: 3D, one component, sane spacing, finite values.
    Raises UploadError(400) naming the problem."""
    try:
        if suffix != ".nrrd":
            _check_nifti(path, suffix, max_voxels)
            return _read_checked(path, suffix, max_voxels)
        canonical = path.with_name(f".{secrets.token_hex(6)}.checked.nrrd")
        try:
            _write_canonical_nrrd(path, canonical, max_voxels)
            return _read_checked(canonical, suffix, max_voxels)
        finally:
            with contextlib.suppress(OSError):
                canonical.unlink()
    except HeaderError as exc:
        raise UploadError(400, f"the uploaded file was refused: {exc}") from None


def _read_checked(path: Path, suffix: str, max_voxels: int) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetImageIO(IO_BY_SUFFIX[suffix])  # never let ITK pick a reader from the file's content
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UploadError(400, f"the uploaded file is not a readable {suffix} volume: {_short(exc, path)}") from None
    size = tuple(reader.GetSize())
    dim = reader.GetDimension()
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]
    if dim != 3:
        raise UploadError(400, f"the uploaded image is {dim}D (size {'x'.join(map(str, size))}); a 3D volume is "
                          "needed")
    if reader.GetNumberOfComponents() != 1 or "complex" in sitk.GetPixelIDValueAsString(reader.GetPixelID()):
        raise UploadError(400, "the uploaded image has several components per voxel (colour, vector or complex); "
                          "a scalar volume is needed")
    voxels = math.prod(size)
    if voxels < 1 or voxels > max_voxels:
        raise UploadError(400, f"the uploaded volume has {voxels} voxels ({'x'.join(map(str, size))}); the server "
                          f"accepts 1 to {max_voxels}")
    spacing = tuple(reader.GetSpacing())[:3]
    if not all(math.isfinite(s) and 0 < s < MAX_SPACING_MM for s in spacing):
        raise UploadError(400, f"the uploaded volume's spacing {spacing} mm is not plausible (each must be "
                          f"between 0 and {MAX_SPACING_MM:g} mm)")
    direction = np.asarray(reader.GetDirection(), dtype=float)
    n = math.isqrt(direction.size)  # 3x3, or 4x4 for a squeezed X x Y x Z x 1 file
    direction = direction.reshape(n, n)[:3, :3]
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise UploadError(400, "the uploaded volume's direction matrix is singular or not finite")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UploadError(400, f"the uploaded volume could not be read: {_short(exc, path)}") from None
    if image.GetDimension() == 4:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not _all_finite(arr):
        raise UploadError(400, "the uploaded volume contains NaN or infinite values")
    return image


def _all_finite(arr: np.ndarray) -> bool:
    # Slab by slab: np.isfinite on the whole volume would allocate a second, boolean copy of it.
    return all(np.isfinite(arr[z]).all() for z in range(arr.shape[0]))


def _release_memory() -> None:
    """Give the freed decode buffers back to the system: glibc keeps freed heap pages of worker threads."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def store_upload(up: Upload, max_voxels: int) -> tuple[Path, str]:
    """Validate the received file and store it under a server-chosen name with its format's suffix; returns
    (path, suffix). An NRRD is stored with its canonical header (see module doc). One validation at a time."""
    if up.path is None:
        raise UploadError(400, "the request carried no file")
    if not _VALIDATION_SLOTS.acquire(timeout=VALIDATION_WAIT_S):
        raise UploadError(503, "the server is busy checking other uploads; try again in a minute")
    try:
        suffix = detect_suffix(up.path, up.filename)
        final = up.path.with_name(up.path.stem + suffix)
        try:
            if suffix == ".nrrd":
                received = up.path
                up.path = final
                try:
                    _write_canonical_nrrd(received, final, max_voxels)
                finally:
                    with contextlib.suppress(OSError):
                        received.unlink()
            else:
                _check_nifti(up.path, suffix, max_voxels)
                os.replace(up.path, final)
                up.path = final
        except HeaderError as exc:
            raise UploadError(400, f"the uploaded file was refused: {exc}") from None
        _read_checked(final, suffix, max_voxels)  # the decoded image is dropped at once
        return final, suffix
    finally:
        _release_memory()
        _VALIDATION_SLOTS.release()


def read_stored_volume(path: Path) -> sitk.Image:
    """Read a job's validated input again in the worker (same forced reader as the check)."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    reader = sitk.ImageFileReader()
    reader.SetImageIO(IO_BY_SUFFIX[suffix])
    reader.SetFileName(str(path))
    image = reader.Execute()
    if image.GetDimension() == 4:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return image


def _short(exc: BaseException, path: Path) -> str:
    # ITK's last line describes the problem; the server's own paths are no business of the client.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text.replace(str(path), "the upload").replace(str(path.parent), "the store")[:300]
