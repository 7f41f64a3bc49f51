"""The scan's own grid: its intensity scale in physics units, and the map between it and the model's grid.

Intensities: the measurement operators want values linear in the physical quantity with empty space at 0. CT is
taken in Hounsfield units, u = HU / 1000 + 1 (air 0, water 1, cortical bone ~3); MR in its own units scaled by
the scan's 99.5th percentile of |I| (u ~ 1 for bright tissue, background 0). Both are exact affine maps, so the
output comes back on the input's scale with nothing clipped (bone keeps its HU).

Grids: the model grid shares the scan's origin and axes and has the model's spacing; model voxel i along an axis
sits at i * model_spacing / native_spacing in native index units. ``GridMap`` moves volumes between the grids with
one small dense matrix per axis: native -> model averages with a triangle of the model's voxel width (no
aliasing), model -> native interpolates linearly. Rows are normalised over the voxels that exist, so the edges are
extended from the scan itself: padding never enters as air or fake anatomy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IntensityScale", "GridMap", "model_extent"]

_CT_AIR_HU = -1000.0
_CT_HU_PER_UNIT = 1000.0


@dataclass(frozen=True)
class IntensityScale:
    """u = (value - offset) / unit and back.

    Attributes:
        offset: the scan intensity that maps to u = 0 (CT: -1000 HU, air; MR: 0).
        unit: scan intensity per physics unit (CT: 1000 HU; MR: the 99.5th percentile of |I|).
    """

    offset: float
    unit: float

    @classmethod
    def for_scan(cls, arr: np.ndarray, modality: str) -> "IntensityScale":
        """The scale of a scan: fixed HU scaling for CT, the 99.5th percentile magnitude for MR.

        Args:
            arr: the scan's voxels (CT in HU), any shape.
            modality: 'CT', or anything else for MR (an all-zero scan gets unit 1).
        """
        if modality == "CT":
            return cls(_CT_AIR_HU, _CT_HU_PER_UNIT)
        ref = float(np.percentile(np.abs(arr), 99.5)) if arr.size else 0.0
        if not ref > 0:
            ref = float(np.abs(arr).max()) or 1.0
        return cls(0.0, ref)

    def to_physics(self, values: torch.Tensor) -> torch.Tensor:
        """Scan intensities -> physics units."""
        return (values - self.offset) / self.unit

    def from_physics(self, u: torch.Tensor) -> torch.Tensor:
        """Physics units -> scan intensities."""
        return u * self.unit + self.offset


def model_extent(n: int, spacing: float, model_spacing: float) -> int:
    """Model voxels along an axis so that the last native voxel centre is covered (no extrapolated rim).

    Args:
        n: native voxels along the axis.
        spacing: native spacing in mm.
        model_spacing: model spacing in mm.

    Returns:
        ``ceil((n - 1) * spacing / model_spacing) + 1``, at least 1.
    """
    return max(1, int(math.ceil((n - 1) * spacing / model_spacing - 1e-6)) + 1)


def _down_matrix(n_native: int, n_model: int, ratio: float) -> np.ndarray:
    """(n_model, n_native): triangle-weighted average around each model voxel (ratio = model / native spacing)."""
    width = max(1.0, ratio)
    centre = np.arange(n_model)[:, None] * ratio
    w = np.clip(1.0 - np.abs(np.arange(n_native)[None, :] - centre) / width, 0.0, None)
    empty = w.sum(1) == 0  # cannot happen while the model grid covers the scan; guard with the nearest voxel
    if empty.any():
        w[empty, np.clip(np.rint(centre[empty, 0]).astype(int), 0, n_native - 1)] = 1.0
    return w / w.sum(1, keepdims=True)


def _up_matrix(n_native: int, n_model: int, ratio: float) -> np.ndarray:
    """(n_native, n_model): linear interpolation at each native voxel centre, clamped to the model grid."""
    pos = np.clip(np.arange(n_native) / ratio, 0.0, n_model - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_model - 1)
    frac = pos - lo
    m = np.zeros((n_native, n_model))
    m[np.arange(n_native), lo] += 1.0 - frac
    m[np.arange(n_native), hi] += frac
    return m


class GridMap:
    """Native (Z, X, Y) volumes <-> unpadded model-grid volumes; spacings in the same (Z, X, Y) order.

    Args:
        native_shape: the scan's (Z, X, Y) voxels.
        native_spacing: the scan's (Z, X, Y) spacing in mm.
        model_spacing: the model's (Z, X, Y) spacing in mm (the anatomy's).
        device: where the resampling matrices live.

    Attributes:
        native_shape: as given.
        model_shape: (Z, X, Y) model voxels covering the scan (`model_extent` per axis).
    """

    def __init__(self, native_shape: tuple[int, int, int], native_spacing: tuple[float, float, float],
                 model_spacing: tuple[float, float, float], device: torch.device | str = "cpu") -> None:
        self.native_shape = tuple(int(n) for n in native_shape)
        ratios = [float(m) / float(s) for s, m in zip(native_spacing, model_spacing)]
        self.model_shape = tuple(model_extent(n, s, m)
                                 for n, s, m in zip(self.native_shape, native_spacing, model_spacing))
        self._down = [torch.from_numpy(_down_matrix(n, k, r)).float().to(device)
                      for n, k, r in zip(self.native_shape, self.model_shape, ratios)]
        self._up = [torch.from_numpy(_up_matrix(n, k, r)).float().to(device)
                    for n, k, r in zip(self.native_shape, self.model_shape, ratios)]

    @staticmethod
    def _apply(vol: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        v = vol.float()
        v = torch.einsum("ij,jxy->ixy", mats[0], v)
        v = torch.einsum("ij,zjy->ziy", mats[1], v)
        return torch.einsum("ij,zxj->zxi", mats[2], v)

    def to_model(self, vol: torch.Tensor) -> torch.Tensor:
        """A volume on the scan's grid resampled to the model's grid."""
        return self._apply(vol, self._down)

    def to_native(self, vol: torch.Tensor) -> torch.Tensor:
        """A volume on the model's grid resampled back to the scan's grid."""
        return self._apply(vol, self._up)
