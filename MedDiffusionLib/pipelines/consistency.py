"""Data-consistency guidance during latent sampling (the ``guide`` hook of ``sample_latents``).

Every ``every`` steps the sampler's clean-latent estimate z0 is decoded to an image, corrected by ``correct`` (an
image -> image map that moves the estimate towards the measurements; the reconstruction pipeline passes a few CG
steps of the regularised least-squares problem on the scan's native grid, as decomposed diffusion sampling does),
and the change is carried back to the latent as ``dz0 = E(img_dc) - E(img)`` (two patch-wise encodes, so the
autoencoder's round-trip error cancels and an already consistent estimate is left unchanged). The sample at the
next timestep t' is then re-noised with the sampler's own formula, ``x_t' += sqrt(alpha_bar_t') dz0``: this is
exactly what DDIM / DPM-Solver (first order) would have produced from the corrected z0 with the same noise, and the
shift of the marginal mean q(x_t' | z0) for the other samplers. The last step is left to the pipeline, which
decodes the output and solves the data-consistency problem on the native grid anyway.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion
from ..models.autoencoder import PatchVolumeAutoencoder
from .common import denormalize_latent, normalize_latent
from .decode import decode_latent

__all__ = ["LatentDataConsistency"]


class LatentDataConsistency:
    """``guide(x_next, z0, t) -> x_next`` for ``sample_latents``: decode, correct, encode the change, re-noise."""

    def __init__(self, autoencoder: PatchVolumeAutoencoder, latent_range: tuple[float, float], encode_patch: int,
                 correct: Callable[[torch.Tensor], torch.Tensor], diffusion: GaussianDiffusion,
                 timesteps: Sequence[int], every: int = 1, decode_budget_gb: Optional[float] = None,
                 device: Optional[torch.device] = None, on_apply: Optional[Callable[[int], None]] = None) -> None:
        """``correct`` maps a decoded image (Z, X, Y) in [-1, 1] to its data-consistent version (same shape)."""
        self.ae, self.latent_range, self.patch = autoencoder, latent_range, int(encode_patch)
        self.correct, self.diffusion = correct, diffusion
        ts = [int(t) for t in timesteps]
        self.next_t = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}
        self.index = {t: i for i, t in enumerate(ts)}
        self.every = max(1, int(every))
        self.budget, self.device = decode_budget_gb, device
        self.on_apply = on_apply
        self.applied = 0

    def _encode(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_latent(self.ae.encode(img, self.patch), self.latent_range)

    def __call__(self, x_next: torch.Tensor, z0: torch.Tensor, t: int) -> torch.Tensor:
        """The guidance hook: every ``every`` steps, replace the next latent by the re-noised corrected estimate."""
        i, t_next = self.index[int(t)], self.next_t[int(t)]
        if t_next < 0 or (i + 1) % self.every:
            return x_next
        dev = self.device or z0.device
        z_q, _ = self.ae.quantize(denormalize_latent(z0, self.latent_range))
        img = decode_latent(self.ae, z_q, self.budget, dev).to(dev).clamp(-1.0, 1.0)  # (1, 1, Z, X, Y)
        img_dc = self.correct(img[0, 0]).clamp(-1.0, 1.0)[None, None]
        dz0 = self._encode(img_dc) - self._encode(img)
        z0_new = (z0 + dz0).clamp(-1.0, 1.0)
        self.applied += 1
        if self.on_apply is not None:
            self.on_apply(int(t))
        return x_next + math.sqrt(self.diffusion.alpha_bar(t_next)) * (z0_new - z0)
