"""Test utilities: tiny, randomly initialised model bundles that run in well under a second on a CPU.

Used by the checkpoint, pipeline, server and Slicer tests::

    from helpers import make_tiny_bundle
    folder = make_tiny_bundle(tmp_path)          # writes model.yaml + safetensors files
    bundle = load_bundle(folder)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from MedDiffusionLib.catalog import OFFICIAL_ANATOMIES, Anatomy, Catalog

# Small but structurally complete: 4x autoencoder (2 down levels), BiFlowNet with one U-Net down-sampling,
# two fusion levels, attention at the deepest level, 4^3 DiT sub-volumes.
TINY_AE_CONFIG: dict = dict(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4, image_channels=1)
TINY_DENOISER_CONFIG: dict = dict(dim=12, channels=4, num_classes=7, patch_size=1, dim_mults=(1, 1, 2),
                                  use_attn=(0, 0, 1), resnet_groups=4, dit_num_heads=2, attn_heads=2,
                                  attn_dim_head=8, sub_volume_size=4, num_mid_dit=1, vq_size=64)
TINY_ENCODE_PATCH = 16
# Latent sizes (D, H, W): volumes of 16^3 and 16x32x32 (Z x X x Y) voxels with the 4x autoencoder.
TINY_LATENT_SIZES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "ct-head-neck": ((4, 4, 4), (4, 8, 8)),
    "ct-chest-abdomen": ((4, 8, 8), (4, 4, 4)),
    "ct-legs": ((4, 4, 4),),
    "mr-t1-brain": ((4, 4, 4),),
    "mr-t2-brain": ((4, 4, 4),),
    "mr-abdomen": ((4, 8, 8),),
    "mr-knee": ((4, 8, 8),),
}


def tiny_catalog() -> Catalog:
    """The 7 official anatomies (names, classes, modalities, spacings) with tiny latent sizes."""
    return Catalog(Anatomy(a.name, a.class_index, a.modality, TINY_LATENT_SIZES[a.name], a.spacing_xyz,
                           a.description) for a in OFFICIAL_ANATOMIES)


def tiny_bundle(seed: int = 0, controlnets: bool = False, name: str = "tiny"):
    """An in-memory ModelBundle (no files), networks in eval mode on the CPU."""
    from MedDiffusionLib.checkpoints.bundle import ModelBundle
    from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
    from MedDiffusionLib.models.biflownet import BiFlowNet

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ae = PatchVolumeAutoencoder(**TINY_AE_CONFIG).eval()
        dn = BiFlowNet(**TINY_DENOISER_CONFIG).eval()
        nets = {}
        if controlnets:
            from MedDiffusionLib.models.controlnet import ControlNet

            for task in ("sparse-ct", "mri"):
                nets[task] = ControlNet.from_denoiser(dn, condition_channels=1,
                                                      image_downsample=TINY_AE_CONFIG["downsample"]).eval()
    finally:
        torch.random.set_rng_state(gen_state)  # do not disturb the caller's random stream
    lo, hi = ae.codebook_range()
    return ModelBundle(autoencoder=ae, denoiser=dn, catalog=tiny_catalog(), latent_range=(lo, hi),
                       downsample=TINY_AE_CONFIG["downsample"], encode_patch_size=TINY_ENCODE_PATCH,
                       controlnets=nets, name=name)


def make_tiny_bundle(folder: str | os.PathLike[str], seed: int = 0, controlnets: bool = False,
                     name: str = "tiny") -> Path:
    """Write a tiny random bundle into ``folder`` (created if missing); returns the folder."""
    from MedDiffusionLib.checkpoints.bundle import save_bundle

    return save_bundle(tiny_bundle(seed, controlnets, name), folder)
