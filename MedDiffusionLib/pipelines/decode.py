"""Memory-bounded decoding of large latents: overlapping tiles blended with smooth weights.

The authors decode latents above 32^3 as separate 32^3 tiles without overlap, which leaves visible seams. Here
tiles overlap and every voxel is a weighted mean of the tiles covering it, with weights that fall smoothly to
(almost) zero towards a tile's inner borders, so neighbouring tiles hand over gradually. Peak memory is that of
decoding one tile plus the output volume itself.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from .progress import CancelFlag, ProgressCallback, ProgressTracker


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1D weight: 1 in the middle, a raised-cosine fade of `fade` voxels at inner borders, never exactly 0."""
    w = torch.ones(length, dtype=torch.float32)
    if fade > 0:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(fade, dtype=torch.float32) + 0.5) / fade)
        if fade_start:
            w[:fade] = ramp
        if fade_end:
            w[-fade:] = ramp.flip(0)
    return w


@torch.no_grad()
def decode_latent(autoencoder: torch.nn.Module, z_q: torch.Tensor, tile: Optional[int] = 16, overlap: int = 4,
                  device: Optional[torch.device] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelFlag] = None) -> torch.Tensor:
    """Decode a quantized latent (B, C, D, H, W) to a volume on the CPU, tile by tile.

    `tile` and `overlap` are in latent voxels; `tile=None` (or a latent no larger than one tile) decodes in one go,
    exactly like `autoencoder.decode`. The result is a float32 CPU tensor (B, 1, D*f, H*f, W*f).
    """
    if z_q.ndim != 5:
        raise ValueError(f"decode_latent expects a (B, C, D, H, W) latent, got {tuple(z_q.shape)}")
    device = device or z_q.device
    spatial = tuple(z_q.shape[2:])
    if tile is None or all(s <= tile for s in spatial):
        tracker = ProgressTracker(1, progress, cancel, "decoding")
        tracker.begin()
        out = autoencoder.decode(z_q.to(device)).float().cpu()
        tracker.advance()
        return out
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    starts = [_starts(s, tile, overlap) for s in spatial]
    tracker = ProgressTracker(math.prod(len(s) for s in starts), progress, cancel, "decoding")
    tracker.begin()
    out = weight_sum = None
    factor = 0
    for corner in itertools.product(*starts):
        sl = tuple(slice(c, min(c + tile, s)) for c, s in zip(corner, spatial))
        piece = autoencoder.decode(z_q[(slice(None), slice(None)) + sl].to(device)).float().cpu()
        if out is None:
            factor = piece.shape[2] // (sl[0].stop - sl[0].start)
            full = (z_q.shape[0], piece.shape[1]) + tuple(s * factor for s in spatial)
            out = torch.zeros(full, dtype=torch.float32)
            weight_sum = torch.zeros(full[2:], dtype=torch.float32)
        fade = overlap * factor
        axes = [_ramp(piece.shape[2 + i], fade, sl[i].start > 0, sl[i].stop < spatial[i]) for i in range(3)]
        w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        region = tuple(slice(s.start * factor, s.stop * factor) for s in sl)
        out[(slice(None), slice(None)) + region] += piece * w
        weight_sum[region] += w
        del piece
        tracker.advance()
    return out / weight_sum
