"""Turn an autoencoder file and a BiFlowNet file (the authors' pickles or ours) into a model bundle folder.

Run once, right after a download (or ``models add``): the pickles go through the safe loader
(checkpoints/official.py), the weights are written as safetensors, and no later run opens a pickle.

Peak memory: one network at a time. Reading an authors' file holds its whole content (training weights, EMA
weights, optimizer moments) plus the network being built; the file's content is freed before the network is
written, and writing needs the network plus one serialised copy. For the authors' BiFlowNet file (four copies
of the weights) that peaks near 1.25x the file size; see benchmarks/bench_convert_memory.py.
"""
from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..errors import CheckpointError, InputError

if TYPE_CHECKING:  # torch is imported only when a conversion runs
    from ..models.autoencoder import PatchVolumeAutoencoder
    from ..models.biflownet import BiFlowNet

__all__ = ["ExpectedConfig", "convert_to_bundle", "SOURCE_FILE"]

SOURCE_FILE = "source.json"  # where a bundle came from (repository, commit, files and their hashes)


@dataclass(frozen=True)
class ExpectedConfig:
    """What the files of a known model must turn out to be (the check after the name-based match)."""

    downsample: int | None = None           # the autoencoder's factor
    denoiser_patch_size: int | None = None  # BiFlowNet patch size (1 for the 8x model, 2 for the 4x model)


def _load(path: Path, role: str) -> PatchVolumeAutoencoder | BiFlowNet:
    from ..checkpoints.any_format import load_any_autoencoder, load_any_denoiser

    return load_any_autoencoder(path) if role == "autoencoder" else load_any_denoiser(path)


def _check(model: PatchVolumeAutoencoder | BiFlowNet, role: str, expect: ExpectedConfig, label: str) -> None:
    cfg = model.config
    if role == "autoencoder" and expect.downsample and int(cfg.get("downsample", 0)) != expect.downsample:
        raise CheckpointError(f"'{label}' holds a {cfg.get('downsample')}x autoencoder, but this model needs a "
                              f"{expect.downsample}x one; name the right file with --autoencoder-file")
    if role == "denoiser" and expect.denoiser_patch_size and \
            int(cfg.get("patch_size", 0)) != expect.denoiser_patch_size:
        raise CheckpointError(f"'{label}' holds a BiFlowNet with patch size {cfg.get('patch_size')}, but this "
                              f"model's has {expect.denoiser_patch_size}; name the right file with --denoiser-file")


def _convert_one(src: Path, dest: Path, role: str, expect: ExpectedConfig, label: str,
                 extra: Mapping[str, Any]) -> dict[str, Any]:
    from ..checkpoints.native import save_network
    from ..models.autoencoder import PatchVolumeAutoencoder

    try:
        model = _load(src, role)
    except CheckpointError as exc:
        kind = "autoencoder" if role == "autoencoder" else "BiFlowNet"
        raise CheckpointError(f"'{label}' is not a usable {kind}: {exc}") from None
    _check(model, role, expect, label)
    info: dict[str, Any] = {"config": dict(model.config)}
    if isinstance(model, PatchVolumeAutoencoder):
        info["latent_range"] = [float(v) for v in model.codebook_range()]
    save_network(model, dest, "autoencoder" if role == "autoencoder" else "biflownet",
                 extra={"converted_from": label, **extra})
    del model
    gc.collect()  # the next network should not share the peak with this one
    return info


def convert_to_bundle(autoencoder: str | os.PathLike[str], denoiser: str | os.PathLike[str],
                      dest: str | os.PathLike[str], name: str, expect: ExpectedConfig = ExpectedConfig(),
                      source: Mapping[str, Any] | None = None, description: str = "",
                      labels: tuple[str, str] | None = None,
                      on_stage: Callable[[str], None] | None = None,
                      manifest_extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``dest`` (model.yaml + autoencoder/denoiser safetensors [+ source.json]); all or nothing.

    ``labels`` name the files in messages (e.g. the Hub path instead of a cache path); ``manifest_extra`` adds
    model.yaml entries (e.g. the HU range of generated CT). The folder is assembled
    beside ``dest`` under a temporary name and renamed into place, so a killed conversion leaves no half model.
    """
    from ..checkpoints.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, load_bundle
    from ..io.atomic import atomic_folder, atomic_write_text
    from ..safe_yaml import dump_yaml

    dest = Path(dest).expanduser().absolute()
    if dest.exists():
        raise InputError(f"'{dest}' already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    ae_label, dn_label = labels or (str(autoencoder), str(denoiser))
    with atomic_folder(dest) as tmp:
        extra = {"bundle": name}
        if on_stage:
            on_stage("autoencoder")
        ae = _convert_one(Path(autoencoder), tmp / "autoencoder.safetensors", "autoencoder", expect, ae_label, extra)
        if on_stage:
            on_stage("denoiser")
        dn = _convert_one(Path(denoiser), tmp / "denoiser.safetensors", "denoiser", expect, dn_label, extra)
        if int(ae["config"].get("embedding_dim", -1)) != int(dn["config"].get("channels", -2)):
            raise CheckpointError(f"'{dn_label}' works on {dn['config'].get('channels')}-channel latents but "
                                  f"'{ae_label}' makes {ae['config'].get('embedding_dim')}: not one model")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "name": name,
            "autoencoder": "autoencoder.safetensors", "denoiser": "denoiser.safetensors",
            # The official stage-1 patch; the anatomy table and the latent range follow from the networks.
            "encode_patch_size": 64,
        }
        if description:
            manifest["description"] = description
        manifest.update(manifest_extra or {})
        if source is not None:
            record = {**source, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_text(tmp / SOURCE_FILE, json.dumps(record, indent=2, sort_keys=True))
        atomic_write_text(tmp / MANIFEST, dump_yaml(manifest))
        if on_stage:
            on_stage("check")
        load_bundle(tmp)  # the whole bundle loads (networks agree, anatomies known) before it is published
    return dest
