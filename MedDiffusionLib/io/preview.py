"""PNG previews of volumes: three orthogonal mid-slices side by side, written by SimpleITK's PNG writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a (H, W) uint8 grey or (H, W, 3) uint8 RGB array to a PNG file (atomically)."""
    import SimpleITK as sitk

    from .atomic import atomic_write_path

    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"write_png needs (H,W) or (H,W,3) uint8, got {img.shape} {img.dtype}")
    with atomic_write_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(img, isVector=img.ndim == 3), str(tmp))


def _to_uint8(slice_: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.asarray(slice_, np.float32) - lo) / max(hi - lo, 1e-8)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mid_slice_montage(volume_zyx: np.ndarray, spacing_xyz: tuple[float, float, float] | None = None,
                      window: tuple[float, float] | None = None, gap: int = 4, min_height: int = 160) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices of a SimpleITK-ordered (Z, Y, X) array as one uint8 image.

    Slices are resampled (nearest) to square pixels when a spacing is given, so anisotropic volumes look right,
    and small volumes are enlarged (nearest, whole pixels) to at least `min_height` pixels so they can be seen.
    """
    vol = np.asarray(volume_zyx, np.float32)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    lo, hi = window if window is not None else (float(np.percentile(vol, 0.5)), float(np.percentile(vol, 99.5)))
    sx, sy, sz = spacing_xyz or (1.0, 1.0, 1.0)
    z, y, x = (s // 2 for s in vol.shape)
    # (rows, cols) with their physical spacing; coronal and sagittal are flipped so superior is up.
    views = [
        (vol[z], sy, sx),
        (vol[:, y, :][::-1], sz, sx),
        (vol[:, :, x][::-1], sz, sy),
    ]
    tiles = []
    for img, row_sp, col_sp in views:
        base = min(row_sp, col_sp)
        rows = max(1, int(round(img.shape[0] * row_sp / base)))
        cols = max(1, int(round(img.shape[1] * col_sp / base)))
        ri = np.minimum((np.arange(rows) * img.shape[0] / rows).astype(int), img.shape[0] - 1)
        ci = np.minimum((np.arange(cols) * img.shape[1] / cols).astype(int), img.shape[1] - 1)
        tiles.append(_to_uint8(img[ri][:, ci], lo, hi))
    zoom = max(1, -(-min_height // max(t.shape[0] for t in tiles)))
    tiles = [np.repeat(np.repeat(t, zoom, axis=0), zoom, axis=1) for t in tiles]
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, gap))) for t in tiles]
    return np.concatenate(padded, axis=1)[:, :-gap]


def save_preview(path: str | Path, volume_zyx: np.ndarray, spacing_xyz: tuple[float, float, float] | None = None,
                 window: tuple[float, float] | None = None) -> None:
    """Write the mid-slice montage of a (Z, Y, X) volume to a PNG file (atomically)."""
    write_png(path, mid_slice_montage(volume_zyx, spacing_xyz, window))
