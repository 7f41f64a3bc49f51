"""Tiny checkpoints in the authors' file formats, written from our tiny random networks.

* autoencoder: a PyTorch Lightning checkpoint (``state_dict`` with the training-only discriminator and LPIPS
  keys beside the autoencoder's, ``hyper_parameters['cfg']`` with the model section, optimizer states);
* BiFlowNet: ``{model, ema, scaler, opt, args, epoch}`` with ``args`` an ``argparse.Namespace`` and
  different ``model`` (training) and ``ema`` weights, as the authors save them.

The real authors' autoencoder keeps an OmegaConf config; the shared reference fixtures cover that variant.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from helpers import TINY_AE_CONFIG, TINY_DENOISER_CONFIG

__all__ = ["write_official_autoencoder", "write_official_biflownet", "tiny_denoiser_config"]


def tiny_denoiser_config(patch_size: int = 1) -> dict:
    return {**TINY_DENOISER_CONFIG, "patch_size": patch_size}


def write_official_autoencoder(path: str | os.PathLike[str], downsample: int = 4, seed: int = 0,
                               config: dict | None = None) -> Path:
    """``config`` overrides the tiny one (e.g. the official widths for a full-size file)."""
    from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder

    cfg = {**TINY_AE_CONFIG, "downsample": downsample, **(config or {})}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ae = PatchVolumeAutoencoder(**cfg)
    finally:
        torch.random.set_rng_state(state)
    sd = dict(ae.state_dict())
    sd["volume_discriminator.conv1.weight"] = torch.zeros(4, 1, 4, 4, 4)
    sd["perceptual_loss.net.slice1.0.weight"] = torch.zeros(8, 3, 3, 3)
    model_cfg = {"n_hiddens": cfg["n_hiddens"], "downsample": [downsample] * 3, "embedding_dim": cfg["embedding_dim"],
                 "n_codes": cfg["n_codes"], "num_groups": cfg["num_groups"], "lr": 3e-4}
    ckpt = {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.9.0", "state_dict": sd,
            "hyper_parameters": {"cfg": {"model": model_cfg, "dataset": {"image_channels": 1}}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 3e-4}]}],
            "lr_schedulers": []}
    torch.save(ckpt, path)
    return Path(path)


def write_official_biflownet(path: str | os.PathLike[str], patch_size: int = 1, seed: int = 0,
                             config: dict | None = None, with_optimizer: bool = True, pad_bytes: int = 0) -> Path:
    """``config`` overrides the tiny one (e.g. a wider ``dim`` for a mid-size file); ``pad_bytes`` adds that much
    optimizer state (a bigger file, same network)."""
    from MedDiffusionLib.models.biflownet import BiFlowNet

    cfg = {**tiny_denoiser_config(patch_size), **(config or {})}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ema = BiFlowNet(**cfg).official_state_dict()
        train = {k: v + 0.01 for k, v in ema.items()}  # the training weights differ from the EMA on purpose
    finally:
        torch.random.set_rng_state(state)
    args = argparse.Namespace(model_dim=cfg["dim"], volume_channels=cfg["channels"], dim_mults=list(cfg["dim_mults"]),
                              use_attn=list(cfg["use_attn"]), patch_size=cfg["patch_size"],
                              num_dit=cfg["num_mid_dit"], num_classes=cfg["num_classes"], vq_size=cfg["vq_size"],
                              resnet_groups=cfg["resnet_groups"], DiT_num_heads=cfg["dit_num_heads"],
                              attn_heads=cfg["attn_heads"], lr=1e-4, batch_size=2)
    opt = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                     for i, v in enumerate(ema.values())} if with_optimizer else {},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(len(ema)))}]}
    if pad_bytes:
        opt["state"][len(ema)] = {"exp_avg": torch.zeros(pad_bytes // 4)}
    torch.save({"model": train, "ema": ema, "scaler": {"scale": 65536.0}, "opt": opt, "args": args, "epoch": 3}, path)
    return Path(path)
