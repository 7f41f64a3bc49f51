"""A 3D feature network for distribution metrics (Frechet distance, MMD) that needs no download.

No pretrained 3D feature network (Med3D/MedicalNet, I3D...) can be fetched offline, so the features come from the
encoder of a Patch-Volume autoencoder whose weights we have (for the README: the bundled demo autoencoder): the
global average and standard deviation of every encoder level's activations. Numbers computed with it compare models
*within this project*; they are not FID values comparable with published ones.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.autoencoder import PatchVolumeAutoencoder


class AutoencoderFeatures:
    """Callable volume (Z, X, Y) in [-1, 1] -> feature vector (mean and std of each encoder level, concatenated)."""

    def __init__(self, autoencoder: PatchVolumeAutoencoder, device: str | torch.device = "cpu") -> None:
        self.encoder = autoencoder.encoder.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, volume: np.ndarray | torch.Tensor) -> np.ndarray:
        """The feature vector of one (Z, X, Y) volume in [-1, 1]."""
        x = torch.as_tensor(np.asarray(volume, np.float32), device=self.device)[None, None]
        h = self.encoder.conv_first(x)
        feats = []
        for block in self.encoder.conv_blocks:
            h = block(h)
            feats += [h.mean(dim=(2, 3, 4)), h.std(dim=(2, 3, 4))]
        h = self.encoder.mid_block(h)
        feats += [h.mean(dim=(2, 3, 4)), h.std(dim=(2, 3, 4))]
        return torch.cat(feats, dim=1)[0].cpu().numpy()
