"""Memory-bounded decoding of large latents that computes the same volume as decoding the whole latent at once.

The authors decode latents above 32^3 as separate 32^3 tiles without overlap: every tile gets its own GroupNorm
statistics and attention context, so seams show. Here the decoder is driven through its public staged API
(`Decoder.head`, `Decoder.tail`):

1. the head (conv_first and the middle block with the only attention, its queries in chunks when the volume is
   large) runs on the whole latent;
2. the tail is a list of layers with at most one GroupNorm each, at its start (`TailLayer`). They run one pass
   per layer, in slabs along the depth axis (slabs have the smallest halo surface for a given memory). A layer's
   output is *materialised* (kept whole, on the compute device) when the budget allows; otherwise it is
   recomputed slab by slab from the nearest materialised tensors when a later layer needs it, reusing the rows a
   previous slab already computed (halo rows are not recomputed);
3. each pass yields the whole-volume GroupNorm statistics of the tensor it produces as a by-product (per-slab
   mean/variance merged exactly), so the next layer normalises with global statistics without extra passes. Only
   a tensor too large to keep needs a statistics-only pass, and it is recomputed by its consumers.

A ResBlock that adds an up-sampled tensor the plan does not keep through a 1x1x1 skip reads it one tensor earlier,
through the skip folded into the up-sampling (`plan_tail`), so that tensor is recomputed for fewer passes.

A layer whose input dies with it writes its output over that input, row by row (the rows a later slab still needs
are carried aside), so at 256^3 the two 48-channel tensors of a ResBlock share one buffer.

Peak memory is bounded by the budget (live materialised tensors plus one slab's working set); the result equals
the whole-volume decode to float rounding. `DecodePlan` says what a decode will do (passes, slabs, buffers).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ae_blocks import AttentionBlock, TailLayer
from ..models.autoencoder import PatchVolumeAutoencoder
from .decode_conv import can_fold, conv_rows, fold_upsampled_skips, residual_rows
from .decode_halo import run_halo
from .decode_plan import (BYTES, DecodePlan, PassPlan, TensorPlan, _flops, _input_rows, _needed_after,
                          _rows_touched, plan_decode)
from ..progress import CancelFlag, ProgressCallback, ProgressTracker

__all__ = ["PRECISIONS", "DecodePlan", "DecodeReport", "PassPlan", "TensorPlan", "decode_latent",
           "default_budget_gb", "plan_decode"]

PRECISIONS = ("fp32", "bf16")


def _query_chunk(attn: AttentionBlock, channels: int, tokens: int, batch: int, budget: float) -> Optional[int]:
    """None when the one-pass attention fits the budget; else a query chunk using an eighth of it. The chunk only
    bounds memory because SDPA's flash/memory-efficient kernels (CPU fp32, CUDA) never build the score matrix."""
    inner = attn.heads * attn.dim_head
    if BYTES * batch * tokens * (4 * inner + 3 * channels) <= budget:
        return None
    return max(64, int(budget / 8 / (BYTES * batch * (2 * inner + channels))))


def _memory_format(device: torch.device) -> torch.memory_format:
    """Layout of the tail's tensors: channels-last on the CPU, where oneDNN's conv3d runs 15-25 % faster in it at
    the decoder's shapes than in NCDHW (measured on this CPU: 48->48 at 256^2 195 against 157 GFLOP/s), and every
    other op of the decode (pad, cat, addcmul, statistics, copies) keeps it. Values do not depend on it."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def default_budget_gb(device: torch.device) -> float:
    """Memory budget of the decode's activations (materialised tensors plus one slab's working set). On the CPU
    7 GB decodes 256^3 (official 8x) within 8 GB peak RSS and keeps every 48-channel full-resolution tensor, so
    only the 96-channel up-sampled one is recomputed (benchmarks/bench_decode.py); 3 GB on GPUs keeps every
    official size within 12 GB (estimated on fake tensors: benchmarks/estimate_memory.py)."""
    return 3.0 if device.type == "cuda" else 7.0


@dataclass
class DecodeReport:
    """What a decode did, filled in by `decode_latent(..., report=...)`: its plan, seconds in the head and per
    pass, the rows computed per tail tensor (recomputed tensors count once per pass that computes them) and the
    convolution FLOPs of the slab passes (with the layers as run, folded skips included; 3-D halo tiles not)."""
    plan: Optional[DecodePlan] = None
    head_seconds: float = 0.0
    pass_seconds: list[float] = field(default_factory=list)
    rows_computed: dict[int, int] = field(default_factory=dict)
    pass_flops: float = 0.0


def plan_tail(layers: list[TailLayer], head_shape: tuple[int, ...],
              budget_bytes: float) -> tuple[list[TailLayer], DecodePlan]:
    """The decoder tail as the decode runs it, and its plan: up-sampled ResBlock inputs that the plan does not
    keep are added through a composed skip from the tensor before them (`fold_upsampled_skips`) when that plan
    computes fewer FLOPs and needs no 3-D halo tiles (those run the decoder's own layers)."""
    plan = plan_decode(layers, head_shape, budget_bytes)
    foldable = {layer.residual for i, layer in enumerate(layers) if can_fold(layers, i)}
    residuals = {r for r in foldable if r is not None and not plan.tensors[r].materialized}
    if plan.halo is not None or not residuals:
        return layers, plan
    folded = fold_upsampled_skips(layers, residuals)
    trial = plan_decode(folded, head_shape, budget_bytes)
    if trial.halo is None and _flops(folded, trial) < _flops(layers, plan):
        return folded, trial
    return layers, plan


# ----------------------------------------------------------------------------------------------- the executor
class _Buffer:
    """A materialised tensor. While a later tensor overwrites it row by row, rows already overwritten that later
    slabs still read are served from a carried copy."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.overwritten = 0
        self.carry: Optional[torch.Tensor] = None
        self.carry_start = 0

    def read(self, a: int, b: int) -> torch.Tensor:
        if a >= self.overwritten:
            return self.data[:, :, a:b]
        if self.carry is None or a < self.carry_start:
            raise RuntimeError(f"decode: rows {a}.. of a tensor were overwritten before their last use")
        head = self.carry[:, :, a - self.carry_start:min(b, self.overwritten) - self.carry_start]
        return head if b <= self.overwritten else torch.cat([head, self.data[:, :, self.overwritten:b]], 2)

    def overwrite(self, a: int, y: torch.Tensor, keep_from: int) -> None:
        """Write rows [a, a+len) of the new tensor, first carrying aside the old rows [keep_from, a+len)."""
        b = a + y.shape[2]
        keep_from = min(keep_from, b)
        self.carry = self.read(keep_from, b).clone() if keep_from < b else None
        self.carry_start = keep_from
        self.data[:, :, a:b] = y
        self.overwritten = b


def _channel_moments(y: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Voxel count, mean and sum of squared deviations (float64) per (sample, channel) of a (B, C, D, H, W) slab."""
    count = math.prod(y.shape[2:])
    if y.device.type == "cpu" and y[:1].is_contiguous(memory_format=torch.channels_last_3d):
        # batch_norm_update_stats reads a channels-last tensor in one vectorised pass, but accumulates it in float32
        # (measured relative variance error 1e-4 over a 43x128^2 slab); row by row (128^2 or 256^2 voxels) it stays
        # within a few 1e-6 and as fast, and the rows merge exactly in float64. (Per sample: a depth slice of a
        # channels-last batch is channels-last per sample only.)
        try:
            moments = [torch.batch_norm_update_stats(y[i:i + 1, :, r:r + 1], None, None, 1.0)
                       for i in range(y.shape[0]) for r in range(y.shape[2])]
        except NotImplementedError:  # fake tensors (the memory estimate) have no kernel for it: same sizes below
            pass
        else:
            rows = y.shape[2]
            mean_r = torch.stack([m for m, _ in moments]).double().view(y.shape[0], rows, -1)
            var_r = torch.stack([v for _, v in moments]).double().view(y.shape[0], rows, -1)
            mean = mean_r.mean(1)
            m2 = (var_r.sum(1) + ((mean_r - mean[:, None]) ** 2).sum(1)) * (count // rows)
            return count, mean, m2
    var, mean = torch.var_mean(y, dim=(2, 3, 4), correction=0)
    return count, mean.double(), var.double() * count


class _Statistics:
    """Whole-volume GroupNorm statistics per (sample, group), merged from per-slab per-channel moments in float64
    (Chan et al.'s pairwise update), so they equal one-pass statistics to float rounding."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None  # (B, C) float64
        self.m2: Optional[torch.Tensor] = None

    def add(self, y: torch.Tensor) -> None:
        count, mean, m2 = _channel_moments(y.float())
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        n = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / n)
        self.count = n

    def scale_shift(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, channel) scale and shift of the GroupNorm with these statistics: y = x * scale + shift."""
        assert self.mean is not None and self.m2 is not None
        b, c = self.mean.shape
        g = norm.num_groups
        mean_c = self.mean.view(b, g, c // g)
        group_mean = mean_c.mean(-1, keepdim=True)
        # sum of squared deviations of the group = within channels + between channel means
        m2 = self.m2.view(b, g, c // g).sum(-1, keepdim=True) + \
            self.count * ((mean_c - group_mean) ** 2).sum(-1, keepdim=True)
        var = m2 / (self.count * (c // g))
        rstd = torch.rsqrt(var + norm.eps).expand(b, g, c // g).reshape(b, c)
        mean = group_mean.expand(b, g, c // g).reshape(b, c)
        weight = norm.weight.double() if norm.affine else torch.ones(c, dtype=torch.float64, device=mean.device)
        bias = norm.bias.double() if norm.affine else torch.zeros(c, dtype=torch.float64, device=mean.device)
        scale = rstd * weight
        shift = bias - mean * scale
        return scale.float().view(b, c, 1, 1, 1), shift.float().view(b, c, 1, 1, 1)


def _add(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + y, written into y (a slab's convolution output, fresh or in a buffer given to it) when that keeps
    the dtype (bf16 autocast promotes to the float32 residual): one pass over the slab instead of a new one. The
    same sums."""
    if residual.shape == y.shape and torch.result_type(residual, y) == y.dtype:
        return y.add_(residual)
    return residual + y


class _Workspace:
    """Memory reused for one slab-sized temporary across the slabs of a pass. Writing into pages already touched
    costs ~0.04 s/GB on this CPU, into a fresh allocation ~0.23 s/GB (page faults): at 256^3 the normalised inputs
    alone are ~25 GB of writes."""

    def __init__(self) -> None:
        self.flat: Optional[torch.Tensor] = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             layout: torch.memory_format) -> torch.Tensor:
        """An uninitialised (B, C, D, H, W) tensor in `layout` (channels-last or contiguous)."""
        n = math.prod(shape)
        if self.flat is None or self.flat.numel() < n or self.flat.dtype != dtype or self.flat.device != device:
            self.flat = None  # drop the old block before allocating the larger one
            self.flat = torch.empty(n, dtype=dtype, device=device)
        if layout == torch.channels_last_3d:
            b, c, d, h, w = shape
            return self.flat[:n].view(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        return self.flat[:n].view(shape)


class _Executor:
    def __init__(self, layers: list[TailLayer], plan: DecodePlan, head: torch.Tensor, out: torch.Tensor,
                 tracker: ProgressTracker, probe_slabs: Optional[int]) -> None:
        self.layers, self.plan, self.tensors = layers, plan, plan.tensors
        self.buffers: dict[int, _Buffer] = {0: _Buffer(head)}
        self.out = out
        self.norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # tensor -> (scale, shift) of its norm
        self.cache: dict[int, tuple[int, torch.Tensor]] = {}  # recomputed tensor -> (first row, rows)
        self.tracker = tracker
        self.probe_slabs = probe_slabs
        self.device = head.device
        self.rows_computed: dict[int, int] = {}
        self.layout = _memory_format(self.device)
        self.row_space: dict[int, list[_Workspace]] = {}
        self.norm_space, self.skip_space, self.pass_space = _Workspace(), _Workspace(), _Workspace()
        if self.tensors[0].needs_stats:  # the head's output is whole: measured directly
            stats = _Statistics()
            stats.add(head)
            norm = layers[0].norm
            assert norm is not None  # needs_stats: the layer normalises its input
            self.norms[0] = stats.scale_shift(norm)

    def rows(self, k: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of T_k: read when materialised, else recomputed (reusing rows computed for the last slab)."""
        if k in self.buffers:
            return self.buffers[k].read(a, b)
        cached = self.cache.get(k)
        if cached is not None and cached[0] <= a < cached[0] + cached[1].shape[2]:
            start, have = cached
            stop = start + have.shape[2]
            if b <= stop:
                return have[:, :, a - start:b - start]
            y = self._row_buffer(k, a, b)
            y[:, :, :stop - a] = have[:, :, a - start:]
            self.compute(k, stop, b, out=y[:, :, stop - a:])
        else:
            y = self._row_buffer(k, a, b)
            self.compute(k, a, b, out=y)
        self.cache[k] = (a, y)
        return y

    def _row_buffer(self, k: int, a: int, b: int) -> torch.Tensor:
        """Memory for rows [a, b) of a recomputed T_k: two workspaces per tensor, used in turn, so the cached rows
        (the other one) can start the next rows."""
        t = self.tensors[k]
        spare = self.row_space.setdefault(k, [_Workspace(), _Workspace()])
        spare.reverse()
        return spare[0].take((t.batch, t.channels, b - a) + t.spatial[1:], torch.float32, self.device, self.layout)

    def compute(self, k: int, a: int, b: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [a, b) of T_k from the rows of its inputs, written into `out` when given."""
        self.rows_computed[k] = self.rows_computed.get(k, 0) + b - a
        layer = self.layers[k - 1]
        n_in = self.tensors[k - 1].spatial[0]
        lo, hi = _input_rows(layer, a, b, n_in)
        x = self.rows(k - 1, lo, hi)
        if layer.norm is not None:
            scale, shift = self.norms[k - 1]
            # float32 like the statistics (under bf16 autocast a tensor kept from one slab is bf16)
            normed = self.norm_space.take(tuple(x.shape), torch.result_type(x, scale), self.device, self.layout)
            x = F.silu(torch.addcmul(shift, x, scale, out=normed), inplace=True)
        y = conv_rows(layer, x, lo, hi, n_in, a, b, out)
        del x
        if layer.residual is not None:
            r, n_r = layer.residual, self.tensors[layer.residual].spatial[0]
            if isinstance(layer.skip, nn.ConvTranspose3d):  # a folded skip reads the residual's input rows
                lo, hi = residual_rows(layer, a, b, n_r)
                res = self.rows(r, lo, hi)
                y = _add(y, conv_rows(TailLayer(layer.skip), res, lo, hi, n_r, a, b,
                                      self.skip_space.take(tuple(y.shape), y.dtype, self.device, self.layout)))
            else:
                res = self.rows(r, a, b)
                y = _add(y, layer.skip(res) if layer.skip is not None else res)
        if out is not None and y is not out:  # (bf16: the residual sum is a new float32 tensor)
            out.copy_(y)
            return out
        return y

    def run_pass(self, p: PassPlan) -> None:
        k, t = p.tensor, self.tensors[p.tensor]
        n = t.spatial[0]
        last = k == len(self.tensors) - 1
        self.cache.clear()
        # a single slab is the whole tensor: kept as computed, neither copied into a new buffer nor over its donor
        # (the slab's working set, which the plan counts, is that tensor; the donor is dropped right after)
        whole = t.materialized and not last and p.slabs == 1 and self.probe_slabs != 0
        kept: Optional[torch.Tensor] = None
        donor = self.buffers[t.inplace_of] if t.inplace_of is not None and not whole else None
        target = None
        if t.materialized and not last and donor is None and not whole:
            target = torch.empty((t.batch, t.channels) + t.spatial, device=self.device, memory_format=self.layout)
            if self.probe_slabs is not None:
                target.zero_()  # commit the pages a full run would write
        stats = _Statistics() if t.needs_stats else None
        for index, a in enumerate(range(0, n, p.slab_rows)):
            if self.probe_slabs is not None and index >= self.probe_slabs:
                break
            b = min(a + p.slab_rows, n)
            # kept rows are written straight into their buffer; a statistics-only slab into memory reused across
            # the pass on the CPU (GPUs' caching allocator reuses memory itself, a workspace would add a copy)
            out = None
            if target is not None:
                out = target[:, :, a:b]
            elif not t.materialized and not last and self.device.type == "cpu":
                out = self.pass_space.take((t.batch, t.channels, b - a) + t.spatial[1:], torch.float32,
                                           self.device, self.layout)
            y = self.compute(k, a, b, out)
            if stats is not None:
                stats.add(y)
            if last:
                self.out[:, :, a:b] = y.to(self.out.device, torch.float32)
            elif whole:
                kept = y.to(torch.float32, memory_format=self.layout)  # float32 even under bf16 autocast
            elif donor is not None:
                assert t.inplace_of is not None  # donor is that buffer
                acc: dict[int, tuple[int, int]] = {}
                if b < n:
                    _rows_touched(self.layers, self.tensors, k, b, min(b + p.slab_rows, n), acc)
                donor.overwrite(a, y, acc.get(t.inplace_of, (b, b))[0])
            del y
            self.tracker.advance()
        self.cache.clear()
        self.row_space.clear()
        for space in (self.norm_space, self.skip_space, self.pass_space):
            space.flat = None
        if kept is not None:
            if t.inplace_of is not None:
                del self.buffers[t.inplace_of]
            self.buffers[k] = _Buffer(kept)
        elif donor is not None:
            assert t.inplace_of is not None
            del self.buffers[t.inplace_of]
            self.buffers[k] = _Buffer(donor.data)
        elif target is not None:
            self.buffers[k] = _Buffer(target)
        if stats is not None:
            if stats.mean is None:  # probing skipped every slab of this pass: neutral statistics
                stats.add(torch.zeros((t.batch, t.channels, 1, 1, 1), device=self.device))
            norm = self.layers[k].norm
            assert norm is not None  # needs_stats: the layer normalises its input
            self.norms[k] = stats.scale_shift(norm)
        needed = _needed_after(self.layers, self.tensors, k)
        for j in [j for j in self.buffers if j not in needed]:
            del self.buffers[j]


@torch.no_grad()
def decode_latent(autoencoder: PatchVolumeAutoencoder, z_q: torch.Tensor, budget_gb: Optional[float] = None,
                  device: Optional[torch.device] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelFlag] = None, probe_slabs: Optional[int] = None,
                  report: Optional[DecodeReport] = None, precision: str = "fp32") -> torch.Tensor:
    """Decode a quantized latent (B, C, D, H, W) to a float32 CPU volume (B, 1, D*f, H*f, W*f).

    `budget_gb` bounds the decode's activations (default by device); `budget_gb=inf` decodes the whole latent at
    once like `autoencoder.decode`. `probe_slabs=N` runs only the first N slabs of every pass: the same buffers and
    slab working sets as the full decode (so the same peak memory) in a fraction of the time, but the decoded
    values are meaningless (benchmarks measure memory with it). `report`, if given, receives the plan and timings.
    `precision="bf16"` runs the convolutions in bfloat16 (autocast; statistics and kept tensors stay float32):
    faster where the hardware has bf16 units, but not exact (benchmarks/bench_decode.py --bf16 prints its error).

    Args:
        autoencoder: the bundle's autoencoder (f = its downsample factor).
        z_q: quantized latent (B, C, D, H, W), e.g. from ``autoencoder.quantize``.
        budget_gb: activation budget in GiB; None: `default_budget_gb` (7 on the CPU, 3 on CUDA).
        device: where the decoder runs; None: the latent's device.
        progress: called with ``"decoding"`` `ProgressInfo` updates, one per slab of every pass.
        cancel: checked after each slab.
        probe_slabs: run only the first N slabs of every pass (memory measurements; output meaningless).
        report: filled in with the plan and timings.
        precision: one of `PRECISIONS`.

    Returns:
        The decoder's raw output (B, 1, D*f, H*f, W*f), float32 on the CPU; about [-1, 1] (callers clamp).

    Raises:
        ValueError: an unknown precision or a latent that is not 5-D.
        Cancelled: when ``cancel`` was set.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"decode precision must be one of {PRECISIONS}, got {precision!r}")
    if z_q.ndim != 5:
        raise ValueError(f"decode_latent expects a (B, C, D, H, W) latent, got {tuple(z_q.shape)}")
    device = torch.device(device) if device is not None else z_q.device
    budget = (budget_gb if budget_gb is not None else default_budget_gb(device)) * 2**30
    with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()):
        return _decode(autoencoder, z_q, budget, device, progress, cancel, probe_slabs, report)


def _decode(autoencoder: PatchVolumeAutoencoder, z_q: torch.Tensor, budget: float, device: torch.device,
            progress: Optional[ProgressCallback], cancel: Optional[CancelFlag], probe_slabs: Optional[int],
            report: Optional[DecodeReport]) -> torch.Tensor:
    decoder = autoencoder.decoder
    if math.isinf(budget):
        tracker = ProgressTracker(1, progress, cancel, "decoding")
        tracker.begin()
        out = decoder(autoencoder.post_vq_conv(z_q.to(device)))
        tracker.advance()
        return out.float().cpu()
    batch = z_q.shape[0]
    start = time.perf_counter()
    attn = decoder.head_attention
    chunk = _query_chunk(attn, attn.norm.num_channels, math.prod(z_q.shape[2:]), batch, budget)
    head = decoder.head(autoencoder.post_vq_conv(z_q.to(device)), query_chunk=chunk)
    head = head.contiguous(memory_format=_memory_format(device))
    layers, plan = plan_tail(decoder.tail(), tuple(head.shape), budget)
    volume = plan.tensors[-1]
    # zeros, not empty: the host buffer is committed up front, so peak RSS does not depend on the slab order
    out = torch.zeros((batch, volume.channels) + volume.spatial)
    steps = sum(min(p.slabs, probe_slabs or p.slabs) for p in plan.passes)
    if plan.halo is not None:
        steps += min(plan.halo.tiles, probe_slabs or plan.halo.tiles) * plan.halo.passes
    tracker = ProgressTracker(steps, progress, cancel, "decoding")
    tracker.begin()
    executor = _Executor(layers, plan, head, out, tracker, probe_slabs)
    del head
    if report is not None:
        report.plan, report.head_seconds = plan, time.perf_counter() - start
        report.pass_flops = _flops(layers, plan)
    for p in plan.passes:
        start = time.perf_counter()
        executor.run_pass(p)
        if report is not None:
            report.pass_seconds.append(time.perf_counter() - start)
    if plan.halo is not None:
        start = time.perf_counter()

        def read(j: int, window: tuple[slice, slice, slice]) -> torch.Tensor:
            return executor.buffers[j].read(window[0].start, window[0].stop)[:, :, :, window[1], window[2]]

        run_halo(layers, plan.tensors, plan.halo, read, executor.norms, _Statistics, out, tracker, probe_slabs)
        if report is not None:
            report.pass_seconds.append(time.perf_counter() - start)
    if report is not None:
        report.rows_computed = dict(executor.rows_computed)
    return out
