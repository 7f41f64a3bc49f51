"""3D patch discriminator and the GAN losses used to train the Patch-Volume autoencoder.

The official autoencoder is trained against a hinge-loss 3D patch discriminator (32 base channels, 3 strided
layers, BatchNorm) and a feature-matching loss on the discriminator's intermediate activations. Layout
follows the pix2pixHD "N-layer" discriminator: kernel 4, padding 2, LeakyReLU(0.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchDiscriminator3D", "hinge_d_loss", "hinge_g_loss", "feature_matching_loss"]

_KERNEL = 4
_PAD = 2  # ceil((kernel - 1) / 2), as in the pix2pixHD discriminator


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm '{kind}' (use batch, instance or none)")


class PatchDiscriminator3D(nn.Module):
    """Fully convolutional 3D discriminator returning per-patch logits and the intermediate features.

    ``n_layers`` stride-2 convolutions (the first without normalisation), then one stride-1 block and a
    stride-1 convolution to one logit channel. ``forward`` returns ``(logits, features)`` where ``features``
    are the outputs of every block before the logits (used by the feature-matching loss).
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, n_layers: int = 3, norm: str = "batch",
                 max_channels: int = 512) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        self.config = {"in_channels": in_channels, "channels": channels, "n_layers": n_layers, "norm": norm,
                       "max_channels": max_channels}
        blocks: list[nn.Module] = [nn.Sequential(
            nn.Conv3d(in_channels, channels, _KERNEL, stride=2, padding=_PAD), nn.LeakyReLU(0.2, True))]
        nf = channels
        for _ in range(1, n_layers):
            prev, nf = nf, min(nf * 2, max_channels)
            blocks.append(nn.Sequential(nn.Conv3d(prev, nf, _KERNEL, stride=2, padding=_PAD), _norm(norm, nf),
                                        nn.LeakyReLU(0.2, True)))
        prev, nf = nf, min(nf * 2, max_channels)
        blocks.append(nn.Sequential(nn.Conv3d(prev, nf, _KERNEL, stride=1, padding=_PAD), _norm(norm, nf),
                                    nn.LeakyReLU(0.2, True)))
        blocks.append(nn.Conv3d(nf, 1, _KERNEL, stride=1, padding=_PAD))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits of ``x`` and the features of every earlier block (for the feature-matching loss)."""
        feats: list[torch.Tensor] = []
        h = x
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return feats[-1], feats[:-1]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]): zero once real > 1 and fake < -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(fake)]."""
    return -logits_fake.mean()


def feature_matching_loss(feats_fake: list[torch.Tensor], feats_real: list[torch.Tensor],
                          n_layers: int | None = None) -> torch.Tensor:
    """Sum of L1 distances between discriminator features of fake and (detached) real inputs.

    Each layer is weighted 4 / (n_layers + 1) as in the authors' VQ-GAN code, so the total is comparable
    across discriminator depths.
    """
    if len(feats_fake) != len(feats_real):
        raise ValueError("feature lists differ in length")
    layers = len(feats_fake) - 1 if n_layers is None else n_layers
    weight = 4.0 / (layers + 1)
    total = feats_fake[0].new_zeros(())
    for f, r in zip(feats_fake, feats_real):
        total = total + weight * F.l1_loss(f, r.detach())
    return total
