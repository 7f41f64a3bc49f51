"""Measurement operators of the reconstruction tasks, slice by slice: parallel-beam CT and Cartesian MRI.

Physics domain: the operators act on volumes ``u`` whose last two dims are axial slices and whose intensities are
linear in the physical quantity with empty space at 0 (CT: attenuation relative to water, HU / 1000 + 1; MR: the
image scaled so that the bright tissue is ~1; ``pipelines.reconstruct`` maps scans to and from this scale).
Slices are measured independently: parallel-beam CT with ``views`` angles evenly over 180 degrees, or Cartesian MRI
with one undersampling mask shared by every slice's (kx, ky) plane. So a 3D problem decouples per slice except for
a 3D regulariser, and every solver in ``physics.solvers`` keeps per-slice step sizes.

Each operator offers ``forward`` (A, noise-free), ``adjoint`` (A^T, real images), ``measure`` (A plus the simulated
noise), ``degrade`` (the conventional reconstruction: FBP / zero-filled) and ``project`` (a quick move towards the
measurements, used by the latent guidance during sampling):
  * CT: one FBP-correction step u + FBP(y - A u) (kept per slice only where it lowers the residual), then a
    few CGLS iterations on min ||A u - y||^2 (per slice). Both only add components in the range of A^T, so
    what the prior filled in the null space of the sparse-view operator is kept.
  * MRI: k-space replacement alternated with taking the real part (images are real-valued).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import InputError
from ..options import MASKS, MIN_ACCELERATION, TASKS  # task -> modality of its anatomies; k-space masks
from .ct import ParallelBeamProjector, add_poisson_noise, ramp_filter
from .mri import data_consistency, fft2c, gaussian_mask_1d, ifft2c, poisson_disc_mask, undersample, zero_filled

__all__ = ["TASKS", "MASKS", "SparseViewCT", "AcceleratedMRI", "Operator", "make_mask", "make_operator",
           "to_physics", "to_network"]

_EPS = 1e-12


def to_physics(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] network intensities -> [0, 1] physics intensities (background 0)."""
    return (x + 1.0) * 0.5


def to_network(u: torch.Tensor) -> torch.Tensor:
    """Physics units [0, 1] -> the networks' [-1, 1]."""
    return u * 2.0 - 1.0


def _slice_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice inner product over the last two dims, kept for broadcasting."""
    return (a * b).sum(dim=(-2, -1), keepdim=True)


@functools.lru_cache(maxsize=8)
def _projector(h: int, w: int, views: int) -> ParallelBeamProjector:
    # Building the sparse matrices takes ~1 s at 256^2; repeated runs (and training batches drawing from a few
    # view counts) reuse them. Each holds ~2 x 8 bytes x 0.9 views H W non-zeros per device it was used on.
    return ParallelBeamProjector((h, w), views)


@functools.lru_cache(maxsize=8)
def _sqrt_ramp_cpu(n_det: int) -> tuple[torch.Tensor, int]:
    resp, size = ramp_filter(n_det, "ram-lak", dtype=torch.float64)
    half = resp[: size // 2 + 1]
    floor = float(half[1]) if half.numel() > 1 else 1.0
    return half.clamp_min(floor).sqrt(), size


def _sqrt_ramp(n_det: int, device: torch.device) -> tuple[torch.Tensor, int]:
    resp, size = _sqrt_ramp_cpu(n_det)
    return resp.to(device), size


@dataclass
class SparseViewCT:
    """Parallel-beam CT of every axial slice with ``views`` angles over [0, pi); optional Poisson noise.

    Attributes:
        slice_shape: (X, Y) pixels of one axial slice (the last two dims of every volume passed in).
        views: number of angles, a whole number >= 1.
        photons: incident photons per ray for `measure`'s Poisson noise, > 0; None: noise-free.
        pixel_mm: in-plane pixel size in mm (sets the attenuation along a ray in the noise model).
        iters: CGLS iterations of `project` when a call gives none.

    Raises:
        InputError: views not a whole number >= 1, or photons not a finite positive number.
    """

    slice_shape: tuple[int, int]
    views: int
    photons: Optional[float] = None
    pixel_mm: float = 1.0
    iters: int = 8
    # ||R^(1/2) A||^2, computed once by solvers.operator_norm_sq (power iteration) and kept here
    whitened_norm_sq: Optional[float] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.views, int) or isinstance(self.views, bool) or self.views < 1:
            raise InputError(f"views must be a whole number >= 1, got {self.views!r}")
        if self.photons is not None and not (self.photons > 0 and math.isfinite(self.photons)):
            raise InputError(f"noise photons must be a positive number, got {self.photons}")
        self.projector = _projector(int(self.slice_shape[0]), int(self.slice_shape[1]), int(self.views))

    @property
    def kind(self) -> str:
        """The task name of this operator ("sparse-ct")."""
        return "sparse-ct"

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """A u: sinograms (..., views, detectors) of the slices of u, noise-free."""
        return self.projector(u)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y: the exact adjoint (unfiltered backprojection)."""
        return self.projector.adjoint(y)

    def weight_sqrt(self, y: torch.Tensor) -> torch.Tensor:
        """R^(1/2) y: the square root of the ramp filter along the detectors (symmetric, positive definite).

        Solvers fit ||R^(1/2) (A x - y)||^2 instead of ||A x - y||^2: A^T R A is close to a multiple of the
        identity (that is why FBP works), so CG and PDHG converge in tens of iterations instead of thousands; for
        consistent data both have the same minimiser. The response is floored at its first non-zero frequency so
        that the projections' totals (the DC term) still count."""
        resp, size = _sqrt_ramp(self.projector.n_detectors, y.device)
        work = y if y.dtype in (torch.float32, torch.float64) else y.float()
        spec = torch.fft.rfft(work, n=size, dim=-1) * resp.to(work.dtype)
        return torch.fft.irfft(spec, n=size, dim=-1)[..., : self.projector.n_detectors].to(y.dtype)

    def measure(self, u: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sinograms (Z, views, detectors) of u; Poisson noise when ``photons`` is set.

        Args:
            u: (Z, X, Y) physics units.
            generator: torch generator on u's device for reproducible noise (None: the global one).
        """
        y = self.projector(u)
        if self.photons is not None:
            # Beer-Lambert with u = 1 read as water (0.02 / mm) over pixels of pixel_mm.
            y = add_poisson_noise(y, self.photons, mu_scale=0.02 * self.pixel_mm, generator=generator)
        return y

    def degrade(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered backprojection: the conventional sparse-view reconstruction."""
        return self.projector.fbp(y)

    def residual(self, u: torch.Tensor, y: torch.Tensor) -> float:
        """Relative measurement residual ||A u - y|| / ||y||."""
        return float((self.projector(u) - y).norm() / y.norm().clamp_min(_EPS))

    def project(self, u: torch.Tensor, y: torch.Tensor, weight: float = 1.0, iters: Optional[int] = None
                ) -> torch.Tensor:
        """FBP-correction step, then CGLS on ||A u - y||^2, per slice (see the module docstring).

        Args:
            u: current estimate (..., X, Y), physics units.
            y: measured sinograms (..., views, detectors).
            weight: share of the move to take: 0 returns u, 1 the full CGLS result.
            iters: CGLS iterations (None: ``self.iters``).
        """
        a = self.projector
        r = y - a(u)
        # x + FBP(y - A x): FBP nearly inverts A on its range (A FBP y ~ y within ~1 % at 30 views), so this one
        # step removes most of the residual; it is kept only for slices where it does lower the residual.
        x = u + a.fbp(r)
        r_fbp = y - a(x)
        better = _slice_dot(r_fbp, r_fbp) < _slice_dot(r, r)
        x, r = torch.where(better, x, u), torch.where(better, r_fbp, r)
        s = a.adjoint(r)
        p = s.clone()
        gamma = _slice_dot(s, s)
        for _ in range(self.iters if iters is None else int(iters)):
            q = a(p)
            alpha = gamma / _slice_dot(q, q).clamp_min(_EPS)
            x = x + alpha * p
            r = r - alpha * q
            s = a.adjoint(r)
            gamma_new = _slice_dot(s, s)
            p = s + (gamma_new / gamma.clamp_min(_EPS)) * p
            gamma = gamma_new
        return u + float(weight) * (x - u)


@dataclass
class AcceleratedMRI:
    """Cartesian undersampling of every axial slice's k-space with one (X, Y) mask.

    Attributes:
        mask: {0, 1} float mask (X, Y) of the centred k-space (see `make_mask`), shared by every slice.
        iters: alternating-projection rounds of `project` when a call gives none.
    """

    mask: torch.Tensor
    iters: int = 8

    @property
    def kind(self) -> str:
        """The task name of this operator ("mri")."""
        return "mri"

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """A u = M F u: the sampled k-space of every slice (complex; zeros off the mask)."""
        return undersample(u, self.mask.to(u.device))

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """A^T k for real images: Re(F^H M k) (the adjoint of A restricted to real-valued u)."""
        return ifft2c(k * self.mask.to(k.device)).real

    def weight_sqrt(self, k: torch.Tensor) -> torch.Tensor:
        """Identity: A^T A is already a projection (orthonormal FFT times a 0/1 mask)."""
        return k

    def measure(self, u: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The undersampled k-space of every slice (MRI measurements are noise-free here)."""
        return undersample(u, self.mask.to(u.device))

    def degrade(self, k: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction (real part)."""
        return zero_filled(k, self.mask.to(k.device), output="real")

    def residual(self, u: torch.Tensor, k: torch.Tensor) -> float:
        """Relative residual ||M F u - k|| / ||k|| of an estimate against the measured k-space."""
        m = self.mask.to(u.device)
        return float(((fft2c(u) * m - k).abs().norm()) / k.abs().norm().clamp_min(_EPS))

    def project(self, u: torch.Tensor, k: torch.Tensor, weight: float = 1.0, iters: Optional[int] = None
                ) -> torch.Tensor:
        """Move ``u`` towards agreeing with the measured samples (alternating projections, real-valued output).

        Args:
            u: current estimate (..., X, Y), physics units, real.
            k: measured centred k-space (..., X, Y), complex.
            weight: share of the move to take: 0 returns u, 1 the full projection.
            iters: projection rounds, at least 1 (None: ``self.iters``).
        """
        # Alternating projections onto "matches the samples" and "is real" (POCS): one replacement alone keeps
        # only the Hermitian part of the samples once the imaginary part is dropped.
        m = self.mask.to(u.device)
        x = u
        for _ in range(max(1, self.iters if iters is None else int(iters))):
            x = data_consistency(x, k, m, output="real")
        return u + float(weight) * (x - u)


Operator = Union[SparseViewCT, AcceleratedMRI]


def make_mask(kind: str, shape: Sequence[int], acceleration: float, seed: int) -> torch.Tensor:
    """An (X, Y) undersampling mask: 'gaussian' (1D variable-density lines) or 'poisson' (2D Poisson disc).

    Args:
        kind: one of `MASKS`.
        shape: (X, Y) of one slice's k-space; gaussian masks keep whole rows along X.
        acceleration: R > 1, finite.
        seed: any int (taken modulo 2^32 - 1, the range sigpy's numpy RNG accepts); same seed, same mask.

    Returns:
        A {0, 1} float32 mask (X, Y) on the CPU.

    Raises:
        InputError: an unknown kind, or an acceleration that is not a finite number > 1.
    """
    if kind not in MASKS:
        raise InputError(f"unknown mask '{kind}'; choose one of {', '.join(MASKS)}")
    try:
        accel = float(acceleration)
    except (TypeError, ValueError):
        raise InputError(f"acceleration must be a number > {MIN_ACCELERATION:g}, got {acceleration!r}") from None
    if not accel > MIN_ACCELERATION or not math.isfinite(accel):
        raise InputError(f"acceleration must be a number > {MIN_ACCELERATION:g}, got {acceleration}")
    mask_seed = int(seed) % (2**32 - 1)  # sigpy seeds numpy's legacy RNG (< 2^32)
    if kind == "gaussian":
        return gaussian_mask_1d(tuple(shape), accel, seed=mask_seed)
    return poisson_disc_mask(tuple(shape), accel, seed=mask_seed)


def make_operator(task: str, slice_shape: Sequence[int], *, views: int = 30, acceleration: float = 8,
                  mask: str = "gaussian", seed: int = 0, photons: Optional[float] = None, pixel_mm: float = 1.0,
                  iters: int = 8) -> Operator:
    """The measurement model of ``task`` for axial slices of ``slice_shape`` (X, Y).

    Args:
        task: 'sparse-ct' or 'mri' (the keys of `TASKS`).
        slice_shape: (X, Y) pixels of one axial slice.
        views: sparse-ct projection angles over [0, pi).
        acceleration: mri undersampling factor R > 1.
        mask: mri mask kind (see `make_mask`).
        seed: mri mask seed.
        photons: sparse-ct Poisson noise with this many incident photons per ray (None: noise-free).
        pixel_mm: sparse-ct pixel size in mm, which sets the attenuation along a ray in the Poisson noise model.
        iters: iterations of the operator's own ``project`` (data-consistency step) when none are given there.

    Returns:
        A `SparseViewCT` or an `AcceleratedMRI`.

    Raises:
        InputError: an unknown task, or settings the operator or `make_mask` refuses.
    """
    if task not in TASKS:
        raise InputError(f"unknown reconstruction task '{task}'; choose one of {', '.join(TASKS)}")
    shape = (int(slice_shape[0]), int(slice_shape[1]))
    if task == "sparse-ct":
        return SparseViewCT(shape, views, photons, pixel_mm, iters)
    return AcceleratedMRI(make_mask(mask, shape, acceleration, seed), iters)
