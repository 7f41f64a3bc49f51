"""Memory-bounded decoding of large latents that matches decoding the whole latent at once.

The authors decode latents above 32^3 as separate 32^3 tiles without overlap, which leaves visible seams: every
tile gets its own GroupNorm statistics and its own attention context. Here:

1. the latent-resolution head of the decoder (post_vq_conv, conv_first and the middle block, which holds the only
   attention) runs on the whole latent: it is small and keeps the global attention exact;
2. the up-sampling tail (convolutions and GroupNorms only) runs tile by tile; each tile is a core plus a halo of
   neighbouring latent voxels and only the core's output is kept, so there is no blending to hide seams;
3. every GroupNorm of the tail normalises with the statistics of the *whole* volume. They are gathered one norm
   at a time in passes over the tiles (a pass stops at the norm it measures), earlier norms already using their
   exact global statistics.

Peak memory is one tile's activations plus the output volume. The result differs from the whole-volume decode only
through the halo's truncation of the convolutions' receptive field (tested to a small tolerance).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .progress import CancelFlag, ProgressCallback, ProgressTracker


class _StopForward(Exception):
    """Raised inside a statistics pass once the measured norm has seen its input."""


class _GlobalGroupNorms:
    """Swaps the forward of each GroupNorm in a module for one using fixed (global) statistics."""

    def __init__(self, norms: list[nn.GroupNorm]) -> None:
        self.norms = norms
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # norm index -> (mean, var) (B, G)
        self.measure: Optional[int] = None
        self.core: tuple[slice, ...] = ()  # core region of the current tile, in latent voxels relative to the tile
        self.tile_latent: tuple[int, ...] = ()
        self.sums: Optional[torch.Tensor] = None

    def _forward(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = norm.num_groups
        if index == self.measure:
            factor = x.shape[2] // self.tile_latent[0]
            region = tuple(slice(s.start * factor, s.stop * factor) for s in self.core)
            core = x[(slice(None), slice(None)) + region].double().reshape(b, g, -1)
            part = torch.stack([core.sum(-1), (core * core).sum(-1), torch.full_like(core[..., 0], core.shape[-1])])
            self.sums = part if self.sums is None else self.sums + part
            raise _StopForward
        mean, var = self.stats[index]
        xg = x.reshape(b, g, -1)
        y = (xg - mean[..., None].to(x.dtype)) * torch.rsqrt(var[..., None].to(x.dtype) + norm.eps)
        y = y.reshape_as(x)
        if norm.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return y

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for i, norm in enumerate(self.norms):
            norm.forward = (lambda x, i=i, norm=norm: self._forward(i, norm, x))  # type: ignore[method-assign]
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward  # back to the class's forward

    def finish_measure(self) -> None:
        total, total_sq, count = self.sums
        mean = total / count
        self.stats[self.measure] = (mean.float(), (total_sq / count - mean * mean).clamp_min(0).float())
        self.measure, self.sums = None, None


def _tiles(spatial: tuple[int, ...], core: int, halo: int) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(input window, core within the window) per tile, in latent voxels; windows clipped at the volume."""
    per_axis = []
    for size in spatial:
        axis = []
        for start in range(0, size, core):
            stop = min(start + core, size)
            lo, hi = max(start - halo, 0), min(stop + halo, size)
            axis.append((slice(lo, hi), slice(start - lo, stop - lo)))
        per_axis.append(axis)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]


def _tail(decoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for block in decoder.conv_blocks:
        h = block(h)
    return decoder.final_block(h)


@torch.no_grad()
def decode_latent(autoencoder: nn.Module, z_q: torch.Tensor, tile: Optional[int] = 16, overlap: int = 4,
                  device: Optional[torch.device] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelFlag] = None) -> torch.Tensor:
    """Decode a quantized latent (B, C, D, H, W) to a float32 CPU volume (B, 1, D*f, H*f, W*f).

    `tile` is the core edge and `overlap` the halo on each side, both in latent voxels. `tile=None`, or a latent no
    larger than one tile, decodes the whole latent at once exactly like `autoencoder.decode`.
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
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be positive and overlap non-negative, got {tile}, {overlap}")

    decoder = autoencoder.decoder
    head = decoder.mid_block(decoder.conv_first(autoencoder.post_vq_conv(z_q.to(device))))
    tiles = _tiles(spatial, tile, overlap)
    tail_modules = list(decoder.conv_blocks) + [decoder.final_block]
    norms = [m for block in tail_modules for m in block.modules() if isinstance(m, nn.GroupNorm)]
    global_norms = _GlobalGroupNorms(norms)
    tracker = ProgressTracker((len(norms) + 1) * len(tiles), progress, cancel, "decoding")
    tracker.begin()
    with global_norms.installed():
        for index in range(len(norms)):
            global_norms.measure = index
            for window, core in tiles:
                global_norms.core, global_norms.tile_latent = core, tuple(s.stop - s.start for s in window)
                try:
                    _tail(decoder, head[(slice(None), slice(None)) + window])
                except _StopForward:
                    pass
                tracker.advance()
            global_norms.finish_measure()
        out = None
        for window, core in tiles:
            piece = _tail(decoder, head[(slice(None), slice(None)) + window]).float()
            factor = piece.shape[2] // (window[0].stop - window[0].start)
            if out is None:
                out = torch.empty((z_q.shape[0], piece.shape[1]) + tuple(s * factor for s in spatial))
            src = tuple(slice(c.start * factor, c.stop * factor) for c in core)
            dst = tuple(slice((w.start + c.start) * factor, (w.start + c.stop) * factor) for w, c in zip(window, core))
            out[(slice(None), slice(None)) + dst] = piece[(slice(None), slice(None)) + src].cpu()
            del piece
            tracker.advance()
    return out
