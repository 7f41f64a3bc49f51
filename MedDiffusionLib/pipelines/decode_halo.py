"""The tiled decode's fallback for tensors whose slabs would not fit the budget: 3-D tiles with halos.

When even a slab a few rows thick of the last decoder tensors exceeds the budget (e.g. a 512^3 volume in 6 GB: one
row of the 96-channel 256^3 tensor is 25 MB and a recomputation chain needs dozens), the layers after the last
tensor kept whole run tile by tile. A tile is a core plus a halo as wide as those layers' receptive field, so its
core is exact; every GroupNorm among them uses whole-volume statistics gathered in one pass over the tiles per norm
(the pass stops at the tensor it measures). Slower than slabs (each pass recomputes the chain), but bounded.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ae_blocks import TailLayer
from .decode_conv import run_conv

if TYPE_CHECKING:
    from .decode_plan import TensorPlan
    from ..progress import ProgressTracker

Window = tuple[slice, slice, slice]
_TILE_COPIES = 4  # a layer's input, its activated copy, its output and the residual


@dataclass
class HaloPlan:
    """How to decode the last layers in tiles with overlapping borders (halos) when slabs would not fit."""
    start: int        # the kept tensor the tiles read; layers[start:] run per tile
    core: int         # tile core edge, in that tensor's grid
    halo: int
    tiles: int
    passes: int       # one per GroupNorm among those layers, plus the final one
    work_bytes: int


def _radius(layers: list[TailLayer], start: int) -> float:
    """Receptive-field radius of layers[start:] in the grid of tensor `start`."""
    radius, scale = 0.0, 1
    for layer in layers[start:]:
        conv = layer.conv
        k, s, p = conv.kernel_size[0], conv.stride[0], layer.padding[0]
        if isinstance(conv, nn.ConvTranspose3d):
            radius += math.ceil((k - 1 - p) / s) / scale  # an output row depends on inputs up to this far
            scale *= s
        else:
            radius += max(p, k - 1 - p) / scale
    return radius


def _tile_work(tensors: list[TensorPlan], start: int, window: tuple[int, ...]) -> int:
    base = tensors[start].spatial[0]
    return max(_TILE_COPIES * t.batch * t.channels * 4 * math.prod(w * (t.spatial[0] // base) for w in window)
               for t in tensors[start:])


def _tiles(spatial: tuple[int, ...], core: int, halo: int) -> list[tuple[Window, Window]]:
    """(window, core inside the window) per tile; windows are clipped at the volume's border."""
    per_axis = []
    for size in spatial:
        axis = []
        for lo in range(0, size, core):
            hi = min(lo + core, size)
            a, b = max(lo - halo, 0), min(hi + halo, size)
            axis.append((slice(a, b), slice(lo - a, hi - a)))
        per_axis.append(axis)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]


def plan_halo(layers: list[TailLayer], tensors: list[TensorPlan], start: int, available: float) -> HaloPlan:
    """The largest tile core whose working set fits ``available`` bytes, for layers[start:]."""
    spatial = tensors[start].spatial
    halo = math.ceil(_radius(layers, start))

    def work(core: int) -> int:
        return _tile_work(tensors, start, tuple(min(core + 2 * halo, n) for n in spatial))

    core = max(spatial)
    while core > 1 and work(core) > available:
        core = max(1, core * 3 // 4)
    tiles = math.prod(math.ceil(n / core) for n in spatial)
    passes = sum(t.needs_stats for t in tensors[start + 1:-1]) + 1
    return HaloPlan(start, core, halo, tiles, passes, work(core))


def run_halo(layers: list[TailLayer], tensors: list[TensorPlan], plan: HaloPlan,
             read: Callable[[int, Window], torch.Tensor], norms: dict[int, tuple[torch.Tensor, torch.Tensor]],
             new_statistics: Callable[[], Any], out: torch.Tensor, tracker: ProgressTracker,
             probe_tiles: Optional[int] = None) -> None:
    """Compute the volume from tensor `plan.start` (and the kept residuals before it), filling `norms` with the
    whole-volume statistics (scale, shift) of every later normalised tensor on the way."""
    start, n = plan.start, len(tensors) - 1
    tiles = _tiles(tensors[start].spatial, plan.core, plan.halo)
    if probe_tiles is not None:  # the largest windows: the same peak as running them all
        tiles = sorted(tiles, key=lambda t: -math.prod(s.stop - s.start for s in t[0]))[:probe_tiles]
    base = tensors[start].spatial[0]
    for target in [j for j in range(start + 1, n) if tensors[j].needs_stats] + [n]:
        stats = new_statistics() if target < n else None
        for window, core in tiles:
            values = {start: read(start, window)}
            for j in range(start + 1, target + 1):
                layer = layers[j - 1]
                x = values[j - 1]
                if layer.norm is not None:
                    scale, shift = norms[j - 1]
                    x = F.silu(torch.addcmul(shift, x, scale), inplace=True)
                residual = None
                if layer.residual is not None:
                    r = layer.residual
                    residual = values[r] if r in values else read(r, window)
                # zero padding at the window's edge: in the halo
                values[j] = layer.post(run_conv(layer.conv, x), residual)
                del x
                for old in [i for i in values if i < j - 1]:
                    del values[old]
            f = tensors[target].spatial[0] // base
            region = tuple(slice(c.start * f, c.stop * f) for c in core)
            piece = values.pop(target)[(slice(None), slice(None)) + region]
            if stats is not None:
                stats.add(piece)
            else:
                dst = tuple(slice((w.start + c.start) * f, (w.start + c.stop) * f) for w, c in zip(window, core))
                out[(slice(None), slice(None)) + dst] = piece.to(out.device, torch.float32)
            del values, piece
            tracker.advance()
        if stats is not None:
            norms[target] = stats.scale_shift(layers[target].norm)
