"""Patch-Volume VQ autoencoder of 3D MedDiffusion.

The encoder sees non-overlapping patches (64^3 in the official models) and the latents are tiled back; the
joint decoder works on the whole latent, which removes the seams a patch-wise decoder would leave. Module
attribute names equal the authors' key names, so their state dicts load as they are.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import torch
from torch import nn

from MedDiffusionLib.errors import CheckpointError, InputError
from MedDiffusionLib.models.ae_blocks import Decoder, Encoder
from MedDiffusionLib.models.quantizer import VectorQuantizer

# Training-only parts of the authors' Lightning module that inference never needs.
IGNORED_OFFICIAL_PREFIXES = ("volume_discriminator.", "perceptual_loss.")


def _format_key_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


class PatchVolumeAutoencoder(nn.Module):
    """Encoder -> pre_vq_conv -> codebook -> post_vq_conv -> joint decoder."""

    def __init__(self, n_hiddens: int = 48, downsample: int = 8, embedding_dim: int = 8, n_codes: int = 8192,
                 num_groups: int = 24, image_channels: int = 1) -> None:
        super().__init__()
        downsample = int(downsample)
        if downsample < 2 or downsample & (downsample - 1):
            raise InputError(f"autoencoder downsample must be a power of two >= 2, got {downsample}")
        self.config: dict[str, int] = dict(n_hiddens=int(n_hiddens), downsample=downsample,
                                           embedding_dim=int(embedding_dim), n_codes=int(n_codes),
                                           num_groups=int(num_groups), image_channels=int(image_channels))
        self.downsample = downsample
        self.embedding_dim = int(embedding_dim)
        self.image_channels = int(image_channels)
        n_levels = int(math.log2(downsample))
        self.encoder = Encoder(n_hiddens, n_levels, embedding_dim, num_groups, image_channels)
        self.decoder = Decoder(n_hiddens, n_levels, embedding_dim, num_groups, image_channels)
        self.pre_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, kernel_size=1)
        self.post_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, kernel_size=1)
        self.codebook = VectorQuantizer(n_codes, embedding_dim)

    # ----------------------------------------------------------------- encoding
    def _patch_shape(self, spatial: tuple[int, ...], patch_size: int) -> tuple[int, int, int]:
        """Per-dim patch size: `patch_size`, or the whole dim when the volume is smaller than a patch."""
        f = self.downsample
        patch_size = int(patch_size)
        if patch_size <= 0 or patch_size % f:
            raise InputError(f"patch size {patch_size} must be a positive multiple of the downsample factor {f}")
        patch = []
        for axis, n in zip("DHW", spatial):
            if n >= patch_size and n % patch_size == 0:
                patch.append(patch_size)
            elif 0 < n < patch_size and n % f == 0:
                patch.append(n)
            else:
                raise InputError(
                    f"volume size (D,H,W)={tuple(spatial)} does not fit the {patch_size}^3 encoder patches: "
                    f"dimension {axis}={n} must be a multiple of {patch_size} (or smaller than {patch_size} and "
                    f"a multiple of {f}); pad or crop the volume first")
        return patch[0], patch[1], patch[2]

    def _check_volume(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != self.image_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected a volume tensor (B, {self.image_channels}, D, H, W), got {shape}")
        if x.numel() == 0:
            raise InputError(f"the volume is empty: shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, patch_size: int = 64, patches_per_batch: int = 4) -> torch.Tensor:
        """Continuous latent (B, e, D/f, H/f, W/f) after pre_vq_conv, encoded patch by patch.

        Patches are gathered `patches_per_batch` at a time straight from `x`, so peak memory is that of a few
        patches plus the output, whatever the volume size.
        """
        self._check_volume(x)
        b = x.shape[0]
        pd, ph, pw = self._patch_shape(tuple(x.shape[2:]), patch_size)
        f = self.downsample
        grid = [range(0, n, p) for n, p in zip(x.shape[2:], (pd, ph, pw))]
        origins = [(i, *o) for i in range(b) for o in itertools.product(*grid)]
        out: torch.Tensor | None = None
        step = max(1, int(patches_per_batch))
        for start in range(0, len(origins), step):
            chunk = origins[start:start + step]
            patches = torch.stack([x[i, :, d:d + pd, h:h + ph, w:w + pw] for i, d, h, w in chunk])
            z = self.pre_vq_conv(self.encoder(patches))
            if out is None:
                out = z.new_empty(b, z.shape[1], x.shape[2] // f, x.shape[3] // f, x.shape[4] // f)
            for zp, (i, d, h, w) in zip(z, chunk):
                out[i, :, d // f:(d + pd) // f, h // f:(h + ph) // f, w // f:(w + pw) // f] = zp
        assert out is not None
        return out

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes for a continuous latent: (z_q (B,e,D,H,W), indices (B,D,H,W)); no codebook update."""
        if z.ndim != 5 or z.shape[1] != self.embedding_dim:
            raise InputError(f"expected a latent (B, {self.embedding_dim}, D, H, W), got {tuple(z.shape)}")
        return self.codebook.lookup(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Joint decoder on the whole (quantized) latent; memory grows with the volume (tile it outside)."""
        if z_q.ndim != 5 or z_q.shape[1] != self.embedding_dim:
            raise InputError(f"expected a latent (B, {self.embedding_dim}, D, H, W), got {tuple(z_q.shape)}")
        return self.decoder(self.post_vq_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode a code-index volume (B, D, H, W)."""
        return self.decode(self.codebook.embed(indices))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step on patches: the whole input is one patch; straight-through quantization.

        Returns reconstruction, commitment_loss, perplexity, encodings (code indices), latent (continuous),
        latent_quantized (straight-through).
        """
        self._check_volume(x)
        if any(n % self.downsample for n in x.shape[2:]):
            raise InputError(f"training patch size {tuple(x.shape[2:])} must be a multiple of {self.downsample}")
        z = self.pre_vq_conv(self.encoder(x))
        q = self.codebook(z)
        recon = self.decode(q.z_q)
        return dict(reconstruction=recon, commitment_loss=q.commitment_loss, perplexity=q.perplexity,
                    encodings=q.indices, latent=z, latent_quantized=q.z_q)

    # ----------------------------------------------------------------- weights
    def codebook_range(self) -> tuple[float, float]:
        """Global min and max of the codebook entries (used to scale diffusion latents to [-1, 1])."""
        emb = self.codebook.embeddings
        return float(emb.min().item()), float(emb.max().item())

    def load_official_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load weights in the authors' key names; discriminator/perceptual keys are ignored, all else strict."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_OFFICIAL_PREFIXES)}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in sd)
        unexpected = sorted(k for k in sd if k not in own)
        mismatched = sorted(f"{k}: checkpoint {_describe(v)} vs model {tuple(own[k].shape)}"
                            for k, v in sd.items()
                            if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape))
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"missing keys ({len(missing)}): {_format_key_list(missing)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {_format_key_list(unexpected)}")
            if mismatched:
                parts.append(f"shape mismatches ({len(mismatched)}): {_format_key_list(mismatched)}")
            raise CheckpointError(
                f"checkpoint does not match the autoencoder {self.config}: " + "; ".join(parts))
        self.load_state_dict(sd, strict=True)
