"""Encode a dataset once into the diffusion training latents (cached on disk).

Each volume is encoded patch-wise (continuous latent after pre_vq_conv, NOT quantized, as the authors train
the denoiser), scaled with the codebook's global min/max to [-1, 1] and written atomically as
``<out>/latents/NNNNN_<name>.safetensors`` (or ``.npy``). ``<out>/index.json`` lists every latent with its
class index and shape. Re-running skips latents already written, so an interrupted run just continues.
Under torchrun the volumes are split across ranks.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.io.atomic import atomic_write_path, atomic_write_text
from Training.stages._common import build_volume_dataset, load_network_any, out_dir
from MedDiffusionLib.pipelines.distributed import WorldInfo

DESCRIPTION = "encode a dataset into normalised patch-wise latents (cache + index.json) for the denoiser"
INDEX_FORMAT = "meddiffusion-latents"
log = logging.getLogger("meddiffusion.train")


def _describe(dataset: Any, i: int) -> tuple[str, int, str]:
    """(class name, class index, source description) of item ``i`` of a volume or phantom dataset."""
    if hasattr(dataset, "entries"):
        e = dataset.entries[i]
        return e.class_name, int(e.class_index), str(e.path)
    anatomy, seed = dataset.describe(i)
    return anatomy, int(dataset.class_indices[anatomy]), f"phantom:{anatomy}:seed={seed}"


def _safe_stem(source: str) -> str:
    name = Path(source.split(":", 1)[-1] if source.startswith("phantom:") else source).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    keep = "".join(c if c.isalnum() or c in "-_=" else "_" for c in name)
    return keep[:60] or "volume"


def _write_latent(path: Path, z: torch.Tensor, meta: dict[str, str], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        if fmt == "npy":
            with open(tmp, "wb") as fh:
                np.save(fh, z.numpy(), allow_pickle=False)
            atomic_write_text(path.with_suffix(".json"), json.dumps(meta))
        else:
            from safetensors.torch import save_file

            save_file({"latent": z.contiguous()}, str(tmp), metadata=meta)


def _read_meta(path: Path) -> dict[str, str] | None:
    try:
        if path.suffix == ".npy":
            return json.loads(path.with_suffix(".json").read_text())
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:
        return None


def run(cfg: dict[str, Any], env: WorldInfo | None = None, resume: bool = False) -> dict[str, Any]:
    env = env or WorldInfo()
    if not cfg.get("autoencoder"):
        raise InputError("the latents config needs `autoencoder:` (the trained autoencoder.safetensors)")
    fmt = str(cfg.get("format", "safetensors"))
    if fmt not in ("safetensors", "npy"):
        raise InputError(f"format must be safetensors or npy, got '{fmt}'")
    patch = int(cfg.get("encode_patch_size", 64))
    ae = load_network_any(cfg["autoencoder"], "autoencoder").to(env.device).eval()
    lo, hi = ae.codebook_range()
    if not hi > lo:
        raise InputError(f"the autoencoder's codebook range ({lo}, {hi}) is empty: is it trained?")
    data_cfg = dict(cfg.get("data") or {})
    dataset = build_volume_dataset(data_cfg, pad_multiple=int(data_cfg.get("pad_multiple", patch)), augment=False)
    root = out_dir(cfg, "runs/latents")
    folder = root / "latents"
    overwrite = bool(cfg.get("overwrite", False))
    ext = ".npy" if fmt == "npy" else ".safetensors"
    done = skipped = 0
    for i in range(env.rank, len(dataset), env.world_size):
        name, cls, source = _describe(dataset, i)
        path = folder / f"{i:05d}_{_safe_stem(source)}{ext}"
        if path.exists() and not overwrite and _read_meta(path) is not None:
            continue
        try:
            arr = dataset.load(i)
        except Exception as exc:  # reported by name, never fatal for the whole dataset
            log.warning("skipping unreadable volume '%s': %s", source, exc)
            skipped += 1
            continue
        x = torch.from_numpy(arr)[None, None].to(env.device)
        with torch.no_grad():
            z = ae.encode(x, patch)[0].float().cpu()
        z = (z - lo) / (hi - lo) * 2.0 - 1.0
        outside = float((z.abs() > 1).float().mean())
        spacing = dataset.spacing_of(i)
        meta = {"class_index": str(cls), "class_name": name, "source": source, "shape": json.dumps(list(z.shape)),
                "spacing_xyz": json.dumps(list(spacing) if spacing else None),
                "volume_shape": json.dumps(list(arr.shape)), "outside_range_fraction": f"{outside:.6f}"}
        _write_latent(path, z, meta, fmt)
        done += 1
        log.info("encoded %s -> %s %s", source, path.name, tuple(z.shape))
    env.barrier()
    index_path = root / "index.json"
    if env.is_main:
        index = _build_index(folder, ext, cfg, ae, (lo, hi), patch, data_cfg)
        if not index["items"]:
            raise InputError("no latent was written (every volume failed to read; see the warnings)")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps(index, indent=1))
        log.info("latent index: %s (%d latents, %d new, %d unreadable)", index_path, len(index["items"]), done,
                 skipped)
    env.barrier()
    return {"index": str(index_path), "written": done, "skipped": skipped}


def _build_index(folder: Path, ext: str, cfg: dict[str, Any], ae: Any, crange: tuple[float, float], patch: int,
                 data_cfg: dict[str, Any]) -> dict[str, Any]:
    items, classes = [], {}
    for path in sorted(folder.glob(f"*{ext}")):
        meta = _read_meta(path)
        if not meta or "class_index" not in meta:
            continue
        items.append({"file": f"latents/{path.name}", "class_index": int(meta["class_index"]),
                      "class_name": meta["class_name"], "shape": json.loads(meta["shape"]),
                      "source": meta.get("source", ""), "spacing_xyz": json.loads(meta.get("spacing_xyz", "null"))})
        classes[meta["class_name"]] = int(meta["class_index"])
    spacing = data_cfg.get("spacing") or (data_cfg.get("phantoms") or {}).get("spacing")
    return {"format": INDEX_FORMAT, "version": 1, "autoencoder": str(cfg["autoencoder"]),
            "autoencoder_config": dict(ae.config), "codebook_range": [crange[0], crange[1]],
            "encode_patch_size": patch, "downsample": int(ae.downsample),
            "spacing_xyz": list(spacing) if spacing else None,
            "classes": dict(sorted(classes.items(), key=lambda kv: kv[1])), "items": items}
