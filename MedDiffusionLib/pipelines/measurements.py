"""The reconstruction problem on the scan's own grid, and the model-free methods that solve it.

``prepare_problem`` takes a scan at its native resolution, converts it to physics units (``native.IntensityScale``)
and either simulates the acquisition from it (CT sinograms of every axial slice, MRI k-space) or, for an input that
already is a conventional reconstruction, derives what it can: for CT the input's own projections at the ``views``
angles stand in for the sinogram (an FBP of evenly spaced views reprojects to within ~1 % of its sinogram at 30
views); for MRI the sampling mask of the acquisition is unknown, so there are no measurements to be consistent with.
``solve_model_free`` runs FBP / zero-filling, SART or TV on those measurements; the diffusion method
(``pipelines.reconstruct``) uses the same problem for its data consistency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..data.transforms import image_to_network
from ..errors import InputError
from ..physics.operators import TASKS, Operator, SparseViewCT, make_operator
from ..physics.solvers import cg_regularised, os_sart, tv_pdhg
from . import recon_settings as rules
from .native import IntensityScale

__all__ = ["NativeProblem", "prepare_problem", "solve_model_free", "solve_tv", "to_image"]


@dataclass
class NativeProblem:
    """A reconstruction problem on the scan's own grid: operator, measurements, degraded input and intensity scale."""
    task: str
    modality: str
    scale: IntensityScale
    op: Operator
    spacing_zxy: tuple[float, float, float]
    given: torch.Tensor                     # the input in physics units, (Z, X, Y) network order
    measurements: Optional[torch.Tensor]    # None: nothing to be consistent with (already-degraded MRI)
    degraded: torch.Tensor                  # FBP / zero-filled (the input itself when not simulated)
    simulated: bool
    views: int
    acceleration: float
    photons: Optional[float]

    @property
    def z_weight(self) -> float:
        """Through-plane difference weight of the 3D TV: in-plane / slice spacing (a gradient per millimetre)."""
        return float(min(self.spacing_zxy[1], self.spacing_zxy[2]) / self.spacing_zxy[0])

    def residual(self, u: torch.Tensor) -> Optional[float]:
        """Relative measurement residual ||A u - y|| / ||y||."""
        if self.measurements is None:
            return None
        return self.op.residual(u, self.measurements)


def prepare_problem(image: sitk.Image, task: str, *, views: int = 30, acceleration: float = 8,
                    mask: str = "gaussian", simulate: bool = True, noise_photons: Optional[float] = None,
                    seed: int = 0, device: torch.device | str = "cpu") -> NativeProblem:
    """Measurements of ``image`` on its own grid (see the module docstring); ``image`` must be validated.

    Args:
        image: a scan accepted by `reconstruct.validate_image` (CT in HU).
        task: 'sparse-ct' or 'mri'.
        views: sparse-ct: angles over [0, 180) degrees (also used, when not simulating, to re-project the input).
        acceleration: mri: undersampling factor R > 1.
        mask: mri: 'gaussian' or 'poisson'.
        simulate: True: measure the scan; False: the scan is already the degraded reconstruction.
        noise_photons: sparse-ct, simulate only: incident photons per ray (None: noise-free).
        seed: seeds the MRI mask and (as seed + 1) the measurement noise.
        device: where the operator and volumes live.

    Returns:
        The problem with the input in physics units as (Z, X, Y); measurements are None for an already-degraded
        MRI input (its mask is unknown).

    Raises:
        InputError: an unknown task, or operator settings the physics refuses (see `make_operator`).
    """
    if task not in TASKS:
        raise InputError(f"unknown reconstruction task '{task}'; choose one of {', '.join(TASKS)}")
    modality = TASKS[task]
    arr = image_to_network(image)  # (Z, X, Y) float32
    scale = IntensityScale.for_scan(arr, modality)
    given = scale.to_physics(torch.from_numpy(arr).to(device))
    sx, sy, sz = image.GetSpacing()
    op = make_operator(task, given.shape[-2:], views=views, acceleration=acceleration, mask=mask, seed=seed,
                       photons=noise_photons if simulate else None, pixel_mm=float(min(sx, sy)))
    y: Optional[torch.Tensor]
    if simulate:
        gen = torch.Generator(device=given.device).manual_seed(int(seed) + 1)
        y = op.measure(given, gen)
        degraded = op.degrade(y)
    else:
        degraded = given
        y = op.forward(given) if task == "sparse-ct" else None
    return NativeProblem(task, modality, scale, op, (float(sz), float(sx), float(sy)), given, y, degraded,
                         bool(simulate), int(views), float(acceleration),
                         float(noise_photons) if noise_photons is not None and simulate else None)


def solve_model_free(problem: NativeProblem, method: str, tv_weight: Optional[float] = None,
                     step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """FBP / zero-filled, SART or TV on the problem's measurements -> (Z, X, Y) physics units.

    Args:
        problem: from `prepare_problem`.
        method: 'fbp' (sparse-ct) / 'zero-filled' (mri) return the degraded input; 'sart' or 'tv'.
        tv_weight: tv only; None: `recon_settings.tv_weight` for the problem.
        step: called with the iteration index after each solver iteration.

    Raises:
        InputError: sart or tv without measurements, sart on MRI, or another method name.
    """
    if method == rules.baseline_method(problem.task):
        return problem.degraded
    if problem.measurements is None:
        raise InputError(f"method '{method}' needs measurements; an already-degraded MRI input has no known "
                         "sampling mask (simulate from a fully sampled input, or use zero-filled / diffusion)")
    y = problem.measurements
    if method == "sart":
        if not isinstance(problem.op, SparseViewCT):
            raise InputError("method 'sart' reconstructs sparse-view CT only")
        return os_sart(problem.op, y, rules.SART_ITERS, step=step)
    if method == "tv":
        beta = rules.tv_weight(problem.task, problem.views, problem.acceleration, problem.photons) \
            if tv_weight is None else float(tv_weight)
        return solve_tv(problem, beta, problem.degraded.clamp_min(0.0), step=step)
    raise InputError(f"method '{method}' is not model-free")


def solve_tv(problem: NativeProblem, beta: float, x0: torch.Tensor, prior: Optional[torch.Tensor] = None,
             lam: float = 0.0, step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """TV-regularised least squares (``rules.TV_ITERS`` PDHG iterations from ``x0``, optionally pulled towards
    ``prior`` with weight ``lam``), then the debiasing CG of the rule in ``recon_settings`` (``DEBIAS_CG_ITERS``
    iterations anchored at the TV result); ``step`` is called once per iteration of both.

    Args:
        problem: a problem with measurements (an AssertionError otherwise).
        beta: TV weight, >= 0.
        x0: starting estimate, (Z, X, Y) physics units.
        prior: an estimate to pull towards, same shape (None: none).
        lam: weight of ``||x - prior||^2``.
        step: called with the iteration index (0 .. TV_ITERS + DEBIAS_CG_ITERS - 1).

    Returns:
        The solution (Z, X, Y) in physics units, clamped to >= 0.
    """
    assert problem.measurements is not None
    y = problem.measurements
    x_tv = tv_pdhg(problem.op, y, beta, rules.TV_ITERS, z_weight=problem.z_weight, prior=prior, lam=lam, x0=x0,
                   step=step)
    offset = rules.TV_ITERS
    x = cg_regularised(problem.op, y, x_tv, rules.debias_weight(problem.photons), rules.DEBIAS_CG_ITERS,
                       step=None if step is None else (lambda i: step(offset + i)))
    return x.clamp_min(0.0)  # empty space is 0: the same bound the TV solve keeps


def to_image(u: torch.Tensor, problem: NativeProblem, like: sitk.Image) -> sitk.Image:
    """Physics-unit (Z, X, Y) volume -> an image on ``like``'s grid in its pixel type (rounded, and clipped only
    to what the pixel type can hold)."""
    values = problem.scale.from_physics(u.detach().float().cpu()).numpy().transpose(0, 2, 1)  # -> (z, y, x)
    dtype = sitk.GetArrayViewFromImage(like).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    out = sitk.GetImageFromArray(np.ascontiguousarray(values.astype(dtype)))
    out.CopyInformation(like)
    return out
