"""Memory-bounded decoding of large latents that computes the same volume as decoding the whole latent at once.

The authors decode latents above 32^3 as separate 32^3 tiles without overlap: every tile gets its own GroupNorm
statistics and attention context, so seams show. Here the decoder runs as a list of stages:

1. the latent-resolution head (post_vq_conv, conv_first and the middle block with the only attention, its queries
   in chunks when the volume is large) and every following stage whose activations fit the memory budget run on
   the whole volume, exactly as usual;
2. the remaining stages (convolutions, GroupNorms and up-sampling only) run tile by tile. A tile is a core plus a
   halo as wide as those stages' receptive field, so the core's output is exact; only cores are kept;
3. each GroupNorm among the tiled stages normalises with the statistics of the *whole* volume, gathered in one pass
   over the tiles per norm (a pass stops at the norm it measures; earlier norms already use global statistics).

Peak memory is set by the budget, not the volume; the result equals the whole-volume decode to float rounding.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .progress import CancelFlag, ProgressCallback, ProgressTracker

BYTES = 4  # activations are float32 (bf16 autocast is not used for decoding: it would blur fine intensities)


@dataclass
class _Stage:
    module: nn.Module
    in_channels: int
    out_channels: int
    scale_in: int     # spatial scale of the stage's input relative to the latent
    scale_out: int
    radius: float     # receptive-field radius in voxels of the stage's input grid


def _channels(module: nn.Module) -> tuple[int, int]:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    first, last = convs[0], convs[-1]
    return first.in_channels, last.out_channels


def _decoder_stages(decoder: nn.Module) -> list[_Stage]:
    """The decoder after its head as a flat list: ResBlocks, up-samplings and the final block."""
    stages, scale = [], 1
    for level in decoder.conv_blocks:
        for res in (level.res1, level.res2):
            stages.append(_Stage(res, *_channels(res), scale, scale, 2.0))  # two 3x3x3 convs
        if not isinstance(level.up, nn.Identity):
            stages.append(_Stage(level.up, *_channels(level.up), scale, scale * 2, 1.0))  # k4 s2 p1: +-1 input voxel
            scale *= 2
    stages.append(_Stage(decoder.final_block, *_channels(decoder.final_block), scale, scale, 1.0))
    return stages


def _stage_bytes(stage: _Stage, voxels_in: int, batch: int) -> int:
    """Rough peak of one stage: its input plus output, norm and residual temporaries."""
    ratio = (stage.scale_out // stage.scale_in) ** 3
    return BYTES * batch * voxels_in * (2 * stage.in_channels + 3 * stage.out_channels * ratio)


class _StopForward(Exception):
    """Raised inside a statistics pass once the measured norm has seen its input."""


class _GlobalGroupNorms:
    """Replaces the forward of each GroupNorm with one that uses whole-volume statistics (or measures them)."""

    def __init__(self, norms: list[nn.GroupNorm]) -> None:
        self.norms = norms
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.measure: Optional[int] = None
        self.core: tuple[slice, ...] = ()
        self.tile_shape: tuple[int, ...] = ()
        self.sums: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None

    def _forward(self, index: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = norm.num_groups
        if index == self.measure:
            factor = x.shape[2] // self.tile_shape[0]
            region = tuple(slice(s.start * factor, s.stop * factor) for s in self.core)
            # Per-tile mean and variance in fp32 (one copy of the core, no float64 copies), merged in float64.
            var, mean = torch.var_mean(x[(slice(None), slice(None)) + region].reshape(b, g, -1), dim=-1,
                                       correction=0)
            count = c // g * math.prod(s.stop - s.start for s in region)
            self._merge(count, mean.double(), var.double() * count)
            raise _StopForward
        mean, var = self.stats[index]
        y = (x.reshape(b, g, -1) - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
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

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of (count, mean, sum of squared deviations) per group."""
        if self.sums is None:
            self.sums = (count, mean, m2)
            return
        n_a, mean_a, m2_a = self.sums
        n = n_a + count
        delta = mean - mean_a
        self.sums = (n, mean_a + delta * (count / n), m2_a + m2 + delta * delta * (n_a * count / n))

    def finish_measure(self) -> None:
        count, mean, m2 = self.sums
        self.stats[self.measure] = (mean.float(), (m2 / count).float())
        self.measure, self.sums = None, None


def _tiles(spatial: tuple[int, ...], core: int, halo: int) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(input window, core inside the window) per tile; windows are clipped at the volume's border."""
    per_axis = []
    for size in spatial:
        axis = []
        for start in range(0, size, core):
            stop = min(start + core, size)
            lo, hi = max(start - halo, 0), min(stop + halo, size)
            axis.append((slice(lo, hi), slice(start - lo, stop - lo)))
        per_axis.append(axis)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]


def _run(stages: list[_Stage], h: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        h = stage.module(h)
    return h


def _query_chunk(attn: nn.Module, channels: int, tokens: int, batch: int, budget: float) -> Optional[int]:
    """None when the one-pass attention fits the budget; else a query chunk using an eighth of it. The chunk only
    bounds memory because SDPA's flash/memory-efficient kernels (CPU fp32, CUDA) never build the score matrix."""
    inner = attn.heads * attn.dim_head
    if BYTES * batch * tokens * (4 * inner + 3 * channels) <= budget:
        return None
    return max(64, int(budget / 8 / (BYTES * batch * (2 * inner + channels))))


def default_budget_gb(device: torch.device) -> float:
    """Activation budget per stage or tile. On the CPU 6 GB decodes up to 128^3 whole and 256^3 (official 8x) in
    tiles at 6.7 GB peak RSS (benchmarks/bench_generate.py); 3 GB on GPUs keeps every official size within 12 GB
    (estimated on fake tensors: benchmarks/estimate_memory.py)."""
    return 3.0 if device.type == "cuda" else 6.0


@torch.no_grad()
def decode_latent(autoencoder: nn.Module, z_q: torch.Tensor, budget_gb: Optional[float] = None,
                  device: Optional[torch.device] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelFlag] = None) -> torch.Tensor:
    """Decode a quantized latent (B, C, D, H, W) to a float32 CPU volume (B, 1, D*f, H*f, W*f).

    `budget_gb` bounds the activations of one stage or tile (default by device); `budget_gb=inf` decodes the whole
    latent at once like `autoencoder.decode`.
    """
    if z_q.ndim != 5:
        raise ValueError(f"decode_latent expects a (B, C, D, H, W) latent, got {tuple(z_q.shape)}")
    device = torch.device(device) if device is not None else z_q.device
    budget = (budget_gb if budget_gb is not None else default_budget_gb(device)) * 2**30
    decoder = autoencoder.decoder
    batch = z_q.shape[0]
    stages = _decoder_stages(decoder)
    tracker = ProgressTracker(1, progress, cancel, "decoding")
    tracker.begin()

    h = decoder.conv_first(autoencoder.post_vq_conv(z_q.to(device)))
    chunk = _query_chunk(decoder.mid_block.attn, h.shape[1], math.prod(h.shape[2:]), batch, budget)
    h = decoder.mid_block(h, query_chunk=chunk)  # the only attention: whole volume, queries chunked if large
    done = 0
    while done < len(stages) and _stage_bytes(stages[done], math.prod(h.shape[2:]), batch) <= budget:
        h = stages[done].module(h)
        done += 1
    if done == len(stages):
        tracker.advance()
        return h.float().cpu()

    streamed = stages[done:]
    base = streamed[0].scale_in
    halo = math.ceil(sum(s.radius * base / s.scale_in for s in streamed))
    factor = streamed[-1].scale_out // base
    spatial = tuple(h.shape[2:])

    def tile_bytes(core: int) -> int:
        edge = [min(core + 2 * halo, s) for s in spatial]
        return max(_stage_bytes(s, math.prod(edge) * (s.scale_in // base) ** 3, batch) for s in streamed)

    core = max(spatial)
    while core > 1 and tile_bytes(core) > budget:
        core = max(1, core * 3 // 4)
    tiles = _tiles(spatial, core, halo)
    norms = [m for s in streamed for m in s.module.modules() if isinstance(m, nn.GroupNorm)]
    tracker = ProgressTracker((len(norms) + 1) * len(tiles), progress, cancel, "decoding")
    tracker.begin()
    global_norms = _GlobalGroupNorms(norms)
    # zeros, not empty: the host buffer is committed up front, so peak RSS does not depend on the tile order
    out = torch.zeros((batch, streamed[-1].out_channels) + tuple(s * factor for s in spatial))
    with global_norms.installed():
        for index in range(len(norms)):
            global_norms.measure = index
            for window, tile_core in tiles:
                global_norms.core, global_norms.tile_shape = tile_core, tuple(w.stop - w.start for w in window)
                try:
                    _run(streamed, h[(slice(None), slice(None)) + window])
                except _StopForward:
                    pass
                tracker.advance()
            global_norms.finish_measure()
        for window, tile_core in tiles:
            piece = _run(streamed, h[(slice(None), slice(None)) + window])
            src = tuple(slice(c.start * factor, c.stop * factor) for c in tile_core)
            dst = tuple(slice((w.start + c.start) * factor, (w.start + c.stop) * factor)
                        for w, c in zip(window, tile_core))
            out[(slice(None), slice(None)) + dst] = piece[(slice(None), slice(None)) + src].float().cpu()
            del piece
            tracker.advance()
    return out
