"""The convolutions of the tiled decode: a layer's output rows from a crop of its input rows, and transposed
convolutions run as one ordinary convolution.

oneDNN's transposed 3-D convolution runs at about a third of the rate of its ordinary one on this kind of CPU
(measured: 15 against 44 GFLOP/s for the decoder's 96-channel up-sampling, same machine, same moment), and the
up-samplings are about a tenth of the decode's arithmetic at 256^3 (more when the up-sampled tensor is recomputed).
A stride-s transposed convolution whose kernel is a multiple of s is s^3 ordinary convolutions with kernels k/s,
one per output parity class; stacked along the output channels they are a single conv3d, and interleaving its
s^3 channel groups gives the transposed convolution's output (the same products, summed in another order).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ae_blocks import TailLayer


def _parity_kernel(conv: nn.ConvTranspose3d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ordinary conv3d equivalent to `conv`: weight (s^3 * out, in, m, m, m) with m = k / s, the output
    channel blocks ordered by parity (rd, rh, rw), and its bias repeated per block.

    Along one axis the transposed convolution writes o = s*i - p + t (tap t < k). With o + p = s*q + r, output o
    of parity r sums x[q - u] * w[r + s*u] over u < m: a correlation over the window x[q-m+1 .. q] whose
    position v holds the tap r + s*(m - 1 - v)."""
    s, m = conv.stride[0], conv.kernel_size[0] // conv.stride[0]
    w = conv.weight.transpose(0, 1)  # (out, in, k, k, k)
    flip = torch.arange(m - 1, -1, -1, device=w.device)
    blocks = []
    for rd in range(s):
        for rh in range(s):
            for rw in range(s):
                blocks.append(w[:, :, rd + s * flip][:, :, :, rh + s * flip][:, :, :, :, rw + s * flip])
    bias = conv.bias.repeat(s ** 3) if conv.bias is not None else None
    return torch.cat(blocks, 0).contiguous(), bias


def parity_decomposable(conv: nn.Module) -> bool:
    """A transposed convolution `conv_transpose_as_conv` can run: cubic, kernel a multiple of the stride, no
    groups, dilation or output padding."""
    if not isinstance(conv, nn.ConvTranspose3d) or isinstance(conv.padding, str):
        return False
    k, s, p = conv.kernel_size, conv.stride, tuple(int(v) for v in conv.padding)
    return (len(set(k)) == len(set(s)) == len(set(p)) == 1 and k[0] % s[0] == 0 and conv.groups == 1
            and set(conv.dilation) == {1} and set(conv.output_padding) == {0} and p[0] < s[0] * (k[0] // s[0]))


_KERNELS: "weakref.WeakKeyDictionary[nn.ConvTranspose3d, tuple[tuple[int, ...], torch.Tensor, Optional[torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def _cached_parity_kernel(conv: nn.ConvTranspose3d) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`_parity_kernel(conv)`, rebuilt only when the weights changed: building it indexes the weight 24 times,
    measured ~5 ms per index call on this CPU, which summed to seconds over a 256^3 decode's slabs."""
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    if any(t.is_inference() for t in params):  # no version counter to notice in-place updates: not cached
        return _parity_kernel(conv)
    key = tuple(v for t in params for v in (t.data_ptr(), t._version))
    hit = _KERNELS.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    weight, bias = _parity_kernel(conv)
    _KERNELS[conv] = (key, weight, bias)
    return weight, bias


def _parity_windows(conv: nn.ConvTranspose3d, x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """The parity conv3d of `x`: along depth the windows of x padded with `front` / `back` zero rows, along height
    and width every window of the full transposed output (x padded with m-1 zeros in front)."""
    s, k, p = conv.stride[0], conv.kernel_size[0], int(conv.padding[0])
    m = k // s
    weight, bias = _cached_parity_kernel(conv)
    # window positions q = 0 .. q_max (q_max = (length - 1 + p) // s) over x padded with m-1 zeros in front
    after = [(((d - 1) * s - 2 * p + k) - 1 + p) // s - (d - 1) for d in x.shape[3:]]
    if after == [m - 1, m - 1]:  # the official up-sampling: the conv's own zero padding, no padded copy
        pad = max(front, back)
        y = F.conv3d(x, weight, bias, padding=(pad, m - 1, m - 1))
        return y[:, :, pad - front:y.shape[2] - (pad - back)] if front != back else y
    return F.conv3d(F.pad(x, [m - 1, max(after[1], 0), m - 1, max(after[0], 0), front, back]), weight, bias)


def conv_transpose_as_conv(conv: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` computed as one ordinary conv3d plus an interleave (see the module docstring); equal to float
    rounding."""
    s, k, p = conv.stride[0], conv.kernel_size[0], int(conv.padding[0])
    n = x.shape[2]
    length = (n - 1) * s - 2 * p + k
    return conv_transpose_rows(conv, x, 0, n, n, 0, length)


def conv_transpose_rows(conv: nn.ConvTranspose3d, x: torch.Tensor, lo: int, hi: int, n_in: int, a: int, b: int,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output rows [a, b) of the parity-decomposable transposed convolution `conv` of a depth-n_in input, from its
    rows [lo, hi) (`x`, exactly the rows those outputs read: `decode_plan._input_rows`), written into `out` when
    given. Only the windows of those rows are computed: a slab interior to the volume gets no padding along depth."""
    s, k, p = conv.stride[0], conv.kernel_size[0], int(conv.padding[0])
    m = k // s
    # output o of parity r (o + p = s*q + r) comes from window q, which reads input rows [q - m + 1, q]
    q_lo, q_hi = -((s - 1 - a - p) // s), (b - 1 + p) // s
    front, back = lo - (q_lo - m + 1), q_hi + 1 - hi  # zero rows at the volume's borders
    if front < 0 or back < 0 or (front and lo) or (back and hi != n_in) or x.shape[2] != hi - lo:
        raise ValueError(f"rows [{lo}, {hi}) are not the input rows of output rows [{a}, {b})")
    y = _parity_windows(conv, x, front, back)
    c, hw = conv.out_channels, tuple((d - 1) * s - 2 * p + k for d in x.shape[3:])
    if out is None:
        out = torch.empty((x.shape[0], c, b - a) + hw, dtype=y.dtype, device=y.device, memory_format=_layout(x))
    _interleave(y, out, s, p, [(a, b, q_lo)] + [(0, n, 0) for n in hw])
    return out


def _interleave(y: torch.Tensor, out: torch.Tensor, s: int, p: int, ranges: list[tuple[int, int, int]]) -> None:
    """Write the parity classes of `y` (channel block i holds class i = (rd, rh, rw) in base s) to their output
    positions o = s*q + r - p. Per axis, `ranges` gives the output positions [start, stop) that `out` holds and the
    window index of y's first window: one strided copy per class, so cropping costs no copy of its own."""
    c = out.shape[1]
    for i in range(s ** 3):
        parity = (i // (s * s), i // s % s, i % s)
        dst, src = [slice(None), slice(None)], [slice(None), slice(i * c, (i + 1) * c)]
        for r, (start, stop, q_first) in zip(parity, ranges):
            o0 = start + (r - p - start) % s  # first output position of this parity
            q0 = (o0 + p - r) // s - q_first
            count = len(range(o0, stop, s))
            dst.append(slice(o0 - start, stop - start, s))
            src.append(slice(q0, q0 + count))
        out[tuple(dst)] = y[tuple(src)]


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format a decode slab derived from `x` is written in: channels-last stays channels-last."""
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else \
        torch.contiguous_format


def run_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a decoder layer's convolution, transposed ones on the CPU through `conv_transpose_as_conv`
    (measured faster there; on GPUs the interleave would only add a copy of the up-sampled slab)."""
    if x.device.type == "cpu" and isinstance(conv, nn.ConvTranspose3d) and parity_decomposable(conv):
        return conv_transpose_as_conv(conv, x)
    y: torch.Tensor = conv(x)
    return y


def conv_rows(layer: TailLayer, x: torch.Tensor, lo: int, hi: int, n_in: int, a: int, b: int,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output rows [a, b) of the layer's convolution from its (pre-activated) input rows [lo, hi), written into
    `out` when given (up-samplings on the CPU write there directly; other convolutions are copied in)."""
    conv = layer.conv
    if isinstance(conv, nn.ConvTranspose3d):
        if x.device.type == "cpu" and parity_decomposable(conv):
            return conv_transpose_rows(conv, x, lo, hi, n_in, a, b, out)
        # without depth padding, the local output's row f is the volume's row s*lo + f - p
        assert not isinstance(conv.padding, str)  # transposed convolutions take no string padding
        s, p = conv.stride[0], int(conv.padding[0])
        y = F.conv_transpose3d(x, conv.weight, conv.bias, conv.stride, (0, *conv.padding[1:]),
                               conv.output_padding, conv.groups, conv.dilation)
        y = y[:, :, a - s * lo + p:b - s * lo + p]
    else:
        k, p = conv.kernel_size[0], layer.padding[0]
        pad_lo, pad_hi = lo - (a - p), (b - p + k - 1) - hi  # zero rows the conv would have seen at the borders
        # the conv's own zero padding instead of a padded copy of the slab; with one border in the slab, the other
        # side's extra output rows (at most p) are dropped
        pad = max(pad_lo, pad_hi)
        y = F.conv3d(x, conv.weight, conv.bias, stride=1, padding=(pad, layer.padding[1], layer.padding[2]))
        if pad_lo != pad_hi:
            y = y[:, :, pad - pad_lo:y.shape[2] - (pad - pad_hi)]
    if out is None:
        return y
    out.copy_(y)
    return out


def residual_rows(layer: TailLayer, a: int, b: int, n_res: int) -> tuple[int, int]:
    """Rows of a layer's residual input that output rows [a, b) add: the same rows, unless the skip up-samples
    (a folded skip, see `fold_upsampled_skips`)."""
    if isinstance(layer.skip, nn.ConvTranspose3d):
        from .decode_plan import _input_rows
        return _input_rows(TailLayer(layer.skip), a, b, n_res)
    return a, b


def fold_upsampled_skips(layers: list[TailLayer], residuals: set[int]) -> list[TailLayer]:
    """The tail with the residuals in `residuals` read one tensor earlier: a ResBlock whose input T_r is a
    norm-free up-sampling of T_{r-1} (r in `residuals`) and that adds it through a 1x1x1 skip adds instead
    skip(up(T_{r-1})) as one transposed convolution with the composed kernel. Then a T_r that is not kept needs no
    recomputation for that ResBlock's second half (at 256^3: 2.5 TFLOP of up-sampling plus the skip become a
    1.2 TFLOP composed up-sampling). The same sums in another order: equal to float rounding."""
    out = list(layers)
    for i, layer in enumerate(layers):
        r = layer.residual
        if r is None or r not in residuals or not can_fold(layers, i):
            continue
        up, skip = layers[r - 1].conv, layer.skip
        assert isinstance(up, nn.ConvTranspose3d) and isinstance(skip, nn.Conv3d)
        s = skip.weight[:, :, 0, 0, 0].double()  # (out, mid)
        composed = nn.ConvTranspose3d(up.in_channels, skip.out_channels, up.kernel_size[0], up.stride[0],
                                      int(up.padding[0]), device=up.weight.device, dtype=up.weight.dtype)
        with torch.no_grad():
            composed.weight.copy_(torch.einsum("imxyz,om->ioxyz", up.weight.double(), s))
            up_bias = up.bias.double() if up.bias is not None else torch.zeros(s.shape[1], dtype=torch.float64)
            skip_bias = skip.bias.double() if skip.bias is not None else 0.0
            assert composed.bias is not None
            composed.bias.copy_(s @ up_bias.to(s.device) + skip_bias)
        out[i] = TailLayer(layer.conv, layer.norm, residual=r - 1, skip=composed)
    return out


def can_fold(layers: list[TailLayer], i: int) -> bool:
    """Whether layers[i]'s residual is a norm-free, residual-free up-sampling added through a 1x1x1 skip."""
    layer = layers[i]
    r = layer.residual
    if r is None or r == 0 or not isinstance(layer.skip, nn.Conv3d) or layer.skip.kernel_size != (1, 1, 1):
        return False
    src = layers[r - 1]
    return src.norm is None and src.residual is None and parity_decomposable(src.conv)
