"""ControlNet training for conditional reconstruction (sparse-view CT or accelerated MRI), measurements simulated.

Each step: clean volumes (phantoms or a manifest, [-1, 1]) -> frozen autoencoder -> patch-wise continuous latent,
normalised with the bundle's latent range (exactly what the denoiser was trained on); the same volumes are
measured in the physics domain [0, 1] (pipelines/consistency.py: CT sinograms with a random view count from
``physics.views`` and optional Poisson noise, or MRI k-space with a random mask per volume) and reconstructed
conventionally (FBP / zero-filled); that image, clamped to [-1, 1], is the ControlNet's condition. The loss is the
denoiser's eps-prediction loss through the frozen BiFlowNet with the ControlNet's residuals added, so only the
ControlNet learns. Checkpoints/resume come from the shared Trainer; every checkpoint also exports
``<out>/controlnet-<task>.safetensors``, and ``export_bundle: <bundle folder>`` (or ``--export-bundle``) adds the
final ControlNet to a model bundle's model.yaml.

Config keys: ``task``, ``bundle`` (or ``autoencoder`` + ``denoiser`` [+ ``latent_range``, ``encode_patch_size``]),
``data`` (as the other stages; ``data.crop: [Z, X, Y]`` for large volumes), ``physics``, ``model`` (``hidden``,
``conditioning_scale``), ``diffusion`` (``loss``), ``ema`` (``enabled``), ``train``, ``export_bundle``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
from typing import Any, Sequence

import torch

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.options import TASKS
from Training.stages._common import (build_volume_dataset, device_batch, export_network, load_network_any, out_dir,
                                     set_requires_grad)
from MedDiffusionLib.pipelines.distributed import WorldInfo
from Training.trainer import EMA, Trainer, seed_all, wrap_ddp

__all__ = ["run", "add_arguments", "apply_arguments", "ConditionSimulator", "FrozenParts", "LatentCache",
           "DESCRIPTION"]

DESCRIPTION = "train a ControlNet (sparse-ct or mri) on simulated measurements; denoiser and autoencoder frozen"
log = logging.getLogger("meddiffusion.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, help="reconstruction task (overrides `task:` in the config)")
    p.add_argument("--export-bundle", metavar="DIR", help="add the trained ControlNet to this model bundle folder")


def apply_arguments(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    if args.task:
        cfg["task"] = args.task
    if args.export_bundle:
        cfg["export_bundle"] = args.export_bundle


def _as_list(v: Any, default: Sequence[Any]) -> list[Any]:
    if v is None:
        return list(default)
    return list(v) if isinstance(v, (list, tuple)) else [v]


class FrozenParts:
    """The frozen autoencoder and denoiser with the latent scaling they were trained with."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        if cfg.get("bundle"):
            from MedDiffusionLib.checkpoints.bundle import load_bundle

            b = load_bundle(cfg["bundle"])
            self.ae, self.denoiser, self.catalog = b.autoencoder, b.denoiser, b.catalog
            self.latent_range, self.patch = tuple(b.latent_range), int(b.encode_patch_size)
        elif cfg.get("autoencoder") and cfg.get("denoiser"):
            from MedDiffusionLib.catalog import official_catalog

            self.ae = load_network_any(cfg["autoencoder"], "autoencoder")
            self.denoiser = load_network_any(cfg["denoiser"], "biflownet", prefer_ema=True)
            lr = cfg.get("latent_range") or self.ae.codebook_range()
            self.latent_range = (float(lr[0]), float(lr[1]))
            self.patch = int(cfg.get("encode_patch_size", 64))
            self.catalog = official_catalog(int(self.ae.config["downsample"])) \
                if int(self.ae.config["downsample"]) in (4, 8) else None
        else:
            raise InputError("the controlnet config needs `bundle:` (a model folder) or `autoencoder:` + `denoiser:`")
        self.downsample = int(self.ae.config["downsample"])
        for net in (self.ae, self.denoiser):
            net.eval()
            set_requires_grad(net, False)


def _class_indices(parts: FrozenParts, anatomies: Sequence[str]) -> dict[str, int] | None:
    """Phantom anatomy -> the bundle catalog's class index (the denoiser's classes), when the catalog has it."""
    if parts.catalog is None:
        return None
    out = {}
    for name in anatomies:
        try:
            out[name] = parts.catalog.get(name).class_index
        except InputError:
            return None
    return out


class ConditionSimulator:
    """Clean [-1, 1] volumes (B, 1, Z, X, Y) -> conventional reconstructions in [-1, 1] (the ControlNet input).

    Random choices (views, noise, masks) use the global RNGs, which the Trainer seeds and restores on resume.
    """

    def __init__(self, task: str, physics: dict[str, Any]) -> None:
        self.task = task
        self.views = [int(v) for v in _as_list(physics.get("views"), [30])]
        self.photons = [float(p) for p in _as_list(physics.get("noise_photons"), [])]
        self.noise_prob = float(physics.get("noise_prob", 1.0 if self.photons else 0.0))
        self.pixel_mm = float(physics.get("pixel_mm", 1.0))
        self.accelerations = [float(a) for a in _as_list(physics.get("acceleration"), [8])]
        self.masks = [str(m) for m in _as_list(physics.get("masks"), ["gaussian"])]
        if any(v < 1 for v in self.views) or any(not a > 1 for a in self.accelerations):
            raise InputError("physics.views must be >= 1 and physics.acceleration > 1")

    def _pick(self, options: list[Any]) -> Any:
        return options[int(torch.randint(len(options), (1,)))]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from MedDiffusionLib.physics.operators import make_operator, to_network, to_physics

        u = to_physics(x.float())
        shape = tuple(u.shape[-2:])
        if self.task == "sparse-ct":
            photons = None
            if self.photons and float(torch.rand(())) < self.noise_prob:
                photons = self._pick(self.photons)
            op = make_operator("sparse-ct", shape, views=self._pick(self.views), photons=photons,
                               pixel_mm=self.pixel_mm)
            deg = op.degrade(op.measure(u))
        else:
            parts = []
            for i in range(u.shape[0]):
                op = make_operator("mri", shape, acceleration=self._pick(self.accelerations),
                                   mask=self._pick(self.masks), seed=int(torch.randint(2**31 - 1, (1,))))
                parts.append(op.degrade(op.measure(u[i])))
            deg = torch.stack(parts)
        return to_network(deg).clamp(-1.0, 1.0).to(x.dtype)


class LatentCache:
    """Normalised latents of clean volumes, keyed by a hash of the volume's bytes (``data.latent_cache`` entries).

    Small datasets (the demo's phantoms) show the same volumes, in one of a few flip states, every epoch: the frozen
    encoder's output is then looked up instead of recomputed. Random crops of large scans rarely repeat; leave it
    at 0 there. The latents equal those encoded every step up to the float rounding of batched convolutions
    (the encoder is frozen), so a resumed run (empty cache) matches a straight one only to that rounding.
    """

    def __init__(self, ae: torch.nn.Module, patch: int, latent_range: tuple[float, float], max_entries: int = 0,
                 encode_batch: int = 16) -> None:
        self.ae, self.patch, self.lo, self.hi = ae, int(patch), float(latent_range[0]), float(latent_range[1])
        self.max_entries, self.encode_batch = int(max_entries), max(1, int(encode_batch))
        self.store: dict[bytes, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ae.encode(x, self.patch, patches_per_batch=self.encode_batch).float()
        return (z - self.lo) / (self.hi - self.lo) * 2.0 - 1.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_entries <= 0:
            return self._encode(x)
        keys = [hashlib.sha1(v.detach().cpu().numpy().tobytes()).digest() + bytes(str(tuple(v.shape)), "ascii")
                for v in x]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        fresh = {i: j for j, i in enumerate(missing)}
        z = self._encode(x[missing]) if missing else None
        out = []
        for i, k in enumerate(keys):
            if i in fresh:
                v = z[fresh[i]]  # type: ignore[index]
                if len(self.store) < self.max_entries:
                    self.store[k] = v
            else:
                v = self.store[k]
            out.append(v)
        return torch.stack(out)


def run(cfg: dict[str, Any], env: WorldInfo | None = None, resume: bool = False) -> dict[str, Any]:
    from MedDiffusionLib.diffusion import GaussianDiffusion
    from MedDiffusionLib.models.controlnet import ControlNet

    env = env or WorldInfo()
    task = str(cfg.get("task") or "")
    if task not in TASKS:
        raise InputError(f"set the task: `task: sparse-ct|mri` in the config or --task (got {task or 'none'})")
    t = cfg.setdefault("train", {})
    parts = FrozenParts(cfg)
    ae, denoiser = parts.ae.to(env.device), parts.denoiser.to(env.device)
    data_cfg = dict(cfg.get("data") or {})
    step = parts.downsample * denoiser.latent_multiple
    pad = math.lcm(step, parts.patch) if data_cfg.get("crop") is None else step
    phantoms = data_cfg.get("phantoms")
    wrong = [a for a in (phantoms or {}).get("anatomies", []) if not str(a).lower().startswith(
        "ct" if task == "sparse-ct" else "mr")]
    if wrong:
        log.warning("training the %s ControlNet on phantoms of another modality: %s", task, ", ".join(wrong))
    if phantoms and not phantoms.get("class_indices"):
        indices = _class_indices(parts, phantoms.get("anatomies", []))
        if indices is not None:
            data_cfg["phantoms"] = {**phantoms, "class_indices": indices}
    pad = int(data_cfg.get("pad_multiple", pad))
    dataset = build_volume_dataset(data_cfg, crop=data_cfg.get("crop"), pad_multiple=pad)
    simulate = ConditionSimulator(task, cfg.get("physics") or {})

    seed_all(int(cfg.get("seed", 0)))
    mc = dict(cfg.get("model") or {})
    controlnet = ControlNet.from_denoiser(denoiser, condition_channels=1, image_downsample=parts.downsample,
                                          hidden=mc.get("hidden"),
                                          conditioning_scale=float(mc.get("conditioning_scale", 1.0)))
    controlnet = controlnet.to(env.device).train()
    n_classes = denoiser.config.get("num_classes")
    dcfg = cfg.get("diffusion") or {}
    diffusion = GaussianDiffusion(timesteps=int(dcfg.get("timesteps", 1000)))
    loss_type = str(dcfg.get("loss", "l1"))
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(t.get("lr", 1e-4)), weight_decay=float(t.get("weight_decay", 0.0)),
                            betas=tuple(float(b) for b in t.get("betas", (0.9, 0.999))))  # type: ignore[arg-type]
    trainer = Trainer(cfg, "controlnet", env, out_dir(cfg, f"runs/controlnet_{task}"))
    trainer.add_model("controlnet", controlnet)
    trainer.add_optimizer("controlnet", opt)
    ema_cfg = cfg.get("ema") or {}
    ema = (EMA.from_config(controlnet, ema_cfg, decay=0.999, update_every=1, warmup_steps=100)
           if ema_cfg.get("enabled", False) else None)
    if ema is not None:
        trainer.add_ema("controlnet", ema, controlnet)
    trainer.make_loader(dataset, int(t.get("batch_size", 4)), int(t.get("num_workers", 0)))
    if resume:
        trainer.resume()
    net = wrap_ddp(controlnet, env)
    vq = float(denoiser.config.get("vq_size", 64))
    encode = LatentCache(ae, parts.patch, parts.latent_range, int(data_cfg.get("latent_cache", 0) or 0),
                         int(data_cfg.get("encode_batch", 16)))

    def step_fn(batch: dict[str, Any], step_index: int) -> dict[str, Any]:
        b = device_batch(batch, env.device)
        x = b["image"]
        with torch.no_grad():
            z = encode(x)
            cond = simulate(x)
        y = b["class_index"]
        if n_classes and bool((y >= int(n_classes)).any()):
            raise InputError(f"class index {int(y.max())} is outside the denoiser's {n_classes} classes")
        res = torch.tensor(z.shape[2:], dtype=torch.float32, device=z.device).expand(z.shape[0], 3) / vq

        def model_fn(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return denoiser(xt, tt, y, res, control=net(xt, tt, y, res, condition=cond))

        with trainer.autocast():
            loss = diffusion.training_loss(model_fn, z, loss=loss_type)
        trainer.optimize(loss, opt, params)
        return {"loss": loss.detach()}

    result_path = trainer.out_dir / f"controlnet-{task}.safetensors"

    def final_net() -> torch.nn.Module:
        return ema.model if ema is not None else controlnet

    def export(step_count: int) -> None:
        if env.is_main:
            export_network(final_net(), result_path, "controlnet",
                           {"task": task, "step": step_count, "ema": ema is not None,
                            "latent_range": list(parts.latent_range), "physics": cfg.get("physics") or {}})

    trainer.checkpoint_hooks.append(export)
    try:
        trainer.fit(step_fn)
    finally:
        trainer.close()
    out: dict[str, Any] = {"controlnet": str(result_path), "task": task, "step": trainer.step,
                           "out_dir": str(trainer.out_dir)}
    if cfg.get("export_bundle") and env.is_main:
        from MedDiffusionLib.checkpoints.bundle import add_controlnet_to_bundle

        out["bundle_file"] = str(add_controlnet_to_bundle(cfg["export_bundle"], task, final_net().cpu()))
        log.info("added the %s ControlNet to %s", task, cfg["export_bundle"])
    return out

