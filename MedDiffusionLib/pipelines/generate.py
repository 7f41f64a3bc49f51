"""Unconditional generation: noise -> BiFlowNet sampling -> de-normalise -> quantize -> tiled decode -> image."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..catalog import Anatomy, parse_size
from ..data.transforms import network_to_image
from ..errors import InputError
from .common import (BundlePipeline, denormalize_latent, inference_mode, resolve_seed, resolve_steps,
                     sample_latent)
from .decode import decode_latent
from .progress import CancelFlag, ProgressCallback

# The authors save generated volumes with the NIfTI affine diag(spacing); this is that geometry in SimpleITK's LPS.
GENERATED_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SizeLike = Union[str, Sequence[int], None]


@dataclass
class GenerationResult:
    image: sitk.Image
    anatomy: str
    seed: int
    sampler: str
    steps: int
    size_xyz: tuple[int, int, int]
    elapsed_s: float


def latent_multiple(denoiser: torch.nn.Module) -> int:
    """Latent sides must be multiples of this (a fact of the denoiser: BiFlowNet.latent_multiple)."""
    return int(denoiser.latent_multiple)


def resolve_latent_size(anatomy: Anatomy, size: SizeLike, downsample: int, multiple: int) -> tuple[int, int, int]:
    """(X, Y, Z) voxels -> latent (D, H, W) = (Z, X, Y) / downsample, checked against the model's grid."""
    if size is None:
        return tuple(anatomy.latent_sizes[0])
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

    def __call__(self, anatomy: str, size_xyz: SizeLike = None, sampler: str = "dpmpp", steps: Optional[int] = None,
                 seed: Optional[int] = None, hu_range: Optional[tuple[float, float]] = None,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None
                 ) -> GenerationResult:
        start = time.perf_counter()
        entry = self.bundle.catalog.get(anatomy)
        if hu_range is not None:
            if entry.modality != "CT":
                raise InputError(f"an HU range only applies to CT; {entry.name} is {entry.modality}")
            if len(hu_range) != 2 or not hu_range[0] < hu_range[1]:
                raise InputError(f"HU range must be two increasing numbers, got {hu_range}")
        latent = resolve_latent_size(entry, size_xyz, self.bundle.downsample, latent_multiple(self.denoiser))
        steps = resolve_steps(sampler, steps, self.diffusion.timesteps)
        seed = resolve_seed(seed)
        volume = self.sample_volume(entry, latent, sampler, steps, seed, progress, cancel)
        image = self.to_image(volume, entry, hu_range)
        size = image.GetSize()
        return GenerationResult(image, entry.name, seed, sampler, steps, (size[0], size[1], size[2]),
                                time.perf_counter() - start)

    def sample_volume(self, entry: Anatomy, latent: tuple[int, int, int], sampler: str, steps: int, seed: int,
                      progress: Optional[ProgressCallback], cancel: Optional[CancelFlag]) -> np.ndarray:
        """Returns the decoded volume in network order (Z, X, Y), intensities in [0, 1]."""
        dev = self.device
        channels = self.denoiser.config["channels"]
        y = torch.tensor([entry.class_index], device=dev)
        res = torch.tensor([latent], dtype=torch.float32, device=dev) / float(self.denoiser.config.get("vq_size", 64))
        with inference_mode():
            z = sample_latent(lambda x, t: self.denoiser(x, t, y, res), (1, channels) + latent, sampler, steps,
                              seed, dev, self.diffusion, progress=progress, cancel=cancel)
            z = denormalize_latent(z, self.bundle.latent_range)
            z_q, _ = self.autoencoder.quantize(z)
            vol = decode_latent(self.autoencoder, z_q, self.decode_budget_gb, dev, progress, cancel)
        return ((vol[0, 0].clamp(-1, 1) + 1) / 2).numpy()

    @staticmethod
    def to_image(volume_zxy: np.ndarray, entry: Anatomy, hu_range: Optional[tuple[float, float]]) -> sitk.Image:
        arr = volume_zxy.astype(np.float32)
        if hu_range is not None:
            arr = arr * (hu_range[1] - hu_range[0]) + hu_range[0]
        return network_to_image(arr, entry.spacing_xyz, origin=(0.0, 0.0, 0.0), direction=GENERATED_DIRECTION)
