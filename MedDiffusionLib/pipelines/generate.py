"""Unconditional generation: noise -> BiFlowNet sampling -> de-normalise -> quantize -> tiled decode -> image."""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..catalog import Anatomy, parse_size
from ..data.transforms import network_to_image
from ..errors import InputError
from ..results import GenerationResult
from ..options import DEFAULT_SAMPLER, GenerateOptions
from .common import BundlePipeline, denormalize_latent, inference_mode, resolve_seed, sample_latents
from .decode import decode_latent
from ..progress import CancelFlag, ProgressCallback

# The authors save generated volumes with the NIfTI affine diag(spacing); this is that geometry in SimpleITK's LPS.
GENERATED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SizeLike = Union[str, Sequence[int], None]


def resolve_latent_size(anatomy: Anatomy, size: SizeLike, downsample: int, multiple: int) -> tuple[int, int, int]:
    """(X, Y, Z) voxels -> latent (D, H, W) = (Z, X, Y) / downsample, checked against the model's grid.

    Args:
        anatomy: the catalog entry; its first trained size is used when ``size`` is None.
        size: 'XxYxZ' text or three ints, in voxels; None: the anatomy's first trained size.
        downsample: the autoencoder's voxels per latent cell along each axis.
        multiple: the denoiser's latent multiple; each side must divide by ``downsample * multiple``.

    Returns:
        The latent size (D, H, W) = (Z, X, Y) // downsample.

    Raises:
        InputError: when the size is not three positive numbers or is off the model's grid. A size the anatomy
            was not trained at only warns (UserWarning).
    """
    if size is None:
        return anatomy.latent_sizes[0]
    size_xyz = parse_size(size) if isinstance(size, str) else tuple(int(s) for s in size)
    if len(size_xyz) != 3:
        raise InputError(f"size must have three numbers X x Y x Z, got {size}")
    step = downsample * multiple
    if any(s <= 0 or s % step for s in size_xyz):
        raise InputError(f"size {'x'.join(map(str, size_xyz))} does not fit the model's grid: every side must be a "
                         f"positive multiple of {step} voxels")
    latent = (size_xyz[2] // downsample, size_xyz[0] // downsample, size_xyz[1] // downsample)
    if latent not in [tuple(s) for s in anatomy.latent_sizes]:
        known = ", ".join("x".join(map(str, s)) for s in anatomy.volume_sizes_xyz(downsample))
        warnings.warn(f"{anatomy.name} was trained at {known}; {'x'.join(map(str, size_xyz))} may look worse",
                      stacklevel=3)
    return latent


class GenerationPipeline(BundlePipeline):
    """Composes a model bundle (autoencoder, denoiser, catalog) with a sampler into volumes with geometry."""

    def __call__(self, anatomy: str, size_xyz: SizeLike = None, sampler: str = DEFAULT_SAMPLER,
                 steps: Optional[int] = None, seed: Optional[int] = None,
                 hu_range: Optional[tuple[float, float]] = None, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelFlag] = None) -> GenerationResult:
        """One volume; the arguments are those of `GenerateOptions` (defaults, bounds and their meaning).

        Args:
            anatomy: see `GenerateOptions`.
            size_xyz: see `GenerateOptions`.
            sampler: see `GenerateOptions`.
            steps: see `GenerateOptions`.
            seed: see `GenerateOptions`.
            hu_range: see `GenerateOptions`.
            progress: called with `ProgressInfo` updates (sampling, then decoding).
            cancel: checked between steps; when set the run stops with `Cancelled`.

        Returns:
            The volume as a float32 SimpleITK image (X x Y x Z, the anatomy's spacing in mm; HU with
            ``hu_range``, else [0, 1]) with the seed, steps and timing used.

        Raises:
            InputError: an option refused by `GenerateOptions.validate` for this model.
            Cancelled: when ``cancel`` was set.
        """
        return next(self.generate_batch([anatomy], size_xyz, sampler, steps, [seed], hu_range, progress, cancel))

    def check_inputs(self, anatomy: str, size_xyz: SizeLike, sampler: str, steps: Optional[int],
                     seed: Optional[int], hu_range: Optional[Sequence[float]]) -> GenerateOptions:
        """The request checked against this model (diffusers style: the pipeline owns the checks of its inputs),
        by `GenerateOptions.validate`, the rules the CLI, the server and the panel apply before queuing."""
        return GenerateOptions(anatomy=anatomy, size_xyz=size_xyz, sampler=sampler, steps=steps, seed=seed,
                               hu_range=hu_range).validate(self.bundle)

    def generate_batch(self, anatomies: Sequence[str], size_xyz: SizeLike, sampler: str, steps: Optional[int],
                       seeds: Sequence[Optional[int]], hu_range: Optional[tuple[float, float]] = None,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                       only: Optional[Sequence[bool]] = None) -> Iterator[GenerationResult]:
        """One volume per (anatomy, seed), all of one size: their latents share each denoiser call, then they are
        decoded and yielded one at a time (`only`: which of them to decode and yield). An item's random numbers
        come from its own seed only; batch mates still change its floats at rounding level (CPU and GPU matrix
        kernels block by batch size), so batch 1 reproduces `__call__` exactly and larger batches to ~1e-6.

        Args:
            anatomies: one catalog name per item; all must map to the same latent size.
            size_xyz: see `GenerateOptions` (shared by the batch).
            sampler: see `GenerateOptions`.
            steps: see `GenerateOptions`.
            seeds: one per anatomy (None: random, reported in the result).
            hu_range: see `GenerateOptions`.
            progress: called with `ProgressInfo` updates.
            cancel: checked between steps; when set the run stops with `Cancelled`.
            only: one flag per item; False items are still sampled (so the others match the full batch) but neither decoded nor yielded.

        Yields:
            A `GenerationResult` per kept item, in input order.

        Raises:
            InputError: a refused option, a seed count that differs from the anatomy count, an empty batch, or
                anatomies of different latent sizes.
            Cancelled: when ``cancel`` was set.
        """
        start = time.perf_counter()
        if len(anatomies) != len(seeds) or not anatomies:
            raise InputError("give one seed per anatomy")
        checked = [self.check_inputs(a, size_xyz, sampler, steps, s, hu_range) for a, s in zip(anatomies, seeds)]
        entries = [self.bundle.catalog.get(a) for a in anatomies]  # each checked just above
        size_xyz, sampler, hu_range = checked[0].size_xyz, checked[0].sampler, checked[0].hu_range
        latents = {resolve_latent_size(e, size_xyz, self.bundle.downsample, self.denoiser.latent_multiple)
                   for e in entries}
        if len(latents) != 1:
            raise InputError("a batch must have one latent size")
        latent = latents.pop()
        steps = checked[0].steps_or_default(self.diffusion.timesteps)  # = .steps: validate(bundle) filled it in
        resolved = [resolve_seed(o.seed) for o in checked]
        keep = [True] * len(entries) if only is None else [bool(k) for k in only]
        with inference_mode():
            z = sample_latents(self.class_denoiser(entries, latent), (int(self.denoiser.config["channels"]),) + latent,
                               resolved, sampler, steps, self.device, self.diffusion, progress=progress, cancel=cancel)
        volumes = self.decode_volumes(z, keep, progress, cancel)
        kept = [(e, s) for e, s, k in zip(entries, resolved, keep) if k]
        for (entry, seed), volume in zip(kept, volumes):
            image = self.to_image(volume, entry, hu_range, latent)
            size, spacing = image.GetSize(), image.GetSpacing()
            yield GenerationResult(image, entry.name, entry.modality, seed, sampler, steps, (size[0], size[1], size[2]),
                                   time.perf_counter() - start, (spacing[0], spacing[1], spacing[2]), str(self.device))

    def class_denoiser(self, entries: Sequence[Anatomy], latent: tuple[int, int, int]
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`denoise(x, t) -> eps` for a batch of these anatomies' latents (class and resolution conditioning).

        Args:
            entries: one anatomy per batch item (its class index conditions the denoiser).
            latent: the latent size (D, H, W), scaled by the bundle's ``vq_size`` for resolution conditioning.
        """
        y = torch.tensor([e.class_index for e in entries], device=self.device)
        res = torch.tensor([latent] * len(entries), dtype=torch.float32, device=self.device) \
            / float(self.denoiser.config.get("vq_size", 64))
        return lambda x, t: self.denoiser(x, t, y, res)

    def decode_volumes(self, z: torch.Tensor, keep: Optional[Sequence[bool]] = None,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None
                       ) -> Iterator[np.ndarray]:
        """Sampled (normalised) latents -> decoded volumes in network order (Z, X, Y), intensities in [0, 1], one
        at a time (decoding is the memory peak); `keep` skips some (a resumed batch needs only its missing ones).

        Args:
            z: sampled latents (B, C, D, H, W) in [-1, 1].
            keep: one flag per batch item; None decodes all.
            progress: called with decoding `ProgressInfo` updates.
            cancel: checked between decode tiles.

        Yields:
            float32 arrays (Z, X, Y) in [0, 1], one per kept item.
        """
        with inference_mode():
            z = denormalize_latent(z, self.bundle.latent_range)
        for i in range(z.shape[0]):
            if keep is not None and not keep[i]:
                continue
            with inference_mode():
                z_q, _ = self.autoencoder.quantize(z[i:i + 1])
                vol = decode_latent(self.autoencoder, z_q, self.decode_budget_gb, self.device, progress, cancel)
            yield ((vol[0, 0].clamp(-1, 1) + 1) / 2).numpy()

    @staticmethod
    def to_image(volume_zxy: np.ndarray, entry: Anatomy, hu_range: Optional[Sequence[float]],
                 latent: Sequence[int]) -> sitk.Image:
        """A generated (Z, X, Y) volume as an image with the anatomy's spacing, in HU when ``hu_range`` is given.

        Args:
            volume_zxy: intensities in [0, 1], network order (Z, X, Y).
            entry: the anatomy (its spacing in mm).
            hu_range: (low, high) HU that 0 and 1 map to linearly; None keeps [0, 1].
            latent: the latent size (D, H, W) it was sampled at: a trained size may have its own spacing
                (the official chest/abdomen CT: 1.25 mm at 32^3, 0.7 x 0.7 x 1 mm at 64^3).

        Returns:
            A float32 image of size (X, Y, Z), origin 0, the authors' NIfTI orientation (`GENERATED_DIRECTION`).
        """
        arr = volume_zxy.astype(np.float32)
        if hu_range is not None:
            arr = arr * (hu_range[1] - hu_range[0]) + hu_range[0]
        return network_to_image(arr, entry.spacing_for(latent), origin=(0.0, 0.0, 0.0), direction=GENERATED_DIRECTION)
