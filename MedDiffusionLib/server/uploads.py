"""Receiving and checking uploaded volumes before any job is queued.

The multipart body is parsed while it streams in, so the size limit is enforced on the bytes received, never
after buffering the whole upload. The file is written under a server-chosen random name whose suffix comes
from the file's magic bytes; the client's file name is never used on disk. Only single-file NRRD and NIfTI
are accepted (a detached NRRD header could name any file on the server as its data).
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

import numpy as np
import SimpleITK as sitk
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELDS = 32
MAX_FIELD_BYTES = 4096
MAX_SPACING_MM = 100.0
# After the limit is hit the rest of the body is read and discarded up to this much, so an ordinary client
# receives the 413 instead of a reset connection; beyond it the connection is simply closed.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
IO_BY_SUFFIX = {".nrrd": "NrrdImageIO", ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}


class UploadError(Exception):
    """A rejected upload; ``status`` is the HTTP code (400 or 413) and the message the response detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    path: Optional[Path] = None      # the received file (random name, no suffix yet)
    filename: str = ""               # as the client called it: for messages only
    size: int = 0

    def discard(self) -> None:
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
    if declared_length is not None and declared_length > max_bytes + DRAIN_LIMIT_BYTES:
        raise UploadError(413, f"the upload ({declared_length / 2**20:.1f} MB) exceeds the server's limit of "
                          f"{limit_mb:g} MB")

    up = Upload()
    state: dict = {"name": None, "filename": None, "buf": None, "fh": None, "hfield": b"", "hvalue": b"",
                   "headers": {}}

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
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                if state["fh"] is not None:
                    state["fh"].close()
                up.discard()
                async for more in stream:  # drain (bounded) so the client can read our answer
                    received += len(more)
                    if received > max_bytes + DRAIN_LIMIT_BYTES:
                        break
                raise UploadError(413, f"the upload exceeds the server's limit of {limit_mb:g} MB "
                                  "(server option --max-upload-mb)")
            parser.write(chunk)
        parser.finalize()
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
                      "format); send a single-file .nrrd, .nii or .nii.gz")


def _is_nifti(head: bytes) -> bool:
    # Single-file NIfTI-1 ('n+1' at byte 344) or NIfTI-2 ('n+2' at byte 4); 'ni1' pairs need a second file.
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def _nrrd_header_is_detached(path: Path) -> bool:
    with open(path, "rb") as fh:
        header = fh.read(65536)
    end = header.find(b"\n\n")
    lines = (header if end < 0 else header[:end]).replace(b"\r", b"").split(b"\n")
    return any(line.strip().lower().startswith((b"data file:", b"datafile:")) for line in lines)


def check_volume(path: Path, suffix: str, max_voxels: int) -> sitk.Image:
    """Read the stored upload with the reader its magic bytes name and check it can be reconstructed:
    3D, one component, a bounded voxel count (checked from the header, before the pixels are read),
    sane spacing, finite values. Raises UploadError(400) naming the problem."""
    if suffix == ".nrrd" and _nrrd_header_is_detached(path):
        raise UploadError(400, "NRRD files with a detached data file are not accepted; save the volume as a "
                          "single .nrrd file")
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
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise UploadError(400, "the uploaded volume contains NaN or infinite values")
    return image


def store_upload(up: Upload, max_voxels: int) -> tuple[Path, str]:
    """Give the received file its format's suffix (same random stem) and validate it; returns (path, suffix)."""
    suffix = detect_suffix(up.path, up.filename)
    final = up.path.with_name(up.path.stem + suffix)
    os.replace(up.path, final)
    up.path = final
    check_volume(final, suffix, max_voxels)
    return final, suffix


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
