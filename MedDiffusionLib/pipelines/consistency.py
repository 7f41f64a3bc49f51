"""Measurement models of the reconstruction tasks and data-consistency guidance for latent sampling.

Physics domain: the operators act on volumes ``u`` in network order (Z, X, Y) with intensities in [0, 1]
(``u = (x + 1) / 2`` of the networks' [-1, 1] volumes), so air / background is 0 as in a real acquisition and
the zero padding of the model grid is physically empty space. Axial slices (the last two dims) are measured
independently: parallel-beam CT with ``views`` angles evenly over 180 degrees, or Cartesian MRI with one
undersampling mask shared by every slice's (kx, ky) plane.

Data consistency (``project``) moves an estimate towards the measurements y:
  * CT: one FBP-correction step u + FBP(y - A u) (kept per slice only where it lowers the residual), then a
    few CGLS iterations on min ||A u - y||^2 (per slice). Both only add components in the range of A^T, so
    what the prior filled in the null space of the sparse-view operator is kept; each CGLS iteration lowers
    the residual, and few iterations act as regularisation against noise.
  * MRI: k-space replacement: sampled k-space points become the measurements, the rest keeps the estimate's
    k-space (``physics.mri.data_consistency``), alternated with taking the real part (images are real-valued).
``weight`` in [0, 1] blends estimate and projection; the residual is convex in u, so any weight still lowers it.

Guidance during sampling (``LatentDataConsistency``, the ``guide`` hook of ``sample_latent``): every
``every`` steps the sampler's clean-latent estimate z0 is decoded to an image, projected as above, and the change
is carried back to the latent as ``dz0 = E(img_dc) - E(img)`` (two patch-wise encodes, so the autoencoder's
round-trip error cancels and an already consistent estimate is left unchanged). The sample at the next timestep
t' is then re-noised with the sampler's own formula, ``x_t' += sqrt(alpha_bar_t') dz0``: this is exactly what
DDIM / DPM-Solver (first order) would have produced from the corrected z0 with the same noise, and the shift of
the marginal mean q(x_t' | z0) for the other samplers. At the last step (t' = -1) it replaces the output latent.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion
from ..errors import InputError
from ..options import MASKS, TASKS  # task -> modality of the anatomies it fits; k-space masks
from ..physics.ct import ParallelBeamProjector, add_poisson_noise
from ..options import MIN_ACCELERATION
from ..physics.mri import data_consistency, fft2c, gaussian_mask_1d, poisson_disc_mask, undersample, zero_filled
from .common import denormalize_latent, normalize_latent
from .decode import decode_latent

__all__ = ["TASKS", "MASKS", "SparseViewCT", "AcceleratedMRI", "make_mask", "make_operator",
           "LatentDataConsistency", "to_physics", "to_network"]

_EPS = 1e-12


def to_physics(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] network intensities -> [0, 1] physics intensities (background 0)."""
    return (x + 1.0) * 0.5


def to_network(u: torch.Tensor) -> torch.Tensor:
    return u * 2.0 - 1.0


def _slice_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice inner product over the last two dims, kept for broadcasting."""
    return (a * b).sum(dim=(-2, -1), keepdim=True)


@functools.lru_cache(maxsize=8)
def _projector(h: int, w: int, views: int) -> ParallelBeamProjector:
    # Building the sparse matrices takes ~1 s at 256^2; repeated runs (and training batches drawing from a few
    # view counts) reuse them. Each holds ~2 x 8 bytes x 0.9 views H W non-zeros per device it was used on.
    return ParallelBeamProjector((h, w), views)


@dataclass
class SparseViewCT:
    """Parallel-beam CT of every axial slice with ``views`` angles over [0, pi); optional Poisson noise."""

    slice_shape: tuple[int, int]
    views: int
    photons: Optional[float] = None
    pixel_mm: float = 1.0
    iters: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.views, int) or isinstance(self.views, bool) or self.views < 1:
            raise InputError(f"views must be a whole number >= 1, got {self.views!r}")
        if self.photons is not None and not (self.photons > 0 and math.isfinite(self.photons)):
            raise InputError(f"noise photons must be a positive number, got {self.photons}")
        self.projector = _projector(int(self.slice_shape[0]), int(self.slice_shape[1]), int(self.views))

    def measure(self, u: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sinograms (Z, views, detectors) of u; Poisson noise when ``photons`` is set."""
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
        """FBP-correction step, then CGLS on ||A u - y||^2, per slice (see the module docstring)."""
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
    """Cartesian undersampling of every axial slice's k-space with one (X, Y) mask."""

    mask: torch.Tensor
    iters: int = 8

    def measure(self, u: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return undersample(u, self.mask.to(u.device))

    def degrade(self, k: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction (real part)."""
        return zero_filled(k, self.mask.to(k.device), output="real")

    def residual(self, u: torch.Tensor, k: torch.Tensor) -> float:
        m = self.mask.to(u.device)
        return float(((fft2c(u) * m - k).abs().norm()) / k.abs().norm().clamp_min(_EPS))

    def project(self, u: torch.Tensor, k: torch.Tensor, weight: float = 1.0, iters: Optional[int] = None
                ) -> torch.Tensor:
        # Alternating projections onto "matches the samples" and "is real" (POCS): one replacement alone keeps
        # only the Hermitian part of the samples once the imaginary part is dropped.
        m = self.mask.to(u.device)
        x = u
        for _ in range(max(1, self.iters if iters is None else int(iters))):
            x = data_consistency(x, k, m, output="real")
        return u + float(weight) * (x - u)


def make_mask(kind: str, shape: Sequence[int], acceleration: float, seed: int) -> torch.Tensor:
    """An (X, Y) undersampling mask: 'gaussian' (1D variable-density lines) or 'poisson' (2D Poisson disc)."""
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
                  iters: int = 8) -> "SparseViewCT | AcceleratedMRI":
    """The measurement model of ``task`` for axial slices of ``slice_shape`` (X, Y)."""
    if task not in TASKS:
        raise InputError(f"unknown reconstruction task '{task}'; choose one of {', '.join(TASKS)}")
    shape = (int(slice_shape[0]), int(slice_shape[1]))
    if task == "sparse-ct":
        return SparseViewCT(shape, views, photons, pixel_mm, iters)
    return AcceleratedMRI(make_mask(mask, shape, acceleration, seed), iters)


class LatentDataConsistency:
    """``guide(x_next, z0, t) -> x_next`` for ``sample_latent``: decode, project, encode the change, re-noise."""

    def __init__(self, autoencoder: torch.nn.Module, latent_range: tuple[float, float], encode_patch: int,
                 operator: "SparseViewCT | AcceleratedMRI", measurements: torch.Tensor, diffusion: GaussianDiffusion,
                 timesteps: Sequence[int], every: int = 1, weight: float = 1.0,
                 decode_budget_gb: Optional[float] = None, device: Optional[torch.device] = None,
                 on_apply: Optional[Callable[[int], None]] = None) -> None:
        self.ae, self.latent_range, self.patch = autoencoder, latent_range, int(encode_patch)
        self.operator, self.y, self.diffusion = operator, measurements, diffusion
        ts = [int(t) for t in timesteps]
        self.next_t = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}
        self.index = {t: i for i, t in enumerate(ts)}
        self.every, self.weight = max(1, int(every)), float(weight)
        self.budget, self.device = decode_budget_gb, device
        self.on_apply = on_apply
        self.applied = 0

    def _encode(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_latent(self.ae.encode(img, self.patch), self.latent_range)

    def __call__(self, x_next: torch.Tensor, z0: torch.Tensor, t: int) -> torch.Tensor:
        i, t_next = self.index[int(t)], self.next_t[int(t)]
        # The last step's output is decoded and projected in image space by the pipeline anyway.
        if t_next < 0 or (i + 1) % self.every:
            return x_next
        dev = self.device or z0.device
        z_q, _ = self.ae.quantize(denormalize_latent(z0, self.latent_range))
        img = decode_latent(self.ae, z_q, self.budget, dev).to(dev).clamp(-1.0, 1.0)  # (1, 1, Z, X, Y)
        u = to_physics(img[0, 0])
        u_dc = self.operator.project(u, self.y, self.weight).clamp(0.0, 1.0)
        img_dc = to_network(u_dc)[None, None]
        dz0 = self._encode(img_dc) - self._encode(img)
        z0_new = (z0 + dz0).clamp(-1.0, 1.0)
        self.applied += 1
        if self.on_apply is not None:
            self.on_apply(int(t))
        return x_next + math.sqrt(self.diffusion.alpha_bar(t_next)) * (z0_new - z0)
