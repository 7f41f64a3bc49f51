"""Reconstruction of sparse-view CT and accelerated MRI on the scan's own grid.

    scan (any size, spacing, orientation, pixel type) -> physics units on its own grid (``native``)
      -> measurements there (``measurements.prepare_problem``): simulated from the scan, or derived from an
         already-degraded input
      -> method fbp / zero-filled / sart / tv: model-free, on those measurements (``measurements.solve_model_free``)
      -> method diffusion: the conventional reconstruction is averaged onto the model's grid (the anatomy's
         spacing, same origin and axes, edges extended from the scan, never padded with air) and conditions the
         ControlNet-guided sampler; every few steps the decoded estimate is brought to the native grid, moved
         towards the measurements by a few CG steps of ||A x - y||^2 + lam ||x - prior||^2, and the change is
         carried back into the latent (``consistency.LatentDataConsistency``, as decomposed diffusion sampling
         does). The final decoded prior is brought to the native grid and the data-consistency problem is solved
         there (CG from the prior, then TV-regularised PDHG and a debiasing CG unless tv_weight=0),
         so the result is never further from the measurements than they allow; weights and iteration counts
         follow ``recon_settings``.
      -> back to the scan's intensity scale and pixel type, nothing clipped but what the pixel type cannot hold.

Metrics (when simulating) compare with the input on its own grid (``evaluation.native_scores``; CT on the window
[-1000, 1000] HU).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..catalog import Anatomy
from ..checkpoints.bundle import ModelBundle
from ..diffusion import make_sampler
from ..errors import CheckpointError, InputError
from ..models.controlnet import ControlNet
from ..results import ReconstructionResult
from ..options import MASKS, METHODS, TASKS, ReconstructOptions
from ..physics.solvers import cg_regularised, data_rhs
from . import recon_settings as rules
from .common import BundlePipeline, denormalize_latent, inference_mode, resolve_seed, sample_latents
from .consistency import LatentDataConsistency
from .decode import decode_latent
from .evaluation import native_scores
from .measurements import NativeProblem, prepare_problem, solve_model_free, solve_tv, to_image
from .native import GridMap
from ..progress import CancelFlag, ProgressCallback, ProgressTracker

__all__ = ["ReconstructionPipeline", "reconstruct_model_free", "validate_image",
           "TASKS", "MASKS", "METHODS", "MAX_MODEL_VOXELS"]

# The model-grid volume is held several times (condition, decoded, float32): 512^3 voxels is ~0.5 GB each.
MAX_MODEL_VOXELS = 512**3
MAX_NATIVE_VOXELS = 1024 * 1024 * 1024  # the native volume is held ~10 times in float32 by the solvers
_SPACING_RANGE = (1e-3, 1e3)  # mm; anything outside is a broken header, not a scan


def validate_image(image: object) -> None:
    """InputError unless ``image`` is a 3D scalar SimpleITK image with sane geometry and finite voxels.

    Raises:
        InputError: naming the problem: not a SimpleITK image, not 3D, more than one component per voxel, empty,
            more than `MAX_NATIVE_VOXELS` voxels, a spacing outside [0.001, 1000] mm, a singular or non-finite
            direction, a non-finite origin, or NaN / infinite voxels.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"the input must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"the input is a {image.GetDimension()}D image of size {image.GetSize()}; "
                         "reconstruction needs a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the input has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a scalar (grey-level) volume is needed")
    if min(image.GetSize()) < 1:
        raise InputError(f"the input is empty (size {image.GetSize()})")
    if math.prod(image.GetSize()) > MAX_NATIVE_VOXELS:
        raise InputError(f"the input has {'x'.join(map(str, image.GetSize()))} voxels; at most "
                         f"{MAX_NATIVE_VOXELS} are supported (crop the volume)")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and _SPACING_RANGE[0] <= s <= _SPACING_RANGE[1] for s in spacing):
        raise InputError(f"the input's voxel spacing {tuple(spacing)} mm is not sane (each must lie in "
                         f"[{_SPACING_RANGE[0]}, {_SPACING_RANGE[1]}] mm)")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError("the input's direction matrix is singular or not finite")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise InputError("the input's origin is not finite")
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError("the input contains NaN or infinite voxels")




def _finish(result: ReconstructionResult, problem: NativeProblem, u_out: torch.Tensor, image: sitk.Image,
            start: float) -> ReconstructionResult:
    result.image = to_image(u_out, problem, image)
    result.degraded = to_image(problem.degraded, problem, image) if problem.simulated else sitk.Image(image)
    result.residual = problem.residual(u_out)
    result.degraded_residual = problem.residual(problem.degraded)
    if problem.simulated:
        result.psnr, result.ssim, result.metric_range = native_scores(result.image, image, problem.modality)
        result.degraded_psnr, result.degraded_ssim, _ = native_scores(result.degraded, image, problem.modality)
    if problem.task == "sparse-ct":
        result.views = problem.views
    else:
        result.acceleration = problem.acceleration
    result.size_xyz = tuple(result.image.GetSize())
    result.spacing_xyz = tuple(result.image.GetSpacing())
    result.elapsed_s = time.perf_counter() - start
    return result


def reconstruct_model_free(image: sitk.Image, task: str = "sparse-ct", method: str = "tv", views: int = 30,
                           acceleration: float = 8, mask: str = "gaussian", simulate: bool = True,
                           noise_photons: Optional[float] = None, seed: Optional[int] = None,
                           tv_weight: Optional[float] = None, device: str | torch.device = "cpu",
                           progress: Optional[ProgressCallback] = None,
                           cancel: Optional[CancelFlag] = None) -> ReconstructionResult:
    """fbp / zero-filled / sart / tv on the scan's grid: no model needed.

    The options are checked by `ReconstructOptions.validate` (the rules every front end applies) before any work.

    Args:
        image: a 3D scalar scan (CT in HU; MRI magnitude in any units), any size, spacing, orientation and pixel
            type; its axial (X, Y) slices are measured one by one.
        task: see `ReconstructOptions`.
        method: 'fbp', 'zero-filled', 'sart' or 'tv' (see `ReconstructOptions`).
        views: see `ReconstructOptions`.
        acceleration: see `ReconstructOptions`.
        mask: see `ReconstructOptions`.
        simulate: see `ReconstructOptions`.
        noise_photons: see `ReconstructOptions`.
        seed: seeds the mask and the noise; None: random, reported.
        tv_weight: see `ReconstructOptions`.
        device: where the solvers run ('cpu', 'cuda', a torch.device).
        progress: called with `ProgressInfo` updates (one per solver iteration).
        cancel: checked after each iteration; when set the run stops with `Cancelled`.

    Returns:
        The reconstruction on the input's grid in its pixel type, the degraded input (FBP / zero-filled; the input
        itself when simulate=False), residuals, and PSNR / SSIM against the input when simulating.

    Raises:
        InputError: a refused option (`ReconstructOptions.validate`), method 'diffusion', or an image refused by
            `validate_image`.
        Cancelled: when ``cancel`` was set.
    """
    opts = ReconstructOptions(task=task, method=method, views=views, acceleration=acceleration, mask=mask,
                              simulate=simulate, noise_photons=noise_photons, seed=seed,
                              tv_weight=tv_weight).validate()
    if opts.method == "diffusion":
        raise InputError("method 'diffusion' needs a model: use ReconstructionPipeline")
    return _model_free(image, opts, device, progress, cancel)


def _model_free(image: sitk.Image, opts: ReconstructOptions, device: str | torch.device,
                progress: Optional[ProgressCallback], cancel: Optional[CancelFlag]) -> ReconstructionResult:
    start = time.perf_counter()
    task, method = opts.task, opts.method
    validate_image(image)
    seed = resolve_seed(opts.seed)
    problem = prepare_problem(image, task, views=_views(opts), acceleration=opts.acceleration, mask=opts.mask,
                              simulate=opts.simulate, noise_photons=opts.noise_photons, seed=seed, device=device)
    tracker = ProgressTracker(_iterations(method), progress, cancel, method)
    tracker.begin()
    u = solve_model_free(problem, method, opts.tv_weight, step=lambda i: tracker.advance())
    result = ReconstructionResult(image, None, task, method, problem.simulated,
                                  data_consistency=method in ("sart", "tv") and problem.measurements is not None,
                                  seed=seed, mask=opts.mask if task == "mri" else None,
                                  tv_weight=_tv(problem, opts.tv_weight) if method == "tv" else None,
                                  device=str(device))
    return _finish(result, problem, u, image, start)


def _views(opts: ReconstructOptions) -> int:
    return opts.views if opts.task == "sparse-ct" else 30  # MRI has no views; a fixed value keeps rules simple


def _iterations(method: str) -> int:
    return {"sart": rules.SART_ITERS, "tv": rules.TV_ITERS + rules.DEBIAS_CG_ITERS}.get(method, 1)


def _tv(problem: NativeProblem, tv_weight: Optional[float]) -> float:
    if tv_weight is not None:  # checked by ReconstructOptions (a finite number >= 0)
        return float(tv_weight)
    return rules.tv_weight(problem.task, problem.views, problem.acceleration, problem.photons)


class ReconstructionPipeline(BundlePipeline):
    """All methods; ``diffusion`` uses the bundle's ControlNets (``bundle.controlnets``) as the prior."""

    def __init__(self, bundle: ModelBundle, device: str | torch.device | None = "auto",
                 decode_budget_gb: Optional[float] = None) -> None:
        super().__init__(bundle, device, decode_budget_gb)
        self.controlnets = {task: net.to(self.device).eval() for task, net in bundle.controlnets.items()}
        for task, net in self.controlnets.items():
            self._check_controlnet(task, net)
        self.step = int(bundle.downsample) * self.denoiser.latent_multiple

    @property
    def tasks(self) -> list[str]:
        """The tasks this model has a ControlNet for."""
        return sorted(self.controlnets)

    def _check_controlnet(self, task: str, net: ControlNet) -> None:
        cfg = net.config
        if int(cfg.get("image_downsample", self.bundle.downsample)) != int(self.bundle.downsample):
            raise CheckpointError(f"the '{task}' ControlNet expects a {cfg.get('image_downsample')}x autoencoder, "
                                  f"the model's downsamples {self.bundle.downsample}x")
        mine, theirs = cfg.get("denoiser_config") or {}, self.denoiser.config
        diff = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if diff:
            raise CheckpointError(f"the '{task}' ControlNet was trained for another denoiser "
                                  f"(differs in {', '.join(diff)})")

    def _controlnet(self, task: str) -> ControlNet:
        if task not in self.controlnets:
            have = ", ".join(self.tasks) or "none"
            raise InputError(f"model '{self.bundle.name}' has no ControlNet for task '{task}' "
                             f"(available: {have})")
        return self.controlnets[task]

    def anatomy_for(self, task: str, anatomy: Optional[str], image: sitk.Image) -> tuple[Anatomy, str]:
        """The named anatomy (checked against the task's modality), or one chosen from the scan, with why.

        Args:
            task: 'sparse-ct' or 'mri'.
            anatomy: a catalog name; None or '' chooses one from the scan's field of view
                (`recon_settings.choose_anatomy`).
            image: the scan (its size and spacing drive the choice).

        Returns:
            (anatomy, reason): reason is 'given' for a named one, else why it was chosen.

        Raises:
            InputError: an unknown anatomy, or one of another modality than the task's.
        """
        modality = TASKS[task]
        if anatomy:
            entry = self.bundle.catalog.get(anatomy)
            if entry.modality != modality:
                raise InputError(f"anatomy '{entry.name}' is {entry.modality}; task '{task}' needs a {modality} "
                                 f"anatomy: {', '.join(a.name for a in self.bundle.catalog.by_modality(modality))}")
            return entry, "given"
        return rules.choose_anatomy(self.bundle.catalog, modality, image)

    def __call__(self, image: sitk.Image, task: str = "sparse-ct", method: str = rules.DEFAULT_METHOD,
                 anatomy: Optional[str] = None, views: int = 30, acceleration: float = 8, mask: str = "gaussian",
                 simulate: bool = True, noise_photons: Optional[float] = None, sampler: str = "dpmpp",
                 steps: Optional[int] = None, seed: Optional[int] = None, data_consistency: bool = True,
                 tv_weight: Optional[float] = None, dc_every: Optional[int] = None,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelFlag] = None) -> ReconstructionResult:
        """Reconstruct ``image`` with ``method`` (see the module docstring).

        The pipeline checks its inputs itself (diffusers style): `ReconstructOptions.validate` against this
        model, the same rules the CLI, the server and the panel apply before queuing, so every caller gets them.
        The other methods run as `reconstruct_model_free` does, on this pipeline's device.

        Args:
            image: a 3D scalar scan (CT in HU; MRI magnitude in any units), any size, spacing, orientation and
                pixel type; its axial (X, Y) slices are measured one by one.
            task: see `ReconstructOptions` (the bundle needs a ControlNet for it for 'diffusion').
            method: see `ReconstructOptions`.
            anatomy: see `ReconstructOptions`.
            views: see `ReconstructOptions`.
            acceleration: see `ReconstructOptions`.
            mask: see `ReconstructOptions`.
            simulate: see `ReconstructOptions`.
            noise_photons: see `ReconstructOptions`.
            sampler: see `ReconstructOptions`.
            steps: see `ReconstructOptions`.
            seed: seeds the mask, the noise and the sampler; None: random, reported.
            data_consistency: see `ReconstructOptions`.
            tv_weight: TV weight of the final solve (None: the rule in ``recon_settings``; 0: CG on the
                prior-regularised least squares only).
            dc_every: guidance every K sampler steps (None: about 4 per run; 0: only the final solve).
            progress: called with `ProgressInfo` updates per stage (measuring, sampling, decoding, data
                consistency).
            cancel: checked between steps; when set the run stops with `Cancelled`.

        Returns:
            The reconstruction on the input's grid in its pixel type (nothing clipped but what the type cannot
            hold), the degraded input, the anatomy used and why, residuals, and PSNR / SSIM when simulating.

        Raises:
            InputError: a refused option or image (`ReconstructOptions.validate`, `validate_image`), or a model
                grid over `MAX_MODEL_VOXELS` voxels.
            Cancelled: when ``cancel`` was set.
        """
        opts = ReconstructOptions(task=task, method=method, anatomy=anatomy, views=views, acceleration=acceleration,
                                  mask=mask, simulate=simulate, noise_photons=noise_photons, sampler=sampler,
                                  steps=steps, seed=seed, data_consistency=data_consistency, tv_weight=tv_weight,
                                  dc_every=dc_every).validate(self.bundle)
        if opts.method != "diffusion":
            return _model_free(image, opts, self.device, progress, cancel)
        start = time.perf_counter()
        task, sampler, mask, dc_every = opts.task, opts.sampler, opts.mask, opts.dc_every
        controlnet = self._controlnet(task)
        validate_image(image)
        entry, reason = self.anatomy_for(task, opts.anatomy, image)
        steps = opts.steps_or_default(self.diffusion.timesteps)  # = opts.steps: validate(bundle) filled it in
        seed = resolve_seed(opts.seed)

        tracker = ProgressTracker(1, progress, cancel, "measuring")
        tracker.begin()
        problem = prepare_problem(image, task, views=_views(opts), acceleration=opts.acceleration, mask=mask,
                                  simulate=opts.simulate, noise_photons=opts.noise_photons, seed=seed,
                                  device=self.device)
        tracker.advance()
        # The measurements to be consistent with (None: data consistency off, or nothing measured).
        measured = problem.measurements if opts.data_consistency else None
        use_dc = measured is not None
        beta = _tv(problem, opts.tv_weight)
        sx, sy, sz = entry.spacing_xyz
        nz, nx, ny = problem.given.shape
        grids = GridMap((nz, nx, ny), problem.spacing_zxy, (sz, sx, sy), self.device)
        prior_model = _PriorGrid(grids, problem.degraded, self.step, int(self.bundle.encode_patch_size))
        # A^T R y: computed once for every solve below, not per solve.
        rhs = data_rhs(problem.op, measured) if measured is not None else None
        guide: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if measured is not None:
            def correct(img: torch.Tensor) -> torch.Tensor:  # decoded model-grid image -> data-consistent, same grid
                prior = prior_model.to_native(img)
                x = cg_regularised(problem.op, measured, prior, rules.PRIOR_WEIGHT, rules.GUIDE_CG_ITERS, rhs=rhs)
                return prior_model.to_model(x)
            guide = correct

        with inference_mode():
            z, dc_count = self._sample(controlnet, entry, prior_model.condition, guide,
                                       sampler, steps, seed, dc_every, progress, cancel)
            z_q, _ = self.autoencoder.quantize(denormalize_latent(z, self.bundle.latent_range))
            vol = decode_latent(self.autoencoder, z_q, self.decode_budget_gb, self.device, progress, cancel)
            prior = prior_model.to_native(vol[0, 0].to(self.device).clamp(-1.0, 1.0))
            # CG from the prior first (fast, keeps what the prior put where the data are silent), then TV.
            cg_iters = rules.TV_WARM_CG_ITERS if beta > 0 else rules.DC_CG_ITERS
            iters = cg_iters + (rules.TV_ITERS + rules.DEBIAS_CG_ITERS if beta > 0 else 0)
            final = ProgressTracker(iters if use_dc else 1, progress, cancel,
                                    "data consistency" if use_dc else "finishing")
            final.begin()
            if measured is None:
                u_out = prior
                final.advance()
            else:
                u_out = cg_regularised(problem.op, measured, prior, rules.PRIOR_WEIGHT,
                                       cg_iters, step=lambda i: final.advance(), rhs=rhs)
                if beta > 0:
                    u_out = solve_tv(problem, beta, u_out.clamp_min(0.0), prior=prior, lam=rules.PRIOR_WEIGHT,
                                     step=lambda i: final.advance())
        padded = prior_model.padded_shape  # (Z, X, Y)
        result = ReconstructionResult(
            image, None, task, opts.method, problem.simulated, use_dc, anatomy=entry.name, anatomy_reason=reason,
            seed=seed, sampler=sampler, steps=steps, mask=mask if task == "mri" else None,
            tv_weight=beta if use_dc else None, dc_applications=dc_count, device=str(self.device),
            model_size_xyz=(int(padded[1]), int(padded[2]), int(padded[0])))
        return _finish(result, problem, u_out, image, start)

    def _sample(self, controlnet: ControlNet, entry: Anatomy, cond: torch.Tensor,
                correct: Optional[Callable[[torch.Tensor], torch.Tensor]], sampler: str, steps: int, seed: int,
                dc_every: Optional[int], progress: Optional[ProgressCallback],
                cancel: Optional[CancelFlag]) -> tuple[torch.Tensor, int]:
        """ControlNet-guided sampling of the normalised latent; returns (latent, guidance corrections)."""
        dev, f = self.device, int(self.bundle.downsample)
        latent = tuple(int(s) // f for s in cond.shape[2:])
        y = torch.tensor([entry.class_index], device=dev)
        res = torch.tensor([latent], dtype=torch.float32, device=dev) / float(self.denoiser.config.get("vq_size", 64))
        hint = controlnet.encode_condition(cond, latent)  # the condition image is fixed: encode it once

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x, t, y, res, control=controlnet(x, t, y, res, hint=hint))

        guide = None
        every = max(1, steps // rules.GUIDE_TIMES) if dc_every is None else int(dc_every)
        if correct is not None and every > 0:
            grid = make_sampler(sampler, self.diffusion)
            grid.set_timesteps(steps)  # the same grid sample_latents will walk
            guide = LatentDataConsistency(self.autoencoder, self.bundle.latent_range,
                                          int(self.bundle.encode_patch_size), correct, self.diffusion,
                                          grid.timesteps.tolist(), every, self.decode_budget_gb, dev)
        channels = int(self.denoiser.config["channels"])
        z = sample_latents(denoise, (channels,) + latent, [seed], sampler, steps, dev, self.diffusion,
                           progress=progress, cancel=cancel, guide=guide)
        return z, (guide.applied if guide is not None else 0)


class _PriorGrid:
    """The model's grid for one scan: the ControlNet condition, and model-grid network images <-> native physics.

    Network images are the conventional reconstruction's 0.5 / 99.5 percentiles mapped to [-1, 1] (the training
    recipe); the grid is padded to the model's multiples by reflecting the scan's edge, so no air is invented."""

    def __init__(self, grids: GridMap, degraded: torch.Tensor, step: int, patch: int) -> None:
        if math.prod(grids.model_shape) > MAX_MODEL_VOXELS:
            raise InputError(f"the input covers {'x'.join(map(str, grids.model_shape))} voxels at the model's "
                             f"spacing; at most {MAX_MODEL_VOXELS} are supported (crop the volume)")
        self.grids = grids
        coarse = grids.to_model(degraded)
        lo, hi = np.percentile(coarse.float().cpu().numpy(), [0.5, 99.5])
        self.lo, self.hi = float(lo), float(hi) if hi > lo else float(lo) + 1.0
        big = math.lcm(step, patch)

        def side(n: int) -> int:
            m = -(-n // step) * step
            return m if m <= patch or m % patch == 0 else -(-n // big) * big

        self.padded_shape = tuple(side(n) for n in grids.model_shape)
        self.pads = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(grids.model_shape, self.padded_shape)]
        self.undo = tuple(slice(a, a + n) for (a, _), n in zip(self.pads, grids.model_shape))
        self.condition = self._pad(self._to_network(coarse)).clamp(-1.0, 1.0)[None, None]

    def _to_network(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.lo) / (self.hi - self.lo) * 2.0 - 1.0

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        for axis, (a, b) in enumerate(self.pads):
            if a or b:
                n = x.shape[axis]
                idx = torch.arange(-a, n + b, device=x.device)
                if n > 1:  # reflect without repeating the edge voxel, folding back as often as needed
                    period = 2 * (n - 1)
                    idx = idx % period
                    idx = torch.where(idx >= n, period - idx, idx)
                else:
                    idx = torch.zeros_like(idx)
                x = x.index_select(axis, idx)
        return x

    def to_native(self, img: torch.Tensor) -> torch.Tensor:
        """Padded model-grid network image (Z, X, Y) -> native physics units."""
        u = (img[self.undo].float() + 1.0) * 0.5 * (self.hi - self.lo) + self.lo
        return self.grids.to_native(u)

    def to_model(self, u: torch.Tensor) -> torch.Tensor:
        """Native physics units -> padded model-grid network image."""
        return self._pad(self._to_network(self.grids.to_model(u)))
