"""Inter-patch flow building blocks of BiFlowNet: condition embeddings, ResNet blocks, attention, resampling.

All blocks accept volumes in either contiguous (N, C, D, H, W) or channels-last-3d memory format and keep the
format they are given: on CPU BiFlowNet runs channels-last because oneDNN convolutions are faster in NDHWC and
channel-wise norms/linears then work on contiguous rows without permuting copies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """Timestep -> (B, dim) features: half sin, half cos, frequencies exp(-ln(10000) * i / (dim/2 - 1))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"time embedding size must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        """Sinusoidal embedding (B, dim) of the timesteps ``t`` (B,), computed in float32."""
        half = self.dim // 2
        # Always float32: timesteps reach 1000, bf16 would round them to multiples of 4.
        freqs = torch.exp(
            torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        arg = t.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class ConditionEmbedding(nn.Module):
    """(t, y, res) -> the 8*dim condition vector shared by every ResNet and DiT block.

    time: sinusoid(dim) -> Linear(dim, 4dim) -> exact GELU -> Linear(4dim, 4dim); the class embedding (4dim)
    is added; the resolution MLP Linear(3, 4dim) -> SiLU -> Linear is concatenated after it.
    """

    def __init__(self, dim: int, num_classes: Optional[int]) -> None:
        super().__init__()
        hidden = 4 * dim
        self.sinusoid = SinusoidalTimeEmbedding(dim)
        self.time_fc1 = nn.Linear(dim, hidden)
        self.time_fc2 = nn.Linear(hidden, hidden)
        self.class_emb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.res_fc1 = nn.Linear(3, hidden)
        self.res_fc2 = nn.Linear(hidden, hidden)
        self.out_dim = 2 * hidden

    def forward(self, t: Tensor, y: Optional[Tensor], res: Tensor) -> Tensor:
        """The condition vector (B, out_dim) from timestep, class label (if the model has classes) and resolution."""
        # The sinusoid is computed in float32; cast it to the weights' dtype for bf16/fp16 models (autocast
        # recasts as needed anyway).
        emb = self.time_fc2(F.gelu(self.time_fc1(self.sinusoid(t).to(self.time_fc1.weight.dtype))))
        if self.class_emb is not None:
            if y is None:
                raise ValueError("this BiFlowNet is class-conditional: y is required")
            emb = emb + self.class_emb(y).to(emb.dtype)
        r = self.res_fc2(F.silu(self.res_fc1(res.to(self.res_fc1.weight.dtype))))
        return torch.cat((emb, r.to(emb.dtype)), dim=-1)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


# Call oneDNN directly for CPU inference convolutions (see conv3d); False restores PyTorch's own choice.
ONEDNN_DIRECT = True


def conv3d(x: Tensor, conv: nn.Conv3d) -> Tensor:
    """Apply `conv`, calling oneDNN directly on CPU inference where PyTorch's heuristic would not.

    For batch 1 PyTorch sends small-channel or <=3 kernels to its im2col fallback, 3-10x slower than oneDNN
    here (e.g. the 8->72 init conv, every 1x1x1 shortcut, the 8^3-16^3 levels). Tiny volumes (< 512 output
    voxels: the 4^3 level) stay on the fallback, where oneDNN's per-call weight reordering costs more than
    it saves. Autocast, gradients and other devices take the ordinary path.
    """
    w = conv.weight
    if (ONEDNN_DIRECT and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] >= 512 and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not _autocast_on("cpu")):
        return torch.ops.aten.mkldnn_convolution(x, w, conv.bias, conv.padding, conv.stride, conv.dilation, 1)
    return conv(x)


def _per_channel(v: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1, 1) for broadcasting over a volume in any memory format."""
    return v[:, :, None, None, None]


class ResnetBlock(nn.Module):
    """conv3 -> GroupNorm -> x*(scale+1)+shift -> SiLU -> conv3 -> GroupNorm -> SiLU, plus (1x1x1) shortcut.

    `cond_dim=None` gives the unconditioned variant (BiFlowNet's final block).
    """

    def __init__(self, dim_in: int, dim_out: int, groups: int, cond_dim: Optional[int] = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.cond_proj = nn.Linear(cond_dim, 2 * dim_out) if cond_dim else None
        self.conv1 = nn.Conv3d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, dim_out, eps=eps)
        self.conv2 = nn.Conv3d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim_out, eps=eps)
        self.skip_conv = nn.Conv3d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Two convolutions with the condition's scale and shift after the first norm, plus the (projected) input."""
        h = conv3d(x, self.conv1)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this ResnetBlock needs the condition vector")
            scale, shift = self.cond_proj(F.silu(cond)).chunk(2, dim=1)
            # Fold the GroupNorm affine and the condition scale/shift into one multiply-add pass:
            # (n*w + b)*(1+s) + sh = n*(w*(1+s)) + (b*(1+s) + sh).
            h = F.group_norm(h, self.groups, None, None, self.eps)
            s1 = scale.float() + 1.0
            mul = self.norm1.weight.float() * s1
            add = self.norm1.bias.float() * s1 + shift.float()
            h = torch.addcmul(_per_channel(add).to(h.dtype), h, _per_channel(mul).to(h.dtype))
        else:
            h = self.norm1(h)
        h = F.silu(h, inplace=True)
        h = F.silu(self.norm2(conv3d(h, self.conv2)), inplace=True)
        skip = x if self.skip_conv is None else conv3d(x, self.skip_conv)
        return h + skip


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a volume, gain only (no bias), biased variance."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Layer norm over the channels of a (B, C, D, H, W) tensor."""
        c = x.shape[1]
        # movedim is a free view for channels-last input, so layer_norm sees contiguous channel rows.
        y = F.layer_norm(x.movedim(1, -1), (c,), self.gamma.view(c).to(x.dtype), None, self.eps)
        return y.movedim(-1, 1)


class VolumeAttention(nn.Module):
    """Residual multi-head self-attention over all voxels (flattened in D, H, W order), channel-LN before.

    Output projection is kept as a 1x1x1 Conv3d parameter (the authors' layout) but applied as a linear on
    the token rows, which avoids reshaping the attention output back to a volume first.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * hidden, bias=False)
        self.to_out = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over all voxels, with a residual."""
        b, c, d, h, w = x.shape
        tokens = self.norm(x).movedim(1, -1).reshape(b, d * h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight)
        # Last-dim layout is (q|k|v, head, dim_head); the views below cost nothing.
        q, k, v = qkv.view(b, -1, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)  # default scale = dim_head ** -0.5
        o = o.transpose(1, 2).reshape(b, d * h * w, self.heads * self.dim_head)
        o = F.linear(o, self.to_out.weight.flatten(1), self.to_out.bias)
        return x + o.view(b, d, h, w, c).movedim(-1, 1).to(x.dtype)


def downsample(dim: int) -> nn.Conv3d:
    """Halve each spatial size: kernel 4, stride 2, padding 1."""
    return nn.Conv3d(dim, dim, 4, stride=2, padding=1)


def upsample(dim: int) -> nn.ConvTranspose3d:
    """Double each spatial size: transposed conv, kernel 4, stride 2, padding 1."""
    return nn.ConvTranspose3d(dim, dim, 4, stride=2, padding=1)


class UNetLevel(nn.Module):
    """One U-Net level: ResNet block, optional attention, ResNet block, optional attention, resampling.

    Down levels: res1(dim_in -> dim_out), res2(dim_out -> dim_out), attention width dim_out.
    Up levels take the skip concatenation: res1(2*dim_out -> dim_out), res2(2*dim_out -> dim_in), attention
    widths dim_out then dim_in. Absent parts are None (no parameters), like the authors' nn.Identity.
    """

    def __init__(self, res1: ResnetBlock, res2: ResnetBlock, attn1: Optional[nn.Module],
                 attn2: Optional[nn.Module], resample: Optional[nn.Module]) -> None:
        super().__init__()
        self.res1, self.attn1, self.res2, self.attn2, self.resample = res1, attn1, res2, attn2, resample

    @staticmethod
    def _maybe(module: Optional[nn.Module], x: Tensor) -> Tensor:
        return x if module is None else module(x)

    def first(self, x: Tensor, cond: Tensor) -> Tensor:
        """The level's first ResnetBlock (and attention, if any)."""
        return self._maybe(self.attn1, self.res1(x, cond))

    def second(self, x: Tensor, cond: Tensor) -> Tensor:
        """The level's second ResnetBlock (and attention, if any)."""
        return self._maybe(self.attn2, self.res2(x, cond))

    def apply_resample(self, x: Tensor) -> Tensor:
        """The level's down- or up-sampling (identity when it has none)."""
        return self._maybe(self.resample, x)
