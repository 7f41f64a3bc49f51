"""Cartesian MRI in torch: centred orthonormal FFTs, undersampling masks, zero-filling, data consistency.

Conventions:
  * k-space is centred: DC sits at index n // 2 of each transformed dim (ifftshift -> FFT -> fftshift) and the
    FFT is orthonormal (norm="ortho"), so Parseval holds and the adjoint of fft2c is ifft2c.
  * Masks are (H, W) tensors for one slice's k-space plane and broadcast over leading dims. A (Z, X, Y)
    volume is undersampled per axial slice: every slice's (kx, ky) plane gets the same 2D mask. This is the
    slice-wise (2D multi-slice) acquisition model that slice-based priors assume; a true 3D acquisition
    would undersample the two phase-encode dims of a 3D k-space instead (use `fftnc` for that).
  * `gaussian_mask_1d` samples whole lines: phase encoding along dim -2 (rows), readout along dim -1.
Mask generation is seeded and uses numpy / sigpy (once, outside any autograd graph); the transforms and
data consistency are pure torch, differentiable, and run on any device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InputError
from ..options import MIN_ACCELERATION  # the bound is defined once, with the reconstruction options

__all__ = [
    "fft2c", "ifft2c", "fftnc", "ifftnc", "gaussian_mask_1d", "poisson_disc_mask", "mask_acceleration",
    "undersample", "zero_filled", "data_consistency",
]

Device = Union[str, torch.device, None]
_OUTPUTS = ("complex", "real", "magnitude")


def fftnc(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Centred orthonormal FFT over `dims`."""
    dims = tuple(dims)
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims, norm="ortho"), dim=dims)


def ifftnc(k: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Centred orthonormal inverse FFT over `dims` (exact inverse and adjoint of `fftnc`)."""
    dims = tuple(dims)
    k = torch.fft.ifftshift(k, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(k, dim=dims, norm="ortho"), dim=dims)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two dims: image (..., H, W) -> k-space (..., H, W)."""
    return fftnc(x, (-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT over the last two dims: k-space -> complex image."""
    return ifftnc(k, (-2, -1))


def _check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    if len(shape) != 2 or min(int(s) for s in shape) < 1:
        raise InputError(f"mask shape must be (H, W) with positive ints, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_acceleration(acceleration: float) -> float:
    if not acceleration > MIN_ACCELERATION:  # also rejects NaN
        raise InputError(f"acceleration must be > {MIN_ACCELERATION:g}, got {acceleration}")
    return float(acceleration)


def mask_acceleration(mask: torch.Tensor) -> float:
    """Actual acceleration of a mask: number of k-space points / number sampled (inf for an empty mask)."""
    sampled = float((mask != 0).sum())
    return float("inf") if sampled == 0 else mask.numel() / sampled


def gaussian_mask_1d(
    shape: Sequence[int],
    acceleration: float = 8,
    center_fraction: float = 0.08,
    seed: Optional[int] = 0,
    sigma_fraction: float = 0.25,
    device: Device = None,
) -> torch.Tensor:
    """Variable-density line mask (H, W) float32: whole phase-encode rows, Gaussian density around ky = 0.

    round(H / acceleration) rows are kept (so the acceleration is exact up to rounding): the central
    round(H * center_fraction) rows (at least 1) are always sampled, the rest drawn without replacement with
    probability ~ exp(-ky^2 / (2 (sigma_fraction * H)^2)). If the centre alone exceeds the budget it is
    shrunk to the budget. Same seed, same mask.

    Args:
        shape: (H, W) of one slice's k-space; rows (H) are phase-encode lines.
        acceleration: R > 1; about H / R rows are kept.
        center_fraction: share of H, in [0, 1], always sampled around ky = 0.
        seed: numpy seed of the line draw (None: fresh entropy, not reproducible).
        sigma_fraction: standard deviation of the Gaussian density as a share of H.
        device: device of the returned mask.

    Returns:
        A {0, 1} float32 mask (H, W) (every column of a kept row is 1).

    Raises:
        InputError: a shape that is not two positive ints, R <= 1, or center_fraction outside [0, 1].
    """
    ny, nx = _check_shape(shape)
    accel = _check_acceleration(acceleration)
    if not 0 <= center_fraction <= 1:
        raise InputError(f"center_fraction must be in [0, 1], got {center_fraction}")
    n_lines = max(1, int(round(ny / accel)))
    n_center = min(n_lines, max(1, int(round(ny * center_fraction))))
    center = ny // 2  # DC row of a centred FFT
    start = center - n_center // 2
    picked = np.zeros(ny, dtype=bool)
    picked[start : start + n_center] = True
    n_rest = n_lines - n_center
    if n_rest > 0:
        ky = np.arange(ny) - center
        density = np.exp(-0.5 * (ky / (sigma_fraction * ny)) ** 2)
        density[picked] = 0.0
        rng = np.random.default_rng(seed)
        choice = rng.choice(ny, size=n_rest, replace=False, p=density / density.sum())
        picked[choice] = True
    mask = np.repeat(picked[:, None], nx, axis=1).astype(np.float32)
    return torch.from_numpy(mask).to(device)


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float = 8,
    calib: Optional[Sequence[int]] = None,
    seed: Optional[int] = 0,
    device: Device = None,
) -> torch.Tensor:
    """Variable-density 2D Poisson-disc mask (H, W) float32 with a fully sampled calib x calib centre.

    Uses sigpy's Poisson-disc sampler (install the optional "mri" extra: `pip install sigpy`). `calib` defaults to 8 % of
    each dim (at least 4). The density slope is searched (bounded) for the acceleration closest to the target;
    same seed, same mask.

    Args:
        shape: (H, W) of one slice's k-space.
        acceleration: target R > 1.
        calib: (rows, columns) of the fully sampled centre; None: 8 % of each dim, at least 4.
        seed: sampler seed (None: not reproducible).
        device: device of the returned mask.

    Returns:
        A {0, 1} float32 mask (H, W).

    Raises:
        InputError: a shape that is not two positive ints, R <= 1, or a calibration region that does not fit.
        ImportError: sigpy is not installed.
    """
    ny, nx = _check_shape(shape)
    accel = _check_acceleration(acceleration)
    if calib is None:
        calib = (max(4, round(0.08 * ny)), max(4, round(0.08 * nx)))
    calib = (int(calib[0]), int(calib[1]))
    if not (0 <= calib[0] <= ny and 0 <= calib[1] <= nx) or calib[0] * calib[1] * accel > ny * nx:
        raise InputError(f"calibration region {calib} does not fit a {ny}x{nx} mask at acceleration {accel}")
    try:
        import sigpy.mri  # noqa: F401  (lazy: optional dependency, slow to import (numba))
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "poisson_disc_mask needs the 'sigpy' package (pip install sigpy, or the meddiffusion[mri] extra)"
        ) from exc
    mask = _bounded_poisson(ny, nx, accel, calib, seed)
    return torch.from_numpy(np.ascontiguousarray(mask != 0).astype(np.float32)).to(device)


def _bounded_poisson(ny: int, nx: int, accel: float, calib: tuple[int, int], seed: Optional[int],
                     iterations: int = 40) -> np.ndarray:
    """Variable-density Poisson-disc mask closest to `accel`, from sigpy's compiled Bridson sampler.

    `sigpy.mri.poisson` bisects the density slope until the acceleration is within 0.1 of the target; on small
    grids the reachable accelerations jump over that window (e.g. 5.89 <-> 6.17 for R=6 on 32x32) and its float
    bisection never ends. Here the search is bounded and keeps the closest mask.
    """
    from sigpy.mri.samp import _poisson

    # Sampling radius grows with the normalised distance from the fully sampled centre.
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    dx = np.maximum(np.abs(x - nx / 2) - calib[1] / 2, 0)
    dy = np.maximum(np.abs(y - ny / 2) - calib[0] / 2, 0)
    r = np.sqrt((dx / max(dx.max(), 1e-9)) ** 2 + (dy / max(dy.max(), 1e-9)) ** 2)
    state = np.random.get_state()  # the sampler seeds numpy's global RNG; leave the caller's stream alone
    try:
        lo, hi = 0.0, float(max(ny, nx))
        best: Optional[np.ndarray] = None
        best_err = np.inf
        for _ in range(iterations):
            slope = (lo + hi) / 2
            scale = 1 + r * slope
            mask = _poisson(nx, ny, 30, np.clip(scale * nx / max(nx, ny), 1, None),
                            np.clip(scale * ny / max(nx, ny), 1, None), calib, seed) * (r < 1)
            achieved = ny * nx / max(mask.sum(), 1)
            if abs(achieved - accel) < best_err:
                best, best_err = mask, abs(achieved - accel)
            if best_err < 0.05 or hi - lo < 1e-6:
                break
            lo, hi = (slope, hi) if achieved < accel else (lo, slope)
    finally:
        np.random.set_state(state)
    if best is None or best_err > 0.1 * accel:
        raise InputError(f"cannot make a {ny}x{nx} Poisson-disc mask at acceleration {accel} "
                         f"(closest {accel + best_err:.2f} or {accel - best_err:.2f})")
    return best


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != tuple(like.shape[-2:]):
        raise InputError(f"mask shape {tuple(mask.shape)} does not match k-space/image {tuple(like.shape)}")
    real = like.real.dtype if like.is_complex() else (like.dtype if like.is_floating_point() else torch.float32)
    return mask.to(device=like.device, dtype=real)


def _to_output(img: torch.Tensor, output: str) -> torch.Tensor:
    if output == "complex":
        return img
    if output == "real":
        return img.real
    if output == "magnitude":
        return img.abs()
    raise InputError(f"unknown output {output!r}; choose one of {', '.join(_OUTPUTS)}")


def undersample(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Measured k-space of an image (..., H, W): fft2c(image) * mask (complex; zeros where not sampled).

    Raises:
        InputError: a mask whose last two dims are not the image's (H, W).
    """
    return fft2c(image) * _as_mask(mask, image)


def zero_filled(kspace: torch.Tensor, mask: torch.Tensor, output: str = "real") -> torch.Tensor:
    """Zero-filled reconstruction ifft2c(kspace * mask).

    output="real" (default) keeps the real part: the images here are real-valued, the real part is linear in
    the data and reproduces a real image exactly when the mask is full (magnitude would fold negative
    intensities of [-1, 1] normalised images). "magnitude" (clinical display) and "complex" are available.

    Args:
        kspace: centred k-space (..., H, W).
        mask: (H, W) or broadcastable (..., H, W).
        output: 'real', 'magnitude' or 'complex'.

    Raises:
        InputError: a mask of another (H, W), or an unknown output.
    """
    return _to_output(ifft2c(kspace * _as_mask(mask, kspace)), output)


def data_consistency(
    x: torch.Tensor,
    kspace: torch.Tensor,
    mask: torch.Tensor,
    lam: Optional[float] = None,
    output: str = "complex",
) -> torch.Tensor:
    """Enforce the measurements on an image estimate x (..., H, W); differentiable in x.

    In k-space, unsampled points keep fft2c(x); sampled points become the measurement (lam=None: hard
    projection, idempotent) or the noise-weighted mix (k + lam * y) / (1 + lam) (lam >= 0; lam -> inf is the
    hard projection, lam = 0 leaves x unchanged). output="complex" (default) is the exact projection; "real"
    or "magnitude" convert the result for real-valued pipelines (the measured samples then hold only up to
    the part of k-space a real image can represent).

    Args:
        x: image estimate (..., H, W), real or complex.
        kspace: measured centred k-space (..., H, W) (zeros where not sampled).
        mask: the sampling mask, (H, W) or broadcastable.
        lam: None (hard) or >= 0 (soft; larger trusts the measurements more).
        output: 'complex', 'real' or 'magnitude'.

    Raises:
        InputError: lam < 0 or NaN, mismatched sizes, or an unknown output.
    """
    if lam is not None and not lam >= 0:
        raise InputError(f"lam must be >= 0 (or None for hard data consistency), got {lam}")
    m = _as_mask(mask, kspace)
    k = fft2c(x)
    if tuple(k.shape[-2:]) != tuple(kspace.shape[-2:]):
        raise InputError(f"image {tuple(x.shape)} and k-space {tuple(kspace.shape)} sizes differ")
    measured = kspace.to(k.dtype)
    target = measured if lam is None else (k + lam * measured) / (1.0 + lam)
    k_dc = k + m * (target - k)  # m in {0, 1}: keeps k off the mask, the target on it
    return _to_output(ifft2c(k_dc), output)

