"""Small composable volume transforms over numpy arrays and SimpleITK images.

Axis conventions (see docs/INTERFACES.md): networks see (Z, X, Y) arrays; a SimpleITK array is (Z, Y, X);
user-facing sizes and spacings are (X, Y, Z).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# The np.pad modes that need no extra arguments besides the constant value.
PadMode = Literal["constant", "edge", "reflect", "symmetric", "wrap"]

__all__ = [
    "image_to_network",
    "network_to_image",
    "network_to_image_like",
    "normalize_percentile",
    "denormalize",
    "resample_to_spacing",
    "resample_like",
    "pad_or_crop_to_multiple",
    "center_pad_or_crop",
    "random_crop",
    "random_flip",
]

_IDENTITY3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


# --------------------------------------------------------------------------- axis order / geometry


def image_to_network(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> float32 array in network order (Z, X, Y)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a 3D scalar image, got {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    arr = sitk.GetArrayViewFromImage(img)  # (Z, Y, X)
    return np.ascontiguousarray(arr.transpose(0, 2, 1), dtype=np.float32)


def network_to_image(
    arr: np.ndarray,
    spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = _IDENTITY3,
) -> sitk.Image:
    """Network-order (Z, X, Y) array -> SimpleITK image with the given geometry (X, Y, Z order)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InputError(f"expected a 3D (Z, X, Y) array, got shape {arr.shape}")
    if len(spacing_xyz) != 3 or any(float(s) <= 0 for s in spacing_xyz):
        raise InputError(f"spacing must be three positive numbers (X, Y, Z), got {tuple(spacing_xyz)}")
    direction = tuple(float(d) for d in np.asarray(direction, dtype=float).ravel())
    if len(direction) != 9:
        raise InputError(f"direction must be a 3x3 matrix (9 numbers), got {len(direction)}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(0, 2, 1)))
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(direction)
    return img


def network_to_image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """Network-order array -> image carrying ``ref``'s spacing, origin and direction (sizes must match)."""
    expected = (ref.GetSize()[2], ref.GetSize()[0], ref.GetSize()[1])
    if tuple(np.shape(arr)) != expected:
        raise InputError(f"array shape {tuple(np.shape(arr))} (Z, X, Y) does not match the reference image "
                         f"size {ref.GetSize()} (X, Y, Z)")
    return network_to_image(arr, ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())


# --------------------------------------------------------------------------- intensities


def normalize_percentile(
    arr: np.ndarray, low: float = 0.5, high: float = 99.5
) -> tuple[np.ndarray, tuple[float, float]]:
    """Clip to the [low, high] percentiles, min-max to [0, 1], then map to [-1, 1] (the authors' recipe).

    Returns the float32 array and ``(lo, hi)`` so ``denormalize`` can undo it. A constant volume gives zeros.
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    a = np.asarray(arr, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        raise InputError("volume has no finite values to normalise")
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if not hi > lo:
        # Constant (or almost) volume: no contrast to stretch; zeros avoid a 0/0 NaN.
        return np.zeros_like(a, dtype=np.float32), (lo, hi)
    out = (np.clip(np.nan_to_num(a, nan=lo), lo, hi) - lo) / (hi - lo)
    return (out * 2.0 - 1.0).astype(np.float32), (lo, hi)


def denormalize(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of ``normalize_percentile`` (within the clipped range): [-1, 1] -> [lo, hi], float32."""
    a = np.asarray(arr, dtype=np.float32)
    return ((a + 1.0) * 0.5 * (float(hi) - float(lo)) + float(lo)).astype(np.float32)


# --------------------------------------------------------------------------- resampling


def _interp(name: str) -> int:
    try:
        return _INTERPOLATORS[name]
    except KeyError:
        raise InputError(f"unknown interpolator '{name}'; use one of {', '.join(_INTERPOLATORS)}") from None


def resample_to_spacing(
    img: sitk.Image,
    spacing_xyz: Sequence[float],
    interpolator: str = "linear",
    size: Sequence[int] | None = None,
    default_value: float | None = None,
) -> sitk.Image:
    """Resample to a new spacing keeping origin, direction and (approximately) the physical extent.

    The new size is round(old_size * old_spacing / new_spacing) unless ``size`` (X, Y, Z) is given. The
    origin stays the centre of the first voxel, as Slicer and ITK define it. ``default_value`` fills voxels
    outside the input (defaults to the image minimum, e.g. air for CT).
    """
    if len(spacing_xyz) != 3 or any(float(s) <= 0 for s in spacing_xyz):
        raise InputError(f"spacing must be three positive numbers (X, Y, Z), got {tuple(spacing_xyz)}")
    new_spacing = tuple(float(s) for s in spacing_xyz)
    old_size, old_spacing = img.GetSize(), img.GetSpacing()
    if size is None:
        new_size = tuple(max(1, int(round(n * s / ns))) for n, s, ns in zip(old_size, old_spacing, new_spacing))
    else:
        if len(size) != 3 or any(int(n) < 1 for n in size):
            raise InputError(f"size must be three positive integers (X, Y, Z), got {tuple(size)}")
        new_size = tuple(int(n) for n in size)
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(img, new_size, sitk.Transform(), _interp(interpolator), img.GetOrigin(), new_spacing,
                         img.GetDirection(), float(default_value), img.GetPixelID())


def resample_like(img: sitk.Image, reference: sitk.Image, interpolator: str = "linear",
                  default_value: float | None = None) -> sitk.Image:
    """Resample ``img`` onto ``reference``'s grid (size, spacing, origin, direction)."""
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(img, reference, sitk.Transform(), _interp(interpolator), float(default_value),
                         img.GetPixelID())


# --------------------------------------------------------------------------- shapes


def _pad_crop_plan(shape: Sequence[int], target: Sequence[int]) -> tuple[list[tuple[int, int]], tuple[slice, ...]]:
    """Per axis: centred padding (before, after) and centred crop slice to go from ``shape`` to ``target``."""
    pads, crops = [], []
    for n, t in zip(shape, target):
        if t >= n:
            before = (t - n) // 2
            pads.append((before, t - n - before))
            crops.append(slice(None))
        else:
            start = (n - t) // 2
            pads.append((0, 0))
            crops.append(slice(start, start + t))
    return pads, tuple(crops)


def _pad(arr: np.ndarray, pads: list[tuple[int, int]], mode: PadMode, value: float) -> np.ndarray:
    # np.pad refuses constant_values with any other mode.
    if mode == "constant":
        return np.pad(arr, pads, mode="constant", constant_values=value)
    return np.pad(arr, pads, mode=mode)


def center_pad_or_crop(arr: np.ndarray, shape: Sequence[int], mode: PadMode = "constant",
                       value: float = -1.0) -> np.ndarray:
    """Centre-pad (with ``value`` or another ``np.pad`` mode) and/or centre-crop ``arr`` to ``shape``."""
    arr = np.asarray(arr)
    if len(shape) != arr.ndim:
        raise InputError(f"target shape {tuple(shape)} has {len(shape)} axes, array has {arr.ndim}")
    pads, crops = _pad_crop_plan(arr.shape, shape)
    out = arr[crops]
    if any(p != (0, 0) for p in pads):
        out = _pad(out, pads, mode, value)
    return out


def pad_or_crop_to_multiple(
    arr: np.ndarray, multiple: int | Sequence[int], mode: PadMode = "constant", value: float = -1.0
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad every axis up to the next multiple of ``multiple`` (centred); return the array and undo slices.

    Networks with ``downsample`` levels need sizes divisible by it; ``out[undo]`` gives back the input shape.
    Padding (never cropping) keeps all data, so the undo is exact. ``value`` -1 is "background" in [-1, 1].
    """
    arr = np.asarray(arr)
    mults = [int(m) for m in multiple] if isinstance(multiple, Sequence) else [int(multiple)] * arr.ndim
    if len(mults) != arr.ndim or any(m < 1 for m in mults):
        raise InputError(f"multiple must be a positive integer or one per axis, got {multiple}")
    target = [-(-n // m) * m for n, m in zip(arr.shape, mults)]
    pads, _ = _pad_crop_plan(arr.shape, target)
    undo = tuple(slice(b, b + n) for (b, _a), n in zip(pads, arr.shape))
    if all(p == (0, 0) for p in pads):
        return arr, undo
    return _pad(arr, pads, mode, value), undo


# --------------------------------------------------------------------------- random (training) transforms


def random_crop(arr: np.ndarray, shape: Sequence[int], rng: np.random.Generator,
                value: float = -1.0) -> np.ndarray:
    """Random crop of ``shape`` (leading axes kept if ``shape`` is shorter); pads centred if too small."""
    arr = np.asarray(arr)
    k = len(shape)
    lead = arr.shape[: arr.ndim - k]
    spatial = arr.shape[arr.ndim - k:]
    if any(n < t for n, t in zip(spatial, shape)):
        arr = center_pad_or_crop(arr, tuple(lead) + tuple(max(n, t) for n, t in zip(spatial, shape)),
                                 value=value)
        spatial = arr.shape[arr.ndim - k:]
    starts = [int(rng.integers(0, n - t + 1)) for n, t in zip(spatial, shape)]
    sl = (slice(None),) * len(lead) + tuple(slice(s, s + t) for s, t in zip(starts, shape))
    return arr[sl]


def random_flip(arr: np.ndarray, rng: np.random.Generator, axes: Sequence[int] = (-1, -2),
                p: float = 0.5) -> np.ndarray:
    """Flip each axis in ``axes`` independently with probability ``p`` (returns a contiguous copy)."""
    arr = np.asarray(arr)
    for ax in axes:
        if rng.random() < p:
            arr = np.flip(arr, axis=ax)
    return np.ascontiguousarray(arr)
