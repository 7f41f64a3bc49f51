"""The tiled decode's plan: which decoder tail tensors are kept whole, which are written over a dead input, which
are recomputed by their consumers, and how thick each pass's slabs are, for a memory budget (see decode.py).

The planner walks the tail once, keeping each tensor when the tensors alive with it plus a thin slab's working set
fit the budget. A greedy choice can keep a tensor so large that a later pass no longer fits (at 256^3, the
96-channel up-sampled tensor in 7.25 GB); such a tensor is then excluded from keeping and the walk redone, so a
larger budget never gives a worse plan than a smaller one would have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..models.ae_blocks import TailLayer
from .decode_conv import residual_rows
from .decode_halo import HaloPlan, plan_halo

BYTES = 4  # activations are float32 (bf16 is not used for decoding: it would blur fine intensities)
# Working set of one slab per row of each tensor it touches: the rows read (a view of a kept tensor), their
# normalised copy (a workspace kept across the pass) and the conv output; a recomputed tensor's rows live in two
# workspaces (the previous slab's, whose last rows start the next) while the conv output of the new rows exists.
_WORK_COPIES = 3
_RECOMPUTED_COPIES = 4
_MIN_SLAB_ROWS = 4  # thinner slabs spend more in halos than materialising saves


# ----------------------------------------------------------------------------------------------- row geometry
def _input_rows(layer: TailLayer, a: int, b: int, n_in: int) -> tuple[int, int]:
    """Rows [lo, hi) of a layer's input (n_in rows) that output rows [a, b) depend on, clipped to the volume."""
    conv = layer.conv
    k, s, p = conv.kernel_size[0], conv.stride[0], layer.padding[0]
    if isinstance(conv, nn.ConvTranspose3d):  # output o = s*i - p + t, t in [0, k)
        lo, hi = -((k - 1 - a - p) // s), (b - 1 + p) // s + 1
    else:
        if s != 1:
            raise ValueError("tiled decoding supports stride-1 convolutions and transposed up-samplings only")
        lo, hi = a - p, b - p + k - 1
    return max(lo, 0), min(hi, n_in)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class TensorPlan:
    """One tensor of the decoder tail: T_0 is the head's output, the last one the volume."""
    channels: int
    spatial: tuple[int, int, int]
    batch: int
    needs_stats: bool = False     # the next layer normalises it
    materialized: bool = False    # kept whole (else recomputed by its consumers)
    inplace_of: Optional[int] = None  # written over this (dead) tensor's buffer

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first spatial axis) of the tensor."""
        return BYTES * self.batch * self.channels * self.spatial[1] * self.spatial[2]

    @property
    def bytes(self) -> int:
        """Bytes of the whole tensor."""
        return self.row_bytes * self.spatial[0]


@dataclass
class PassPlan:
    """One pass over the slabs of a tensor: it writes the tensor (or only measures it) and yields its statistics."""
    tensor: int
    slab_rows: int
    slabs: int
    live_bytes: int       # materialised tensors alive during the pass (including its own output)
    work_bytes: int       # estimated working set of one slab


@dataclass
class DecodePlan:
    """The decode schedule: every tail tensor, the passes that compute them slab by slab, and an optional halo stage."""
    tensors: list[TensorPlan]
    passes: list[PassPlan] = field(default_factory=list)
    # When slabs of the last tensors would not fit the budget (their whole-width rows are too large, e.g. 512^3
    # in 6 GB): the layers after this tensor run in 3-D tiles with halos instead (see decode_halo.py).
    halo: Optional[HaloPlan] = None

    @property
    def peak_bytes(self) -> int:
        """Estimated peak of the activations (kept tensors plus the largest slab or tile working set)."""
        peak = max((p.live_bytes + p.work_bytes for p in self.passes), default=0)
        if self.halo is not None:
            live = sum(t.bytes for t in self.tensors[:self.halo.start + 1] if t.materialized) + self.tensors[-1].bytes
            peak = max(peak, live + self.halo.work_bytes)
        return peak

    @property
    def steps(self) -> int:
        """Slabs and tiles over all passes (the progress total)."""
        return sum(p.slabs for p in self.passes) + (self.halo.tiles * self.halo.passes if self.halo else 0)

    def describe(self) -> str:
        """One line per pass: tensor, shape, what is kept, slabs."""
        lines = []
        for p in self.passes:
            t = self.tensors[p.tensor]
            keep = ("volume" if p.tensor == len(self.tensors) - 1 else
                    f"kept{' over T%d' % t.inplace_of if t.inplace_of is not None else ''}" if t.materialized
                    else "statistics only")
            lines.append(f"T{p.tensor} {t.channels}ch {'x'.join(map(str, t.spatial))}: {keep}, "
                         f"{p.slabs} slab(s) of {p.slab_rows} rows, live {p.live_bytes / 2**30:.2f} GB "
                         f"+ work {p.work_bytes / 2**30:.2f} GB")
        if self.halo is not None:
            h = self.halo
            lines.append(f"T{h.start + 1}..T{len(self.tensors) - 1}: {h.passes} pass(es) over {h.tiles} tile(s), core "
                         f"{h.core} + halo {h.halo} in T{h.start}'s grid, work {h.work_bytes / 2**30:.2f} GB")
        return "\n".join(lines)



def _inputs(layers: list[TailLayer], k: int) -> list[int]:
    """Tensors that T_k (k >= 1) is computed from."""
    layer = layers[k - 1]
    return [k - 1] + ([layer.residual] if layer.residual is not None else [])


def _sources(layers: list[TailLayer], tensors: list[TensorPlan], k: int) -> set[int]:
    """The materialised tensors that T_k is read from or recomputed from."""
    if tensors[k].materialized:
        return {k}
    out: set[int] = set()
    for i in _inputs(layers, k):
        out |= _sources(layers, tensors, i)
    return out


def _needed_after(layers: list[TailLayer], tensors: list[TensorPlan], k: int) -> set[int]:
    """Materialised tensors that passes after T_k's still read (later tensors assumed materialised)."""
    need: set[int] = set()
    for m in range(k + 1, len(tensors)):
        for i in _inputs(layers, m):
            if i <= k:
                need |= _sources(layers, tensors, i)
    return need


def _rows_touched(layers: list[TailLayer], tensors: list[TensorPlan], k: int, a: int, b: int,
                  acc: dict[int, tuple[int, int]], root: bool = True) -> None:
    """Row ranges of every tensor (recomputed ones included) that rows [a, b) of T_k, computed in T_k's pass,
    depend on; the walk stops at materialised tensors."""
    if k in acc:
        if not root and acc[k][0] <= a and b <= acc[k][1]:
            return  # already walked with a range at least as wide
        a, b = min(acc[k][0], a), max(acc[k][1], b)
    acc[k] = (a, b)
    if not root and tensors[k].materialized:
        return
    layer = layers[k - 1]
    lo, hi = _input_rows(layer, a, b, tensors[k - 1].spatial[0])
    _rows_touched(layers, tensors, k - 1, lo, hi, acc, root=False)
    if layer.residual is not None:
        lo, hi = residual_rows(layer, a, b, tensors[layer.residual].spatial[0])
        _rows_touched(layers, tensors, layer.residual, lo, hi, acc, root=False)


def _pass_work(layers: list[TailLayer], tensors: list[TensorPlan], k: int, rows: int) -> int:
    """Working set of one slab of `rows` rows of T_k: every tensor it computes or reads, a few copies each."""
    n = tensors[k].spatial[0]
    a = max(0, min(n - rows, n // 2 - rows // 2))  # an interior slab: halos on both sides
    acc: dict[int, tuple[int, int]] = {}
    _rows_touched(layers, tensors, k, a, a + rows, acc)
    return sum((_WORK_COPIES if j == k or tensors[j].materialized else _RECOMPUTED_COPIES) * tensors[j].row_bytes
               * (hi - lo) for j, (lo, hi) in acc.items())


def _slab_rows(layers: list[TailLayer], tensors: list[TensorPlan], k: int, available: float) -> int:
    """The thickest slab whose working set fits `available` (at least one row), evened out over the volume."""
    n = tensors[k].spatial[0]
    rows = n
    while rows > 1 and _pass_work(layers, tensors, k, rows) > available:
        rows = max(1, rows * 3 // 4)
    return math.ceil(n / math.ceil(n / rows))


def plan_decode(layers: list[TailLayer], head_shape: tuple[int, ...], budget_bytes: float) -> DecodePlan:
    """Which tail tensors to keep, which to write in place, and the slab size of every pass, for a budget.

    Among the slab plans that fit, the one that computes the fewest FLOPs: starting from the greedy walk, each large
    tensor is in turn excluded from keeping and the exclusion kept when it makes the plan cheaper (keeping the
    96-channel 256^3 tensor in 7.75 GB would force the four 48-channel tensors after it to be recomputed). When no
    slab plan fits, the last layers run in 3-D tiles with halos (see decode_halo.py)."""
    best = _fitting(layers, head_shape, budget_bytes, set())
    if best is None:
        plan = _walk(layers, head_shape, budget_bytes, set())
        over = [p for p in plan.passes if p.live_bytes + p.work_bytes > budget_bytes]
        return _with_halo(layers, plan, budget_bytes, over[0])
    plan, never_keep = best
    cost = _flops(layers, plan)
    n = len(plan.tensors) - 1
    for k in sorted(range(1, n), key=lambda j: -plan.tensors[j].bytes):
        if k in never_keep or not plan.tensors[k].materialized or plan.tensors[k].bytes < 0.05 * budget_bytes:
            continue
        trial = _fitting(layers, head_shape, budget_bytes, never_keep | {k})
        if trial is not None and _flops(layers, trial[0]) < cost:
            (plan, never_keep), cost = trial, _flops(layers, trial[0])
    return plan


def _fitting(layers: list[TailLayer], head_shape: tuple[int, ...], budget_bytes: float,
             never_keep: set[int]) -> Optional[tuple[DecodePlan, set[int]]]:
    """A slab plan within the budget that keeps none of `never_keep`: when a pass does not fit, the largest tensor
    kept alive through it is recomputed instead and the walk redone. None when recomputing cannot make it fit."""
    never_keep = set(never_keep)
    while True:
        plan = _walk(layers, head_shape, budget_bytes, never_keep)
        over = [p for p in plan.passes if p.live_bytes + p.work_bytes > budget_bytes]
        if not over:
            return plan, never_keep
        k = over[0].tensor
        alive = [j for j in _needed_after(layers, plan.tensors, k - 1) | {k}
                 if 0 < j < len(plan.tensors) - 1 and plan.tensors[j].materialized and j not in never_keep]
        if not alive:
            return None
        never_keep.add(max(alive, key=lambda j: plan.tensors[j].bytes))


def _flops(layers: list[TailLayer], plan: DecodePlan) -> float:
    """Convolution FLOPs a plan executes: every pass computes its tensor and, once per row (consecutive slabs
    reuse rows), the tensors it recomputes."""
    total = 0.0
    for p in plan.passes:
        n = plan.tensors[p.tensor].spatial[0]
        acc: dict[int, tuple[int, int]] = {}
        _rows_touched(layers, plan.tensors, p.tensor, 0, n, acc)
        for j, (lo, hi) in acc.items():
            if j == p.tensor or (j > 0 and not plan.tensors[j].materialized):
                layer, t = layers[j - 1], plan.tensors[j]
                per_voxel = _per_voxel(layer.conv) + (_per_voxel(layer.skip) if layer.skip is not None else 0.0)
                total += 2 * per_voxel * t.batch * (hi - lo) * t.spatial[1] * t.spatial[2]
    return total


def _per_voxel(conv: nn.Module) -> float:
    """Multiply-adds per output voxel of a convolution (a transposed one: per input voxel, over s^3 outputs)."""
    assert isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d))
    macs = conv.in_channels * conv.out_channels * math.prod(conv.kernel_size)
    return macs / conv.stride[0] ** 3 if isinstance(conv, nn.ConvTranspose3d) else float(macs)


def _walk(layers: list[TailLayer], head_shape: tuple[int, ...], budget_bytes: float,
          never_keep: set[int]) -> DecodePlan:
    """One greedy walk over the tail: keep each tensor (but those in `never_keep`) when it fits the budget."""
    batch, channels, d, h, w = head_shape
    tensors = [TensorPlan(channels, (d, h, w), batch, materialized=True)]
    for layer in layers:
        f = layer.upsampling
        d, h, w = d * f, h * f, w * f
        tensors.append(TensorPlan(layer.out_channels, (d, h, w), batch))
    n = len(tensors) - 1
    for k in range(n):
        tensors[k].needs_stats = layers[k].norm is not None
    tensors[n].materialized = True  # the volume (host buffer; counted in the budget like the rest)
    plan = DecodePlan(tensors)
    live = {0, n}  # the volume's host buffer is zero-filled up front
    for k in range(1, n + 1):
        t = tensors[k]
        if k < n:
            t.materialized = True  # tentatively, to see what dies with this pass
            dead = live - _needed_after(layers, tensors, k)
            # the residual first: its rows are read by the same output rows only, so overwriting it carries no
            # rows aside and later slabs read plain views (over the conv's input, halo rows are carried and joined)
            donors = [j for j in reversed(_inputs(layers, k)) if j in dead and tensors[j].materialized
                      and (tensors[j].channels, tensors[j].spatial) == (t.channels, t.spatial)]
            extra = 0 if donors else t.bytes
            live_bytes = sum(tensors[j].bytes for j in live) + extra
            keep = live_bytes + _pass_work(layers, tensors, k, min(t.spatial[0], _MIN_SLAB_ROWS)) <= budget_bytes
            t.materialized = keep and k not in never_keep
            t.inplace_of = donors[0] if t.materialized and donors else None
            if not t.materialized and not t.needs_stats:
                continue  # recomputed by its consumers; nothing to measure
        live_bytes = sum(tensors[j].bytes for j in live | ({k} if t.materialized else set())
                         if j != t.inplace_of)
        rows = _slab_rows(layers, tensors, k, budget_bytes - live_bytes)
        work = _pass_work(layers, tensors, k, rows)
        plan.passes.append(PassPlan(k, rows, math.ceil(t.spatial[0] / rows), live_bytes, work))
        if t.materialized:
            live.add(k)
        live &= _needed_after(layers, tensors, k) | {k, n}
    return plan


def _with_halo(layers: list[TailLayer], plan: DecodePlan, budget_bytes: float, over: PassPlan) -> DecodePlan:
    """The plan with the layers from the first pass that does not fit onwards run in 3-D tiles with halos."""
    tensors, n = plan.tensors, len(plan.tensors) - 1
    # tiles start from a kept tensor that leaves them at least 30% of the budget (else the head's output)
    kept_after = {p.tensor: sum(tensors[j].bytes for j in _needed_after(layers, tensors, p.tensor) | {n})
                  for p in plan.passes if p.tensor < over.tensor and tensors[p.tensor].materialized}
    start = max([k for k, b in kept_after.items() if b <= 0.7 * budget_bytes] or [0])
    plan.passes = [p for p in plan.passes if p.tensor <= start]
    for t in tensors[start + 1:-1]:
        t.materialized, t.inplace_of = False, None
    live_bytes = sum(tensors[j].bytes for j in _needed_after(layers, tensors, start) | {start, n})
    plan.halo = plan_halo(layers, tensors, start, budget_bytes - live_bytes)
    return plan
