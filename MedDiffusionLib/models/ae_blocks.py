"""Building blocks of the Patch-Volume autoencoder (encoder and joint decoder).

Attribute names equal the authors' state-dict key names (``conv_blocks.N.res1``, ``mid_block.attn.to_qkv``,
``up.conv_trans``, ``resConv`` ...) so their checkpoints load without a key mapping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

# The authors' autoencoder uses GroupNorm eps 1e-6 everywhere (not PyTorch's default 1e-5).
GROUPNORM_EPS = 1e-6
ATTN_HEADS = 4
ATTN_DIM_HEAD = 32


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the autoencoder's epsilon; ValueError unless ``num_groups`` divides ``channels``."""
    if channels % num_groups != 0:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
    return nn.GroupNorm(num_groups, channels, eps=GROUPNORM_EPS, affine=True)


def conv3(in_ch: int, out_ch: int) -> nn.Conv3d:
    """3x3x3 convolution, stride 1, padding 1 (sizes unchanged)."""
    return nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)


class ResBlock(nn.Module):
    """norm, SiLU, conv3, norm, SiLU, conv3, plus the input (through a 1x1x1 conv when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = conv3(in_ch, out_ch)
        self.norm2 = group_norm(out_ch, num_groups)
        self.conv2 = conv3(out_ch, out_ch)
        # Only created when needed: the official checkpoints have `resConv` keys only where channels change.
        self.resConv = nn.Conv3d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    @property
    def skip(self) -> Optional[nn.Module]:
        """The 1x1x1 convolution on the residual path, or None for the identity."""
        return self.resConv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + convolutions of x, both after GroupNorm and SiLU."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.resConv(x) if self.resConv is not None else x
        return skip + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels (flattened in D, H, W order), GroupNorm before, residual."""

    def __init__(self, channels: int, num_groups: int, heads: int = ATTN_HEADS,
                 dim_head: int = ATTN_DIM_HEAD) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm = group_norm(channels, num_groups)
        self.to_qkv = nn.Linear(channels, 3 * inner, bias=False)
        self.to_out = nn.Conv3d(inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
        """`query_chunk` bounds memory on large volumes: queries in chunks, keys and values computed once, no
        (N, 3*inner) qkv tensor. The result equals the one-pass path up to float rounding."""
        b, _, d, h, w = x.shape
        n = d * h * w
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if query_chunk is not None and query_chunk < n:
            return self._chunked(x, tokens, max(1, int(query_chunk)))
        qkv = self.to_qkv(tokens).view(b, n, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, dim_head)
        # SDPA picks a memory-efficient kernel: the 4x model attends over 16^3 = 4096 tokens per patch.
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)
        out = out.permute(0, 1, 3, 2).reshape(b, self.heads * self.dim_head, d, h, w)
        return x + self.to_out(out)

    def _chunked(self, x: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
        b, n = tokens.shape[:2]
        inner = self.heads * self.dim_head
        w_q, w_k, w_v = self.to_qkv.weight.split(inner)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, inner) -> (B, heads, L, dim_head)
            return t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)

        k, v = heads(F.linear(tokens, w_k)), heads(F.linear(tokens, w_v))
        w_out = self.to_out.weight.flatten(1)  # the 1x1x1 conv as a linear map
        out = torch.empty_like(x, memory_format=torch.contiguous_format)  # flatten(2) must be a view to write into
        x_flat, out_flat = x.flatten(2), out.flatten(2)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            q = heads(F.linear(tokens[:, start:stop], w_q))
            o = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)
            o = F.linear(o.transpose(1, 2).reshape(b, stop - start, inner), w_out, self.to_out.bias)
            out_flat[:, :, start:stop] = x_flat[:, :, start:stop] + o.transpose(1, 2)
        return out


class MidBlock(nn.Module):
    """ResBlock, whole-volume attention, ResBlock: the part of each autoencoder side that sees the whole latent."""
    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, num_groups)
        self.attn = AttentionBlock(channels, num_groups)
        self.res2 = ResBlock(channels, channels, num_groups)

    def forward(self, x: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
        """The middle block; ``query_chunk`` bounds the attention's memory (see AttentionBlock)."""
        return self.res2(self.attn(self.res1(x), query_chunk))


class EncoderLevel(nn.Module):
    """Two ResBlocks, then (except at the last level) a stride-2 k4 conv halving every spatial dim."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, downsample: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(in_ch, out_ch, num_groups)
        self.res2 = ResBlock(out_ch, out_ch, num_groups)
        self.down: nn.Module = (nn.Conv3d(out_ch, out_ch, kernel_size=4, stride=2, padding=1)
                                if downsample else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two ResBlocks, then the down-sampling (or identity at the last level)."""
        return self.down(self.res2(self.res1(x)))


class Upsample(nn.Module):
    """Stride-2 k4 transposed conv doubling every spatial dim (a wrapper so the key is `up.conv_trans`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_trans = nn.ConvTranspose3d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Double every spatial size."""
        return self.conv_trans(x)


class DecoderLevel(nn.Module):
    """Two ResBlocks, then a transposed-convolution up-sampling (identity at the last level)."""
    def __init__(self, in_ch: int, out_ch: int, num_groups: int, upsample: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(in_ch, out_ch, num_groups)
        self.res2 = ResBlock(out_ch, out_ch, num_groups)
        self.up: nn.Module = Upsample(out_ch) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two ResBlocks, then the up-sampling."""
        return self.up(self.res2(self.res1(x)))


def level_channels(n_hiddens: int, n_levels: int) -> list[int]:
    """Output channels of the encoder levels: doubling per level, capped at the deepest (n_levels+1 levels).

    Official 8x: [48, 96, 192, 192]; 4x: [48, 96, 96]. The decoder uses the reverse.
    """
    return [n_hiddens * 2 ** min(i, n_levels - 1) for i in range(n_levels + 1)]


class Encoder(nn.Module):
    """Patch encoder: (B, C, D, H, W) image -> (B, embedding_dim, D/f, H/f, W/f) continuous latent."""
    def __init__(self, n_hiddens: int, n_levels: int, embedding_dim: int, num_groups: int,
                 image_channels: int) -> None:
        super().__init__()
        chans = level_channels(n_hiddens, n_levels)
        self.conv_first = conv3(image_channels, n_hiddens)
        ins = [n_hiddens] + chans[:-1]
        self.conv_blocks = nn.ModuleList(
            EncoderLevel(ci, co, num_groups, downsample=i < n_levels) for i, (ci, co) in enumerate(zip(ins, chans)))
        self.mid_block = MidBlock(chans[-1], num_groups)
        self.final_block = nn.Sequential(group_norm(chans[-1], num_groups), nn.SiLU(), conv3(chans[-1], embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode an image (patch) to its continuous latent."""
        h = self.conv_first(x)
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(self.mid_block(h))


Normalize = Callable[[nn.GroupNorm, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TailLayer:
    """One layer of the decoder after its head, with at most one GroupNorm, at its start.

    ``y = conv(silu(norm(x))) [+ skip(r)]`` for the two halves of a ResBlock and the final block, ``y = conv(x)``
    for an up-sampling. The layers map the tail's tensors T_0 (the head's output) ... T_n (the volume): layer i
    computes T_{i+1} from T_i and, for the second half of a ResBlock, adds the residual T_{residual} (the block's
    input, through `skip` when the channel count changes). A tiler can run each layer on any crop of its input,
    with GroupNorm statistics of its choosing (`normalize`), because nothing else in a layer mixes voxels.
    """

    conv: Union[nn.Conv3d, nn.ConvTranspose3d]  # stride 1, or the transposed up-sampling conv
    norm: Optional[nn.GroupNorm] = None
    residual: Optional[int] = None     # index of the tail tensor added to the conv's output
    skip: Optional[nn.Module] = None   # 1x1x1 conv applied to that residual; None: identity

    @property
    def in_channels(self) -> int:
        """Input channels of the layer's convolution."""
        return int(self.conv.in_channels)

    @property
    def out_channels(self) -> int:
        """Output channels of the layer's convolution."""
        return int(self.conv.out_channels)

    @property
    def padding(self) -> tuple[int, int, int]:
        """The convolution's zero padding per axis (decoder convolutions never use string padding like 'same')."""
        pad = self.conv.padding
        if isinstance(pad, str):
            raise ValueError(f"a decoder layer needs explicit padding, not {pad!r}")
        return int(pad[0]), int(pad[1]), int(pad[2])

    @property
    def upsampling(self) -> int:
        """Spatial factor from input to output (2 for the transposed convolutions, else 1)."""
        return int(self.conv.stride[0]) if isinstance(self.conv, nn.ConvTranspose3d) else 1

    def pre(self, x: torch.Tensor, normalize: Optional[Normalize] = None) -> torch.Tensor:
        """What the convolution sees: silu(norm(x)) (norm replaced by `normalize` if given), or x."""
        if self.norm is None:
            return x
        return F.silu(normalize(self.norm, x) if normalize is not None else self.norm(x))

    def post(self, y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution's output plus the (skipped) residual, when the layer has one."""
        if self.residual is None:
            return y
        if residual is None:
            raise ValueError("this decoder layer adds a residual; pass the block's input")
        return (self.skip(residual) if self.skip is not None else residual) + y

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 normalize: Optional[Normalize] = None) -> torch.Tensor:
        """The layer on a whole tensor: post(conv(pre(x))), with the residual when the layer adds one."""
        return self.post(self.conv(self.pre(x, normalize)), residual)


class Decoder(nn.Module):
    """Joint decoder: quantized latent -> image, as `head` (whole latent, attention) then `tail` (local layers)."""
    def __init__(self, n_hiddens: int, n_levels: int, embedding_dim: int, num_groups: int,
                 image_channels: int) -> None:
        super().__init__()
        chans = level_channels(n_hiddens, n_levels)[::-1]
        self.conv_first = conv3(embedding_dim, chans[0])
        self.mid_block = MidBlock(chans[0], num_groups)
        ins = [chans[0]] + chans[:-1]
        self.conv_blocks = nn.ModuleList(
            DecoderLevel(ci, co, num_groups, upsample=i < n_levels) for i, (ci, co) in enumerate(zip(ins, chans)))
        self.final_block = nn.Sequential(group_norm(chans[-1], num_groups), nn.SiLU(), conv3(chans[-1], image_channels))

    @property
    def head_attention(self) -> AttentionBlock:
        """The decoder's only attention (at the latent resolution, inside the head)."""
        return self.mid_block.attn

    def head(self, z: torch.Tensor, query_chunk: Optional[int] = None) -> torch.Tensor:
        """conv_first and the middle block (with the attention, queries in chunks if given): the part of the
        decoder that must see the whole latent at once. Its output is the tail's input T_0."""
        return self.mid_block(self.conv_first(z), query_chunk)

    def tail(self) -> list[TailLayer]:
        """The rest of the decoder as layers with at most one GroupNorm each (see TailLayer); running them in
        order on `head(z)` is `forward(z)`."""
        layers: list[TailLayer] = []
        for level in cast("list[DecoderLevel]", self.conv_blocks):
            for res in (level.res1, level.res2):
                start = len(layers)  # index of the block's input tensor
                layers.append(TailLayer(res.conv1, res.norm1))
                layers.append(TailLayer(res.conv2, res.norm2, residual=start, skip=res.skip))
            if isinstance(level.up, Upsample):
                layers.append(TailLayer(level.up.conv_trans))
        norm, _, conv = self.final_block  # GroupNorm, SiLU, Conv3d (built in __init__)
        layers.append(TailLayer(cast(nn.Conv3d, conv), cast(nn.GroupNorm, norm)))
        return layers

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent in one pass (tiled, memory-bounded decoding: pipelines.decode)."""
        h = self.head(z)
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(h)
