"""Reading and writing 3D volumes with their geometry (spacing, origin, direction) through SimpleITK.

Reads NRRD, NIfTI, MetaImage and DICOM series folders; writes single-file formats atomically. Every failure a
user can cause raises ``InputError`` with a message naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .atomic import WriteVerificationError, atomic_write_path, check_writable, full_suffix
from .headers import HeaderError, parse_nifti_header, parse_nrrd_header

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "DICOM_SUFFIXES",
    "read_volume",
    "read_dicom_series",
    "write_volume",
    "is_supported_path",
    "verify_written_volume",
]

# Files read directly. ".nhdr"/".mhd" are headers with a detached data file.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# Written as a single file only: a detached header names its data file, which would point at the temporary
# name after the atomic rename, so .nhdr/.mhd are not offered for writing.
WRITABLE_SUFFIXES: tuple[str, ...] = (".nrrd", ".nii", ".nii.gz", ".mha")
# A single DICOM file stands for the series in its folder.
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".ima")


def is_supported_path(path: str | os.PathLike[str]) -> bool:
    """True for a readable volume file suffix or an existing folder (DICOM series)."""
    p = Path(path)
    return p.is_dir() or full_suffix(p) in SUPPORTED_SUFFIXES + DICOM_SUFFIXES


def _validate(img: sitk.Image, source: str) -> sitk.Image:
    """Squeeze a trailing singleton 4th axis; refuse non-3D, empty and multi-component images."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{source}' has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector/complex "
            "image); a scalar (grey-level) volume is needed"
        )
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        # Some NIfTI writers store a 3D volume as X x Y x Z x 1.
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        raise InputError(f"'{source}' is a {dim}D image of size {tuple(img.GetSize())}; a 3D volume is needed")
    if min(img.GetSize()) < 1:
        raise InputError(f"'{source}' is empty (size {tuple(img.GetSize())})")
    return img


def read_dicom_series(folder: str | os.PathLike[str]) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder`` (not recursive).

    Returns:
        A 3D scalar image (size X, Y, Z; spacing in mm) in the series' pixel type.

    Raises:
        InputError: the folder is missing, holds no series, cannot be read, or the series is not a 3D scalar
            volume.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM folder '{folder}' does not exist")
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputError(f"Could not scan '{folder}' for DICOM files: {exc}") from exc
    if not series_ids:
        raise InputError(f"No DICOM series found in folder '{folder}'")
    # Largest series wins: a study folder often also holds scouts/localisers with a handful of slices.
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    best = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    files = files_per_series[best]
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Could not read the DICOM series in '{folder}': {_short(exc)}") from exc
    return _validate(img, str(folder))


def _short(exc: BaseException) -> str:
    # ITK exceptions are long multi-line dumps; the last non-empty line carries the description.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def read_volume(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a 3D scalar volume (NRRD, NIfTI, MetaImage, or a DICOM folder / file of a series).

    Geometry (spacing, origin, direction) is kept as the file states it; the pixel type is unchanged.

    Args:
        path: a file with a suffix in `SUPPORTED_SUFFIXES`, a DICOM file (its folder's largest series is read)
            or a DICOM folder; '~' is expanded.

    Returns:
        A 3D scalar image, size (X, Y, Z); an X x Y x Z x 1 NIfTI is squeezed to 3D.

    Raises:
        InputError: naming the file, when it is missing, empty, of an unsupported suffix, unreadable, not 3D,
            empty in some direction or not scalar (colour, vector, complex).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"Volume file '{p}' does not exist")
    if p.is_dir():
        return read_dicom_series(p)
    suffix = full_suffix(p)
    if suffix in DICOM_SUFFIXES:
        return read_dicom_series(p.parent)
    if suffix not in SUPPORTED_SUFFIXES:
        raise InputError(
            f"'{p.name}' has an unsupported extension '{suffix or '(none)'}'; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder"
        )
    if p.stat().st_size == 0:
        raise InputError(f"Volume file '{p}' is empty (0 bytes)")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"Could not read volume file '{p}': {_short(exc)}") from exc
    return _validate(img, str(p))


def write_volume(image: sitk.Image, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically; the format follows the suffix (see ``WRITABLE_SUFFIXES``).

    ``compress`` enables the format's lossless compression (gzip for NRRD/MHA; '.nii.gz' is always compressed).

    The file is written to a temporary name beside ``path``, read back and checked (`verify_written_volume`),
    then renamed over ``path``; on any failure ``path`` is left as it was.

    Returns:
        The absolute path written.

    Raises:
        InputError: not a SimpleITK image, a suffix outside `WRITABLE_SUFFIXES`, a path that cannot be created,
            a failed write, or a file that does not read back as ``image`` (`WriteVerificationError`).
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"write_volume expects a SimpleITK image, got {type(image).__name__}")
    suffix = full_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(
            f"Cannot write '{Path(path).name}': unsupported extension '{suffix or '(none)'}'; "
            f"use one of {', '.join(WRITABLE_SUFFIXES)}"
        )
    dest = check_writable(path)
    with atomic_write_path(dest, lambda tmp: verify_written_volume(tmp, image)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise InputError(f"Could not write volume file '{dest}': {_short(exc)}") from exc
    return dest


# Geometry is stored as float32 in NIfTI headers: compare to that precision.
_GEOMETRY_RTOL, _GEOMETRY_ATOL = 1e-5, 1e-4


def _expected_size(path: Path) -> Optional[int]:
    """The exact file size an uncompressed NRRD or NIfTI must have (from its own header); None otherwise."""
    suffix = full_suffix(path)
    with open(path, "rb") as fh:
        head = fh.read(64 * 1024)
    try:
        if suffix == ".nrrd" and head.startswith(b"NRRD"):
            h = parse_nrrd_header(head)
            return h.data_offset + h.data_bytes if h.encoding == "raw" else None
        if suffix == ".nii":
            n = parse_nifti_header(head[:540])
            return n.data_offset + n.data_bytes
    except HeaderError:
        return None  # an unusual but valid header: the read-back below still checks everything
    return None


def verify_written_volume(path: Path, image: sitk.Image) -> None:
    """Raise WriteVerificationError unless ``path`` holds ``image``: the exact size its header implies (when
    uncompressed), and a read-back with the same size, pixel type, geometry and identical voxel bytes."""
    size = path.stat().st_size
    expected = _expected_size(path)
    if expected is not None and size != expected:
        raise WriteVerificationError(f"the file has {size} bytes but its header needs {expected}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        back = reader.Execute()
    except RuntimeError as exc:
        raise WriteVerificationError(f"the written file cannot be read back ({_short(exc)})") from None
    if back.GetSize() != image.GetSize() or back.GetPixelID() != image.GetPixelID() \
            or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel():
        raise WriteVerificationError(f"the file read back as {back.GetSize()} {back.GetPixelIDTypeAsString()}, "
                                     f"not {image.GetSize()} {image.GetPixelIDTypeAsString()}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = getattr(back, f"Get{what}")(), getattr(image, f"Get{what}")()
        if not np.allclose(a, b, rtol=_GEOMETRY_RTOL, atol=_GEOMETRY_ATOL):
            raise WriteVerificationError(f"the file read back with {what.lower()} {a}, not {b}")
    if not _same_voxels(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
        raise WriteVerificationError("the voxels read back differ from the image that was written")


def _same_voxels(written: np.ndarray, meant: np.ndarray) -> bool:
    # Byte-wise first (exact, NaN equal to itself). ITK's NIfTI reader turns NaN into 0, so where the image
    # held NaN a read-back 0 is accepted too; every other voxel must be bit-identical.
    if np.array_equal(np.ascontiguousarray(written).view(np.uint8), np.ascontiguousarray(meant).view(np.uint8)):
        return True
    if not np.issubdtype(meant.dtype, np.floating):
        return False
    nan = np.isnan(meant)
    if not nan.any():
        return False
    return bool(np.array_equal(written[~nan].view(np.uint8), meant[~nan].view(np.uint8))
                and np.all(np.isnan(written[nan]) | (written[nan] == 0)))
