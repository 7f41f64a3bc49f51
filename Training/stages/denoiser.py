"""BiFlowNet diffusion training on cached latents (the authors' recipe: eps prediction, L1, Adam 1e-4, EMA).

Conditioning: class index and ``res = latent_shape / res_divisor`` (64 = the official ``vq_size``). The EMA
(0.995 every 10 steps, a plain copy before step 2000) is what gets exported to
``<out>/denoiser.safetensors``. Every ``preview.every`` steps rank 0 samples a latent with a few DDIM steps
from the EMA weights, decodes it with the autoencoder and writes a PNG of three mid-slices.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from MedDiffusionLib.data.datasets import LatentDataset
from MedDiffusionLib.errors import InputError
from Training.stages._common import build_model, device_batch, export_network, load_network_any, out_dir
from MedDiffusionLib.pipelines.distributed import WorldInfo
from Training.trainer import EMA, Trainer, seed_all, wrap_ddp

DESCRIPTION = "train the BiFlowNet denoiser on cached latents (class + resolution conditioning, EMA)"
log = logging.getLogger("meddiffusion.train")


def _model_config(cfg: dict[str, Any], dataset: LatentDataset) -> dict[str, Any]:
    mc = dict(cfg.get("model") or {})
    channels = int(dataset.items[0]["shape"][0])
    if mc.setdefault("channels", channels) != channels:
        raise InputError(f"model.channels {mc['channels']} != latent channels {channels} in the cache")
    n_cls = max(int(it["class_index"]) for it in dataset.items) + 1
    if mc.get("num_classes") is not None and int(mc["num_classes"]) < n_cls:
        raise InputError(f"model.num_classes {mc['num_classes']} is too small for class index {n_cls - 1}")
    cfg["model"] = mc
    return mc


class PreviewWriter:
    """Sample -> decode -> PNG of mid-slices; uses its own RNG so training randomness is untouched."""

    def __init__(self, cfg: dict[str, Any], diffusion: Any, ema: EMA, dataset: LatentDataset,
                 folder: Path, device: torch.device) -> None:
        pv = cfg.get("preview") or {}
        self.every = int(pv.get("every", 0) or 0)
        self.sampler_name, self.steps = str(pv.get("sampler", "ddim")), int(pv.get("steps", 20))
        self.seed = int(pv.get("seed", 0))
        self.classes = pv.get("classes") or sorted({int(it["class_index"]) for it in dataset.items})
        self.shape = tuple(int(s) for s in (pv.get("latent_shape") or dataset.items[0]["shape"][1:]))
        self.res_divisor = dataset.res_divisor
        self.channels = int(dataset.items[0]["shape"][0])
        self.diffusion, self.ema, self.folder, self.device = diffusion, ema, folder, device
        self.lo, self.hi = dataset.codebook_range
        self.ae_path = cfg.get("autoencoder")
        self._ae: Any = None
        self._count = 0

    def __call__(self, step: int) -> None:
        if self.every <= 0 or step % self.every:
            return
        try:
            self.write(step)
        except Exception as exc:  # a preview must never stop training
            log.warning("preview at step %d failed: %s", step, exc)

    @torch.no_grad()
    def sample_latent(self, cls: int, generator: torch.Generator) -> torch.Tensor:
        from MedDiffusionLib.diffusion import make_sampler

        sampler = make_sampler(self.sampler_name, self.diffusion, steps=self.steps)
        x = torch.randn((1, self.channels, *self.shape), generator=generator).to(self.device)
        y = torch.tensor([cls], device=self.device)
        res = torch.tensor([self.shape], dtype=torch.float32, device=self.device) / self.res_divisor
        model = self.ema.model
        for t in sampler.timesteps.tolist():
            tb = torch.full((1,), int(t), dtype=torch.long, device=self.device)
            eps = model(x, tb, y, res)
            x = sampler.step(eps.float(), int(t), x, generator=generator).prev_sample
        return x

    @torch.no_grad()
    def write(self, step: int) -> Path | None:
        from MedDiffusionLib.io.preview import save_preview

        g = torch.Generator().manual_seed(self.seed + step)
        cls = int(self.classes[self._count % len(self.classes)])
        self._count += 1
        z = self.sample_latent(cls, g)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:07d}_class{cls}.png"
        if self.ae_path:
            if self._ae is None:
                self._ae = load_network_any(self.ae_path, "autoencoder").to(self.device).eval()
            zc = (z.float() + 1.0) / 2.0 * (self.hi - self.lo) + self.lo
            vol = self._ae.decode(self._ae.quantize(zc)[0])[0, 0].float().cpu().numpy()
        else:  # no autoencoder configured: show the latent's first channel
            vol = z[0, 0].float().cpu().numpy()
        # Network order (Z, X, Y) -> SimpleITK order (Z, Y, X) for the preview helper.
        save_preview(path, np.ascontiguousarray(vol.transpose(0, 2, 1)), window=(-1.0, 1.0) if self.ae_path else None)
        log.info("preview written: %s", path)
        return path


def run(cfg: dict[str, Any], env: WorldInfo | None = None, resume: bool = False) -> dict[str, Any]:
    from MedDiffusionLib.diffusion import GaussianDiffusion

    env = env or WorldInfo()
    t = cfg.setdefault("train", {})
    data_cfg = cfg.get("data") or {}
    if not data_cfg.get("latents"):
        raise InputError("the denoiser config needs `data.latents:` (the folder written by `train.py latents`)")
    model_cfg = dict(cfg.get("model") or {})
    # res = latent shape / vq_size; the pipelines read vq_size from the saved model config, so a custom
    # divisor is stored there (BiFlowNet keeps vq_size only as this conditioning scale).
    res_divisor = float(data_cfg.get("res_divisor") or model_cfg.get("vq_size", 64))
    if data_cfg.get("res_divisor"):
        model_cfg["vq_size"] = int(res_divisor) if float(res_divisor).is_integer() else res_divisor
        cfg["model"] = model_cfg
    batch_size = int(t.get("batch_size", 16))
    dataset = LatentDataset(data_cfg["latents"], shape=data_cfg.get("latent_shape"), res_divisor=res_divisor,
                            flip_axes=data_cfg.get("flip_axes") or (), cache=bool(data_cfg.get("cache", True)))
    if len(dataset.shapes) > 1 and batch_size > 1:
        raise InputError(f"cached latents have several shapes {dataset.shapes}; a batch needs one: set "
                         "`data.latent_shape: [D, H, W]` (train one run per size) or `train.batch_size: 1`")
    model_cfg = _model_config(cfg, dataset)

    seed_all(int(cfg.get("seed", 0)))  # same on every rank: identical initial weights
    model = build_model("biflownet", model_cfg).to(env.device).train()
    dcfg = cfg.get("diffusion") or {}
    diffusion = GaussianDiffusion(timesteps=int(dcfg.get("timesteps", 1000)))
    loss_type = str(dcfg.get("loss", "l1"))
    opt = torch.optim.Adam(model.parameters(), lr=float(t.get("lr", 1e-4)),
                           betas=tuple(float(b) for b in t.get("betas", (0.9, 0.999))))  # type: ignore[arg-type]
    ema = EMA.from_config(model, cfg.get("ema") or {})

    trainer = Trainer(cfg, "denoiser", env, out_dir(cfg, "runs/denoiser"))
    trainer.add_model("denoiser", model)
    trainer.add_optimizer("denoiser", opt)
    trainer.add_ema("denoiser", ema, model)
    trainer.make_loader(dataset, batch_size, int(t.get("num_workers", 0)))
    if resume:
        trainer.resume()
    net = wrap_ddp(model, env, bool(t.get("find_unused_parameters", False)))
    params = list(model.parameters())

    def step_fn(batch: dict[str, Any], step: int) -> dict[str, Any]:
        b = device_batch(batch, env.device)
        z = b["latent"]
        with trainer.autocast():
            loss = diffusion.training_loss(lambda xt, tt: net(xt, tt, b["class_index"], b["res"]), z,
                                           loss=loss_type)
        trainer.optimize(loss, opt, params)
        return {"loss": loss.detach()}

    hooks = []
    if env.is_main:
        hooks.append(PreviewWriter(cfg, diffusion, ema, dataset, trainer.out_dir / "previews", env.device))
    result_path = trainer.out_dir / "denoiser.safetensors"

    def export(step: int) -> None:
        if env.is_main:
            export_network(ema.model, result_path, "biflownet",
                           {"step": step, "ema": True, "res_divisor": res_divisor,
                            "codebook_range": list(dataset.codebook_range), "latent_shapes": dataset.shapes,
                            "classes": dataset.index.get("classes", {})})

    trainer.checkpoint_hooks.append(export)
    try:
        trainer.fit(step_fn, hooks)
    finally:
        trainer.close()
    return {"denoiser": str(result_path), "step": trainer.step, "out_dir": str(trainer.out_dir)}
