"""Paired image-quality metrics for 3D volumes: PSNR, SSIM (3D Gaussian window) and multi-scale SSIM.

Inputs may be numpy arrays or torch tensors shaped (D, H, W), (C, D, H, W) or (B, C, D, H, W); results are
Python floats averaged over everything. ``data_range`` is the span of valid values (2.0 for [-1, 1]
volumes, e.g. 2000 for a HU window): it sets the SSIM stabilising constants, so always pass it explicitly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F  # avg_pool3d for the MS-SSIM pyramid

from ..errors import InputError

__all__ = ["psnr", "ssim3d", "ms_ssim3d", "MS_SSIM_WEIGHTS"]

ArrayLike = Union[np.ndarray, torch.Tensor]
# Wang, Simoncelli & Bovik (2003) scale weights, finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as_5d(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    t = t.to(dtype=dtype)
    if t.ndim == 3:
        t = t[None, None]
    elif t.ndim == 4:
        t = t[None]
    elif t.ndim != 5:
        raise InputError(f"expected a 3D volume (D,H,W), (C,D,H,W) or (B,C,D,H,W), got shape {tuple(t.shape)}")
    return t


def _pair(x: ArrayLike, y: ArrayLike, data_range: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not (data_range > 0 and math.isfinite(data_range)):
        raise InputError(f"data_range must be a positive number, got {data_range}")
    a, b = _as_5d(x, dtype), _as_5d(y, dtype)
    if a.shape != b.shape:
        raise InputError(f"volumes differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(x: ArrayLike, y: ArrayLike, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes."""
    a, b = _pair(x, y, data_range, torch.float64)
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def _gauss_1d(win: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(win, dtype=dtype) - (win - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering over the last three axes of ``x``.

    Each axis is filtered by a product with a banded (Toeplitz) matrix: BLAS-backed, and on CPU several
    times faster than a grouped conv3d for these small kernels.
    """
    k = g.numel()
    nd = x.ndim
    for dim in (nd - 3, nd - 2, nd - 1):
        n = x.shape[dim]
        if n > 192:  # the dense band costs O(n) per voxel: use a sliding window on long axes
            x = torch.matmul(x.unfold(dim, k, 1), g)
            continue
        band = torch.zeros(n - k + 1, n, dtype=x.dtype, device=x.device)
        idx = torch.arange(n - k + 1, device=x.device)
        for j in range(k):
            band[idx, idx + j] = g[j]
        x = torch.movedim(torch.tensordot(x, band, dims=([dim], [1])), -1, dim)
    return x


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, k1: float, k2: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel SSIM map and contrast-structure map, for inputs already divided by data_range."""
    c1, c2 = k1 ** 2, k2 ** 2
    # One filtering pass over the five local statistics stacked together.
    mu_a, mu_b, e_aa, e_bb, e_ab = _filter(torch.stack([a, b, a * a, b * b, a * b]), g.to(a.dtype))
    # Second moments minus squared means: inputs are scaled to ~[0, 1], which keeps float32 cancellation small.
    s_aa, s_bb, s_ab = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
    cs = (2.0 * s_ab + c2) / (s_aa + s_bb + c2)
    lum = (2.0 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
    return lum * cs, cs


def _window(shape: Sequence[int], win: int) -> int:
    if win < 1 or win % 2 == 0:
        raise InputError(f"SSIM window must be a positive odd number of voxels, got {win}")
    smallest = min(shape)
    if smallest < win:
        # Small volumes: shrink the window to the largest odd size that fits rather than failing.
        win = smallest if smallest % 2 == 1 else smallest - 1
    return max(win, 1)


def ssim3d(x: ArrayLike, y: ArrayLike, data_range: float, win: int = 7, sigma: float = 1.5,
           k1: float = 0.01, k2: float = 0.03, dtype: torch.dtype = torch.float32) -> float:
    """Mean structural similarity with a 3D Gaussian window (``win`` voxels, ``sigma``), valid region only.

    Identical volumes give 1.0. Volumes smaller than the window use the largest odd window that fits.
    """
    a, b = _pair(x, y, data_range, dtype)
    w = _window(a.shape[2:], win)
    g = _gauss_1d(w, sigma, dtype)
    ssim_map, _cs = _ssim_terms(a / data_range, b / data_range, g, k1, k2)
    return float(ssim_map.mean())


def _scales_for(shape: Sequence[int], win: int, max_scales: int) -> int:
    """Most scales (up to ``max_scales``) whose coarsest volume still holds a full window."""
    n = 1
    while n < max_scales and min(shape) // (2 ** n) >= win:
        n += 1
    return n


def ms_ssim3d(x: ArrayLike, y: ArrayLike, data_range: float, weights: Sequence[float] | None = None,
              win: int = 7, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
              dtype: torch.dtype = torch.float32) -> float:
    """Multi-scale SSIM (Wang et al. 2003) in 3D, in [0, 1].

    Without ``weights`` the number of scales adapts to the volume size (up to 5: a 64^3 volume with a
    7-voxel window gets 4) and the standard weights for those scales are renormalised to sum to 1. Explicit
    ``weights`` fix the number of scales and must fit the volume. Negative contrast-structure terms are
    clamped to 0 (as common implementations do) so fractional powers stay real.
    """
    a, b = _pair(x, y, data_range, dtype)
    shape = a.shape[2:]
    if weights is None:
        n = _scales_for(shape, min(win, min(shape)), len(MS_SSIM_WEIGHTS))
        wts = torch.tensor(MS_SSIM_WEIGHTS[:n], dtype=torch.float64)
    else:
        wts = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        n = wts.numel()
        if n < 1 or bool((wts < 0).any()):
            raise InputError("MS-SSIM weights must be a non-empty list of non-negative numbers")
        if min(shape) // (2 ** (n - 1)) < min(win, min(shape)):
            raise InputError(f"volume {tuple(shape)} is too small for {n} MS-SSIM scales with a {win}-voxel window")
    wts = wts / wts.sum()
    a, b = a / data_range, b / data_range
    values = []
    for i in range(n):
        w = _window(a.shape[2:], win)
        g = _gauss_1d(w, sigma, dtype)
        ssim_map, cs_map = _ssim_terms(a, b, g, k1, k2)
        last = i == n - 1
        values.append(torch.relu((ssim_map if last else cs_map).mean()).double())
        if not last:
            # Average-pool by 2; odd sizes drop the last voxel (as the 2D reference implementation does).
            a, b = F.avg_pool3d(a, 2), F.avg_pool3d(b, 2)
    out = torch.prod(torch.stack(values) ** wts)
    return float(out)
