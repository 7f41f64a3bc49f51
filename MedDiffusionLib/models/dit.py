"""Intra-patch flow of BiFlowNet: sub-volume tokens, 3D sin-cos positions, adaLN-Zero DiT blocks, final layer.

Token layout used throughout: (B, L, C) with L = G * N, where G is the number of sub-volumes of one latent
(row-major over the sub-volume grid) and N the number of patches inside one sub-volume (row-major too).
Attention only mixes the N tokens of one sub-volume; everything else (norms, MLPs, modulation) is per token,
so the condition vector is applied per sample and broadcast over all L tokens instead of being repeated G
times as the authors do (same numbers, G times less modulation work and memory).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Triple = Tuple[int, int, int]


def sincos_pos_table_3d(dim: int, grid: Sequence[int]) -> Tensor:
    """Fixed (N, dim) position table for a (g0, g1, g2) grid: dim/3 channels per axis, each half sin half cos.

    Frequencies 1 / 10000^(i / (dim/6)); the per-axis blocks are concatenated in axis order and the grid is
    flattened row-major (the order of the patch-embedding conv output). Computed in float64 on the CPU.
    """
    if dim % 6:
        raise ValueError(f"DiT width must be a multiple of 6 for the 3D sin-cos table, got {dim}")
    axis_dim = dim // 3
    omega = 1.0 / 10000 ** (torch.arange(axis_dim // 2, dtype=torch.float64, device="cpu") / (axis_dim / 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64, device="cpu") for g in grid], indexing="ij")
    parts = []
    for axis in coords:
        arg = axis.reshape(-1, 1) * omega[None, :]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1).float()


def volume_to_tokens(feat: Tensor, grid: Triple) -> Tensor:
    """(B, C, D, H, W) patch-embedded latent -> (B, G*N, C) tokens grouped by sub-volume."""
    g1, g2, g3 = grid
    return rearrange(feat, "b c (g1 n1) (g2 n2) (g3 n3) -> b (g1 g2 g3 n1 n2 n3) c", g1=g1, g2=g2, g3=g3)


def tokens_to_volume(tokens: Tensor, grid: Triple, per_sub: Triple, patch: int, channels_last: bool = True) -> Tensor:
    """(B, G*N, p^3*C) per-patch outputs -> (B, C, D, H, W) feature volume (one copy, either memory layout).

    Each token's features are laid out (p, p, p, C); sub-volumes are tiled back in row-major order.
    """
    g1, g2, g3 = grid
    n1, n2, n3 = per_sub
    sizes = dict(g1=g1, g2=g2, g3=g3, n1=n1, n2=n2, n3=n3, p=patch, q=patch, r=patch)
    src = "b (g1 g2 g3 n1 n2 n3) (p q r c)"
    if channels_last:
        return rearrange(tokens, f"{src} -> b (g1 n1 p) (g2 n2 q) (g3 n3 r) c", **sizes).movedim(-1, 1)
    return rearrange(tokens, f"{src} -> b c (g1 n1 p) (g2 n2 q) (g3 n3 r)", **sizes)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift with (B, C) modulation broadcast over the tokens of each sample."""
    return torch.addcmul(shift[:, None, :].to(x.dtype), x, (1.0 + scale[:, None, :]).to(x.dtype))


def _norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], None, None, 1e-6)


class DiTAttention(nn.Module):
    """Multi-head self-attention inside each sub-volume (fused qkv projection with bias)."""

    # Head sizes are zero-padded up to a multiple of this for the SDPA kernels (1 = no padding).
    pad_heads_to: int = 8

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"DiT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, group: int) -> Tensor:
        """Self-attention within groups of ``group`` consecutive tokens (one sub-volume each)."""
        b, length, c = x.shape
        heads = self.heads
        hd = c // heads
        # Pad the head size to a multiple of 8 with zero weight rows/columns (72/8 = 9 -> 16): identical result,
        # but the SDPA kernels (CPU flash, CUDA flash/cuDNN) run ~1.5x faster or become usable at all.
        hp = -(-hd // self.pad_heads_to) * self.pad_heads_to
        w_qkv: Tensor = self.qkv.weight
        b_qkv: Tensor = self.qkv.bias
        w_proj: Tensor = self.proj.weight
        if hp != hd:
            w_qkv = F.pad(w_qkv.view(3, heads, hd, c), (0, 0, 0, hp - hd)).view(3 * heads * hp, c)
            b_qkv = F.pad(b_qkv.view(3, heads, hd), (0, hp - hd)).view(3 * heads * hp)
            w_proj = F.pad(w_proj.view(c, heads, hd), (0, hp - hd)).view(c, heads * hp)
        qkv = F.linear(x, w_qkv, b_qkv).view(b * length // group, group, 3, heads, hp)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)
        return F.linear(o.transpose(1, 2).reshape(b, length, heads * hp), w_proj, self.proj.bias)


class DiTMlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """The two-layer GELU MLP of a DiT block."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# Rows (batch x tokens) per chunk on CPU. A 32^3 latent has 32768 tokens; measured here, the token matmuls cost
# ~2x more per row once an output exceeds ~32 MB (qkv with padded heads is 1.5 kB per token; likely glibc's mmap
# ceiling: such buffers are page-faulted afresh every call), so two chunks make the DiT blocks ~20% faster.
# Few, large chunks matter on shared machines, where every extra parallel region can wait on a busy core.
# GPUs run the whole sequence at once; 0 disables chunking.
CPU_TOKEN_CHUNK = 16384


def _chunk_len(x: Tensor, group: int) -> int:
    b, length = x.shape[:2]
    if x.device.type != "cpu" or CPU_TOKEN_CHUNK <= 0:
        return length
    return max(group, CPU_TOKEN_CHUNK // (b * group) * group)  # tokens per sample, whole sub-volumes only


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; with `skip=True` a long-skip input is concatenated and projected first."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, skip: bool = False) -> None:
        super().__init__()
        self.skip_proj = nn.Linear(2 * dim, dim) if skip else None
        self.attn = DiTAttention(dim, heads)
        self.mlp = DiTMlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: Tensor, cond: Tensor, group: int, skip: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, C) tokens, cond: (B, cond_dim), group: tokens per sub-volume (attention window)."""
        if (self.skip_proj is None) != (skip is None):
            raise ValueError("long-skip tokens must be given exactly to the output DiT blocks")
        mods = self.modulation(F.silu(cond)).chunk(6, dim=1)
        step = _chunk_len(x, group)
        if step >= x.shape[1]:
            return self._run(x, mods, group, skip)
        return torch.cat([self._run(x[:, i:i + step], mods, group, None if skip is None else skip[:, i:i + step])
                          for i in range(0, x.shape[1], step)], dim=1)

    def _run(self, x: Tensor, mods: Tuple[Tensor, ...], group: int, skip: Optional[Tensor]) -> Tensor:
        if self.skip_proj is not None and skip is not None:
            x = self.skip_proj(torch.cat((x, skip.to(x.dtype)), dim=-1))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        a = self.attn(_modulate(_norm(x), shift_a, scale_a), group)
        x = torch.addcmul(x, gate_a[:, None, :].to(a.dtype), a)
        m = self.mlp(_modulate(_norm(x), shift_m, scale_m))
        return torch.addcmul(x, gate_m[:, None, :].to(m.dtype), m)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to patch^3 * out_channels features per token."""

    def __init__(self, dim: int, patch: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, patch ** 3 * out_channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """adaLN-modulated projection of the tokens back to patch values."""
        shift, scale = self.modulation(F.silu(cond)).chunk(2, dim=1)
        return self.proj(_modulate(_norm(x), shift, scale))


class DiTStage(nn.Module):
    """A DiT block followed by its final layer: one fusion point between the two flows."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float, patch: int, skip: bool) -> None:
        super().__init__()
        self.block = DiTBlock(dim, heads, cond_dim, mlp_ratio, skip=skip)
        self.head = FinalLayer(dim, patch, dim, cond_dim)


def init_dit_weights(module: nn.Module) -> None:
    """The authors' init: xavier-uniform Linear weights with zero bias, adaLN and final projections zeroed."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.modulation.weight)
            nn.init.zeros_(m.modulation.bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
