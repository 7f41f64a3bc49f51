"""Helpers shared by the stages: datasets from configs, loading networks from any of our files, export."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from MedDiffusionLib.errors import CheckpointError, InputError

log = logging.getLogger("meddiffusion.train")


def out_dir(cfg: dict[str, Any], default: str) -> Path:
    return Path(cfg.get("out_dir") or default)


def build_volume_dataset(data: dict[str, Any], *, crop: Any = None, pad_multiple: Any = 1,
                         max_voxels: int | None = None, max_crop: Any = None, augment: bool = True) -> Any:
    """A VolumeDataset (``data.manifest``) or PhantomDataset (``data.phantoms``) from the ``data`` section."""
    from MedDiffusionLib.data.datasets import PhantomDataset, VolumeDataset, load_manifest

    flips = data.get("flip_axes", [1, 2]) if augment else []
    flip_prob = float(data.get("flip_prob", 0.5)) if augment else 0.0
    min_fg = float(data.get("min_foreground", 0.0))
    if data.get("phantoms"):
        ph = data["phantoms"]
        return PhantomDataset(ph["anatomies"], ph.get("size", [32, 32, 32]), ph.get("spacing", [1, 1, 1]),
                              volumes_per_class=int(ph.get("volumes_per_class", 4)),
                              class_indices=ph.get("class_indices"), seed=int(ph.get("seed", 0)), crop=crop,
                              pad_multiple=pad_multiple, flip_axes=flips, flip_prob=flip_prob,
                              min_foreground=min_fg)
    if not data.get("manifest"):
        raise InputError("the data section needs `manifest: <file.yaml>` (or `phantoms:` for synthetic data)")
    entries = load_manifest(data["manifest"])
    return VolumeDataset(entries, spacing_xyz=data.get("spacing"), crop=crop, pad_multiple=pad_multiple,
                         max_voxels=max_voxels, max_crop=max_crop, flip_axes=flips, flip_prob=flip_prob,
                         percentiles=tuple(data.get("percentiles", (0.5, 99.5))), min_foreground=min_fg,
                         cache=bool(data.get("cache", False)))


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """A network by kind from constructor kwargs; ``target: module:Class`` swaps the class (tests, research)."""
    config = dict(config or {})
    target = config.pop("target", None)
    if target:
        import importlib

        mod, _, name = str(target).partition(":")
        return getattr(importlib.import_module(mod), name)(**config)
    from MedDiffusionLib.checkpoints.native import network_class

    return network_class(kind)(**config)


def _from_training_checkpoint(path: Path, kind: str, prefer_ema: bool) -> nn.Module:
    from Training.trainer import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or "models" not in state:
        raise CheckpointError(f"'{path}' is not a MedDiffusion training checkpoint")
    name = {"autoencoder": "autoencoder", "biflownet": "denoiser"}.get(kind, kind)
    if name not in state["models"]:
        raise CheckpointError(f"'{path}' holds no {kind} (it has {sorted(state['models'])})")
    model = build_model(kind, state["config"].get("model", {}))
    sd = state["ema"].get(name) if prefer_ema and state.get("ema", {}).get(name) else state["models"][name]
    model.load_state_dict(sd)
    return model


def training_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state of one of our training checkpoints, or None for any other file."""
    from MedDiffusionLib.checkpoints.native import is_safetensors_file
    from Training.trainer import CHECKPOINT_FORMAT, load_checkpoint

    p = Path(path).expanduser()
    if not p.is_file() or is_safetensors_file(p):
        return None
    try:
        state = load_checkpoint(p)
    except Exception as exc:  # any reader error means "not one of ours"; say why for whoever debugs it
        log.debug("%s is not a training checkpoint (%s: %s)", p, type(exc).__name__, exc)
        return None
    return state if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT else None


def load_network_any(path: str | os.PathLike[str], kind: str, prefer_ema: bool = True) -> nn.Module:
    """Our safetensors file, one of our training checkpoints (``step_*.pt``; EMA weights when present), or
    the authors' checkpoint. Returned in eval mode on the CPU."""
    from MedDiffusionLib.checkpoints.any_format import load_any_autoencoder, load_any_denoiser
    from MedDiffusionLib.checkpoints.native import is_safetensors_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{kind} file '{p}' does not exist")
    if not is_safetensors_file(p):
        try:
            return _from_training_checkpoint(p, kind, prefer_ema).eval()
        except CheckpointError:
            raise
        except Exception as exc:  # not ours (any reader error): the official loaders give the user-facing one
            log.debug("%s is not a training checkpoint (%s: %s); trying the authors' formats", p,
                      type(exc).__name__, exc)
    loader = load_any_autoencoder if kind == "autoencoder" else load_any_denoiser
    return loader(p).eval()


def export_network(model: nn.Module, path: Path, kind: str, extra: dict[str, Any]) -> Path:
    from MedDiffusionLib.checkpoints.native import save_network

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_network(model, path, kind, extra)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def device_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
