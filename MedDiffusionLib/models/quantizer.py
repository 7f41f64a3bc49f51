"""EMA vector quantizer (codebook) of the Patch-Volume autoencoder.

Buffers are named as in the authors' checkpoints (``embeddings``, ``N``, ``z_avg``). The nearest-code search
works in chunks, so a 64^3 latent against 8192 codes never builds an N x K distance or one-hot matrix.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Upper bound on the elements of one (chunk x K) distance block, whatever the latent size. On CPU a block that
# stays in cache (2^21 fp32 = 8 MiB) is about twice as fast as a large one; GPUs prefer fewer, larger launches.
DISTANCE_BLOCK_ELEMENTS_CPU = 1 << 21
DISTANCE_BLOCK_ELEMENTS_GPU = 1 << 25  # 128 MiB


class QuantizerOutput(NamedTuple):
    """The quantizer's output: straight-through latent, code indices, commitment loss and perplexity."""
    z_q: torch.Tensor  # (B, e, D, H, W) straight-through quantized latent (gradients flow to z)
    indices: torch.Tensor  # (B, D, H, W) int64 code indices
    commitment_loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar, of this batch's code usage


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _to_flat(z: torch.Tensor) -> torch.Tensor:
    """(B, e, *spatial) -> (N, e) with voxels in (B, D, H, W) order."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


class VectorQuantizer(nn.Module):
    """Codebook of ``n_codes`` vectors of size ``embedding_dim`` with EMA updates in training mode."""

    # Buffers registered in __init__, declared here so that the type checker sees tensors, not Tensor | Module.
    embeddings: torch.Tensor
    N: torch.Tensor
    z_avg: torch.Tensor
    _need_init: torch.Tensor

    def __init__(self, n_codes: int, embedding_dim: int, decay: float = 0.99, eps: float = 1e-5,
                 restart_threshold: float = 1.0, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.n_codes = int(n_codes)
        self.embedding_dim = int(embedding_dim)
        self.decay = float(decay)
        self.eps = float(eps)
        self.restart_threshold = float(restart_threshold)
        self.commitment_weight = float(commitment_weight)
        self.register_buffer("embeddings", torch.randn(self.n_codes, self.embedding_dim))
        self.register_buffer("N", torch.zeros(self.n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        # Not persistent: official checkpoints have no such key. Loading any `embeddings` clears it (see below).
        self.register_buffer("_need_init", torch.tensor(True), persistent=False)

    # ----------------------------------------------------------------- state handling
    @property
    def need_init(self) -> bool:
        """Whether the codebook still waits for its data initialisation (first training batch)."""
        return bool(self._need_init.item())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "embeddings" in state_dict:
            # Loaded weights are a trained (or deliberately set) codebook: never data-initialise over them.
            self._need_init.fill_(False)

    def extra_repr(self) -> str:
        """Sizes and EMA settings, for print(model)."""
        return (f"n_codes={self.n_codes}, embedding_dim={self.embedding_dim}, decay={self.decay}, "
                f"restart_threshold={self.restart_threshold}")

    # ----------------------------------------------------------------- search
    def _block_rows(self, device: torch.device | None = None) -> int:
        dev = device if device is not None else self.embeddings.device
        budget = DISTANCE_BLOCK_ELEMENTS_CPU if dev.type == "cpu" else DISTANCE_BLOCK_ELEMENTS_GPU
        return max(1, budget // self.n_codes)

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of ``flat`` (N, e), chunk by chunk."""
        if flat.ndim != 2 or flat.shape[1] != self.embedding_dim:
            raise ValueError(f"expected (N, {self.embedding_dim}) vectors, got {tuple(flat.shape)}")
        emb = self.embeddings.float()
        emb_sq = emb.pow(2).sum(1)  # (K,)
        rows = chunk_size or self._block_rows(flat.device)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows].float()
            # ||z||^2 - 2 z.E^T + ||E||^2 (the ||z||^2 term kept so ties resolve like a full-distance argmin)
            dist = torch.addmm(emb_sq.unsqueeze(0), part, emb.t(), beta=1.0, alpha=-2.0)
            dist.add_(part.pow(2).sum(1, keepdim=True))
            out[start:start + rows] = dist.argmin(1)
            del dist  # free before the next block is allocated: one block alive at a time
        return out

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an index volume (B, D, H, W) -> (B, e, D, H, W)."""
        return F.embedding(indices, self.embeddings).movedim(-1, 1)

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference quantization without any state change: (z_q, indices); z is (B, e, *spatial)."""
        self._check(z)
        idx = self.nearest(_to_flat(z)).view(z.shape[0], *z.shape[2:])
        return self.embed(idx).to(z.dtype), idx

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected a latent (B, {self.embedding_dim}, ...), got {tuple(z.shape)}")

    # ----------------------------------------------------------------- training
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize with straight-through gradients; in training mode also update the codebook (EMA)."""
        self._check(z)
        flat = _to_flat(z)
        if self.training and self.need_init:
            self._data_init(flat.detach())
        idx = self.nearest(flat.detach())
        z_q = self.embed(idx.view(z.shape[0], *z.shape[2:])).to(z.dtype)
        commitment = self.commitment_weight * F.mse_loss(z, z_q.detach())
        counts = torch.bincount(idx, minlength=self.n_codes).to(torch.float32)
        if self.training:
            self._ema_update(flat.detach().float(), idx, counts)
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        z_st = z + (z_q - z).detach()
        return QuantizerOutput(z_st, idx.view(z.shape[0], *z.shape[2:]), commitment, perplexity)

    @torch.no_grad()
    def _random_vectors(self, flat: torch.Tensor) -> torch.Tensor:
        """K random encoder outputs; tiled (with a small jitter, so copies differ) when fewer than K."""
        n = flat.shape[0]
        if n >= self.n_codes:
            pick = torch.randperm(n, device=flat.device)[: self.n_codes]
            out = flat[pick].float()
        else:
            reps = math.ceil(self.n_codes / n)
            pick = torch.cat([torch.randperm(n, device=flat.device) for _ in range(reps)])[: self.n_codes]
            out = flat[pick].float()
            out = out + torch.randn_like(out) * (0.01 / math.sqrt(self.embedding_dim))
        if _dist_ready():
            # All ranks must take rank 0's choice or their codebooks diverge.
            torch.distributed.broadcast(out, src=0)
        return out

    @torch.no_grad()
    def _data_init(self, flat: torch.Tensor) -> None:
        init = self._random_vectors(flat).to(self.embeddings.dtype)
        self.embeddings.copy_(init)
        self.z_avg.copy_(init)
        self.N.fill_(1.0)
        self._need_init.fill_(False)

    def smoothed_counts(self) -> torch.Tensor:
        """Laplace-smoothed EMA counts (same total as N, never zero)."""
        total = self.N.sum()
        return (self.N + self.eps) / (total + self.n_codes * self.eps) * total

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        # Per-code sums by scatter-add: no (N x K) one-hot matrix.
        sums = torch.zeros(self.n_codes, self.embedding_dim, device=flat.device, dtype=torch.float32)
        sums.index_add_(0, idx, flat)
        if _dist_ready():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        d = self.decay
        self.N.mul_(d).add_(counts.to(self.N.dtype), alpha=1.0 - d)
        self.z_avg.mul_(d).add_(sums.to(self.z_avg.dtype), alpha=1.0 - d)
        weights = self.smoothed_counts()
        self.embeddings.copy_(self.z_avg / weights.unsqueeze(1))
        if self.restart_threshold > 0:
            self._restart_dead(flat, weights)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, weights: torch.Tensor) -> None:
        dead = weights < self.restart_threshold
        # N is all-reduced, so `dead` agrees across ranks and all of them (or none) reach the broadcast.
        if not bool(dead.any()):
            return
        candidates = self._random_vectors(flat).to(self.embeddings.dtype)
        mask = dead.unsqueeze(1)
        self.embeddings.copy_(torch.where(mask, candidates, self.embeddings))
        # Why also z_avg: embeddings are recomputed as z_avg / count on the next step; scaling the new code by
        # the current count keeps the restart from being undone at once (the authors reset embeddings only).
        self.z_avg.copy_(torch.where(mask, candidates * weights.unsqueeze(1), self.z_avg))
