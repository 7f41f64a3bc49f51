"""Write a model bundle folder (model.yaml + safetensors) from a trained autoencoder and denoiser (EMA).

The anatomy catalog comes from ``anatomies:`` in the config, or is derived from the latent index the
denoiser was trained on (class names and indices, latent sizes, spacings; modality from the official table
or the name's ``ct-``/``mr-`` prefix). The written bundle is loaded back once as a check.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from MedDiffusionLib.catalog import OFFICIAL_ANATOMIES, Anatomy, Catalog
from MedDiffusionLib.errors import InputError
from Training.stages._common import load_network_any, out_dir
from MedDiffusionLib.pipelines.distributed import WorldInfo

DESCRIPTION = "write the user/demo model bundle (model.yaml + safetensors) from the trained networks"
log = logging.getLogger("meddiffusion.train")


def catalog_from_index(index: dict[str, Any]) -> Catalog:
    """One anatomy per class of the cached latents; latent sizes most frequent first."""
    official = {a.name: a for a in OFFICIAL_ANATOMIES}
    anatomies = []
    for name, cls in sorted(index.get("classes", {}).items(), key=lambda kv: kv[1]):
        items = [it for it in index["items"] if int(it["class_index"]) == int(cls)]
        sizes = [tuple(int(s) for s in it["shape"][1:]) for it in items]
        ordered = [s for s, _ in Counter(sizes).most_common()]
        spacings = [tuple(it["spacing_xyz"]) for it in items if it.get("spacing_xyz")]
        ref = official.get(name)
        spacing = spacings[0] if spacings else (index.get("spacing_xyz") or (ref.spacing_xyz if ref else (1, 1, 1)))
        modality = ref.modality if ref else ("MR" if name.lower().startswith("mr") else "CT")
        anatomies.append(Anatomy(name, int(cls), modality, tuple(ordered), tuple(float(s) for s in spacing),
                                 ref.description if ref else name))
    if not anatomies:
        raise InputError("the latent index lists no classes; give `anatomies:` in the export config")
    return Catalog(anatomies)


def run(cfg: dict[str, Any], env: WorldInfo | None = None, resume: bool = False) -> dict[str, Any]:
    from MedDiffusionLib.checkpoints.bundle import load_bundle, save_bundle
    from MedDiffusionLib.data.datasets import read_latent_index

    env = env or WorldInfo()
    for key in ("autoencoder", "denoiser"):
        if not cfg.get(key):
            raise InputError(f"the export config needs `{key}:` (a trained network file or training checkpoint)")
    dest = out_dir(cfg, "runs/bundle")
    if not env.is_main:
        return {"bundle": str(dest)}
    ae = load_network_any(cfg["autoencoder"], "autoencoder")
    dn = load_network_any(cfg["denoiser"], "biflownet", prefer_ema=True)
    index = read_latent_index(cfg["latents"]) if cfg.get("latents") else None
    if cfg.get("anatomies"):
        catalog = Catalog.from_dict(cfg["anatomies"])
    elif index is not None:
        catalog = catalog_from_index(index)
    else:
        raise InputError("give `latents:` (the cached latent folder) or `anatomies:` to describe the classes")
    latent_range = tuple(float(v) for v in (index["codebook_range"] if index else ae.codebook_range()))
    if index is not None:
        ae_range = ae.codebook_range()
        if max(abs(a - b) for a, b in zip(ae_range, latent_range)) > 1e-5:
            log.warning("the autoencoder's codebook range %s differs from the latents' %s: was the denoiser "
                        "trained on latents of another autoencoder?", ae_range, latent_range)
    patch = int(cfg.get("encode_patch_size") or (index or {}).get("encode_patch_size") or 64)
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = {"autoencoder": ae, "denoiser": dn, "catalog": catalog, "latent_range": latent_range,
             "encode_patch_size": patch, "name": str(cfg.get("name") or dest.name),
             "diffusion": dict(cfg.get("diffusion") or {"timesteps": 1000, "schedule": "cosine"})}
    folder = save_bundle(parts, dest)
    bundle = load_bundle(folder)  # the check a user's first load would do
    log.info("bundle written to %s: %s", folder, ", ".join(bundle.catalog.names))
    sizes = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file()}
    return {"bundle": str(folder), "anatomies": bundle.catalog.names, "files": sizes}
