"""Patch-Volume autoencoder training (stage 1: patches, full VQ-GAN losses; stage 2: decoder on whole volumes).

Stage 1 (the authors' recipe): random 64^3 patches, L1 x4 + commitment + tri-plane LPIPS x2, and from
``disc_start`` a hinge-loss 3D patch discriminator x2 with feature matching x4; Adam 3e-4, betas (0.5, 0.9)
for both networks. Stage 2 freezes encoder, pre_vq_conv and codebook and fine-tunes decoder + post_vq_conv on
whole volumes (random crop above ``max_voxels``), lr 3e-5, batch 1. Output: ``<out>/autoencoder.safetensors``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.models.discriminator import PatchDiscriminator3D, feature_matching_loss, hinge_g_loss
from MedDiffusionLib.models.perceptual import TriplanePerceptualLoss, missing_vgg_message
from Training.stages._common import (build_model, build_volume_dataset, device_batch, export_network,
                                     load_network_any, out_dir, set_requires_grad, training_checkpoint_state)
from MedDiffusionLib.pipelines.distributed import WorldInfo
from Training.trainer import EMA, Trainer, seed_all, wrap_ddp

DESCRIPTION = "train the Patch-Volume autoencoder (--stage 1: patches + GAN; --stage 2: decoder on whole volumes)"
log = logging.getLogger("meddiffusion.train")

_LOSS_DEFAULTS: dict[str, Any] = dict(l1_weight=4.0, commitment_weight=1.0, perceptual_weight=2.0,
                                      perceptual_slice_fraction=0.2, vgg16_weights=None, gan_weight=2.0,
                                      gan_feat_weight=4.0, disc_start=20000, disc_channels=32, disc_layers=3,
                                      disc_norm="batch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="1: patch training with GAN losses; 2: decoder fine-tuning (overrides train.stage)")


def apply_arguments(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    if args.stage is not None:
        cfg.setdefault("train", {})["stage"] = int(args.stage)


class _Stage2Forward(nn.Module):
    """Frozen patch-wise encoder + nearest codes, trainable joint decoder; one module so DDP sees one forward."""

    def __init__(self, ae: nn.Module, patch_size: int) -> None:
        super().__init__()
        self.ae, self.patch_size = ae, int(patch_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z_q, _ = self.ae.quantize(self.ae.encode(x, self.patch_size))
        return {"reconstruction": self.ae.decode(z_q)}


def _freeze_for_stage2(ae: nn.Module) -> list[nn.Parameter]:
    """Freeze encoder, pre_vq_conv and codebook (eval: no EMA codebook updates); return trainable params."""
    set_requires_grad(ae, False)
    for name in ("encoder", "pre_vq_conv", "codebook"):
        getattr(ae, name).eval()
    trainable = list(ae.decoder.parameters()) + list(ae.post_vq_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def _build_autoencoder(cfg: dict[str, Any], stage: int) -> nn.Module:
    init = cfg.get("init_from")
    if init:
        ae = load_network_any(init, "autoencoder", prefer_ema=True)
        cfg["model"] = dict(ae.config)  # the file's shape wins
        log.info("autoencoder initialised from %s", init)
        return ae.train()
    if stage == 2:
        raise InputError("autoencoder stage 2 needs `init_from:` the stage-1 result (autoencoder.safetensors "
                         "or a stage-1 training checkpoint)")
    return build_model("autoencoder", cfg.get("model", {})).train()


def run(cfg: dict[str, Any], env: WorldInfo | None = None, resume: bool = False) -> dict[str, Any]:
    env = env or WorldInfo()
    t = cfg.setdefault("train", {})
    stage = int(t.get("stage", 1))
    if stage not in (1, 2):
        raise InputError(f"train.stage must be 1 or 2, got {stage}")
    loss_cfg = {**_LOSS_DEFAULTS, **(cfg.get("loss") or {})}
    cfg["loss"] = loss_cfg
    data_cfg = cfg.get("data") or {}
    # Fail before any heavy work when the perceptual loss has no weights file.
    pw = float(loss_cfg["perceptual_weight"])
    if pw != 0 and not loss_cfg.get("vgg16_weights"):
        raise InputError(missing_vgg_message(pw))

    seed_all(int(cfg.get("seed", 0)))  # same on every rank: identical initial weights
    ae = _build_autoencoder(cfg, stage).to(env.device)
    model_cfg = cfg.get("model", {})
    if stage == 1:
        trainable = [p for p in ae.parameters() if p.requires_grad]
        patch = int(data_cfg.get("patch_size", 64))
        dataset = build_volume_dataset(data_cfg, crop=patch, pad_multiple=patch)
    else:
        trainable = _freeze_for_stage2(ae)
        enc_patch = int(cfg.get("encode_patch_size", data_cfg.get("patch_size", 64)))
        max_crop = data_cfg.get("max_crop", 192)
        dataset = build_volume_dataset(data_cfg, pad_multiple=enc_patch, max_voxels=int(data_cfg.get(
            "max_voxels", 256 * 256 * 128)), max_crop=max_crop)
        if isinstance(max_crop, int) and max_crop % enc_patch:
            raise InputError(f"data.max_crop {max_crop} must be a multiple of the encoder patch {enc_patch}")

    lr = float(t.get("lr", 3e-4 if stage == 1 else 3e-5))
    betas = tuple(float(b) for b in t.get("betas", (0.5, 0.9)))
    opt_ae = torch.optim.Adam(trainable, lr=lr, betas=betas)  # type: ignore[arg-type]

    perceptual = None
    if pw != 0:
        perceptual = TriplanePerceptualLoss(loss_cfg["vgg16_weights"],
                                            float(loss_cfg["perceptual_slice_fraction"])).to(env.device)
    use_gan = float(loss_cfg["gan_weight"]) != 0 or float(loss_cfg["gan_feat_weight"]) != 0
    disc = opt_d = None
    if use_gan:
        disc = PatchDiscriminator3D(int(model_cfg.get("image_channels", 1)), int(loss_cfg["disc_channels"]),
                                    int(loss_cfg["disc_layers"]), str(loss_cfg["disc_norm"])).to(env.device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=float(t.get("disc_lr", lr)), betas=betas)  # type: ignore[arg-type]
        # Stage 2 from a stage-1 training checkpoint keeps its trained discriminator (as the authors do).
        init_state = training_checkpoint_state(cfg["init_from"]) if cfg.get("init_from") else None
        if init_state is not None and "discriminator" in init_state.get("models", {}):
            try:
                disc.load_state_dict(init_state["models"]["discriminator"])
                log.info("discriminator initialised from %s", cfg["init_from"])
            except RuntimeError as exc:
                log.warning("discriminator in %s does not match the config (%s): starting it fresh",
                            cfg["init_from"], exc)

    trainer = Trainer(cfg, f"autoencoder{stage}", env, out_dir(cfg, f"runs/autoencoder_stage{stage}"))
    trainer.add_model("autoencoder", ae)
    trainer.add_optimizer("autoencoder", opt_ae)
    if disc is not None and opt_d is not None:
        trainer.add_model("discriminator", disc)
        trainer.add_optimizer("discriminator", opt_d)
    ema_cfg = cfg.get("ema") or {}
    ema = EMA.from_config(ae, ema_cfg) if ema_cfg.get("enabled", False) else None
    if ema is not None:
        trainer.add_ema("autoencoder", ema, ae)
    trainer.make_loader(dataset, int(t.get("batch_size", 24 if stage == 1 else 1)), int(t.get("num_workers", 0)))
    if resume:
        trainer.resume()
    if stage == 2:  # loading a checkpoint puts every module back in train mode
        _freeze_for_stage2(ae)

    find_unused = bool(t.get("find_unused_parameters", False))
    ae_fwd = wrap_ddp(ae if stage == 1 else _Stage2Forward(ae, enc_patch), env, find_unused)
    disc_ddp = wrap_ddp(disc, env, find_unused) if disc is not None else None
    weights = {k: float(loss_cfg[k]) for k in ("l1_weight", "commitment_weight", "gan_weight", "gan_feat_weight")}
    disc_start = int(loss_cfg["disc_start"])

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Any]:
        x = device_batch(batch, env.device)["image"]
        gan_on = disc is not None and step >= disc_start
        logs: dict[str, Any] = {}
        with trainer.autocast():
            out = ae_fwd(x)
            rec = out["reconstruction"].float()
            l1 = F.l1_loss(rec, x)
            loss = weights["l1_weight"] * l1
            logs["l1"] = l1.detach()
            if "commitment_loss" in out:
                loss = loss + weights["commitment_weight"] * out["commitment_loss"]
                logs["commitment"] = out["commitment_loss"].detach()
                logs["perplexity"] = out["perplexity"].detach()
            if perceptual is not None:
                p = perceptual(x, rec)
                loss = loss + pw * p
                logs["perceptual"] = p.detach()
            if gan_on:
                assert disc is not None
                # The raw module (not the DDP wrapper) with frozen weights: gradients reach the decoder only.
                set_requires_grad(disc, False)
                logits_fake, feats_fake = disc(rec)
                with torch.no_grad():
                    _, feats_real = disc(x)
                g = hinge_g_loss(logits_fake)
                fm = feature_matching_loss(feats_fake, feats_real)
                loss = loss + weights["gan_weight"] * g + weights["gan_feat_weight"] * fm
                logs.update(g_adv=g.detach(), feature_matching=fm.detach())
        logs["loss"] = loss.detach()
        trainer.optimize(loss, opt_ae, trainable)
        if gan_on:
            assert disc is not None and disc_ddp is not None and opt_d is not None
            set_requires_grad(disc, True)
            # Real and fake pass separately (BatchNorm statistics per call, as the authors do); the first
            # backward accumulates locally, the second all-reduces the sum.
            sync_off = disc_ddp.no_sync() if env.distributed else contextlib.nullcontext()
            half = 0.5 * weights["gan_weight"]
            with sync_off:
                with trainer.autocast():
                    logits_real, _ = disc_ddp(x)
                    d_real = half * F.relu(1.0 - logits_real.float()).mean()
                trainer.scaler.scale(d_real).backward()
            with trainer.autocast():
                logits_fake, _ = disc_ddp(rec.detach())
                d_fake = half * F.relu(1.0 + logits_fake.float()).mean()
            trainer.optimize(d_fake, opt_d, list(disc.parameters()))
            logs.update(d_loss=(d_real + d_fake).detach(), d_logits_real=logits_real.detach().float().mean(),
                        d_logits_fake=logits_fake.detach().float().mean())
        return logs

    result_path = trainer.out_dir / "autoencoder.safetensors"

    def export(step: int) -> None:
        if env.is_main:
            net = ema.model if ema is not None else ae
            export_network(net, result_path, "autoencoder", {"stage": stage, "step": step,
                                                              "codebook_range": list(net.codebook_range())})

    trainer.checkpoint_hooks.append(export)
    try:
        trainer.fit(step_fn)
    finally:
        trainer.close()
    return {"autoencoder": str(result_path), "step": trainer.step, "out_dir": str(trainer.out_dir)}
