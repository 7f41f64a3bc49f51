"""Model bundles: a folder with ``model.yaml`` naming the networks of one model and what it can generate.

Example ``model.yaml``::

    format: meddiffusion-bundle
    version: 1
    name: demo
    autoencoder: autoencoder.safetensors      # ours, or the authors' .ckpt (see autoencoder_options)
    denoiser: denoiser.safetensors            # ours, or the authors' .pt (see denoiser_options)
    controlnets: {sparse-ct: controlnet-sparse-ct.safetensors, mri: controlnet-mri.safetensors}  # optional
    latent_range: [-1.7, 1.9]                 # codebook min/max, for latent (de)normalisation
    encode_patch_size: 64
    diffusion: {timesteps: 1000, schedule: cosine}
    anatomies: [{name: ct-head-neck, class_index: 0, modality: CT, latent_sizes: [[32, 32, 32]], ...}]

File names are relative to the folder. ``denoiser_options`` / ``autoencoder_options`` pass overrides for what
the authors' files do not record (e.g. ``resnet_groups``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundle_summary import DEMO_ENV, MANIFEST, demo_bundle_dir
from ..catalog import Catalog, official_catalog
from ..errors import CheckpointError, InputError
from ..io.atomic import atomic_folder, atomic_write_text
from ..models.autoencoder import PatchVolumeAutoencoder
from ..models.biflownet import BiFlowNet
from ..models.controlnet import ControlNet
from ..safe_yaml import dump_yaml, read_yaml_file
from .any_format import load_any_autoencoder, load_any_controlnet, load_any_denoiser
from .native import save_network

__all__ = ["ModelBundle", "load_bundle", "save_bundle", "bundle_from_official", "default_bundle_dir",
           "add_controlnet_to_bundle",
           "BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST", "DEMO_ENV"]

BUNDLE_FORMAT = "meddiffusion-bundle"
BUNDLE_VERSION = 1


def _default_diffusion() -> dict[str, Any]:
    return {"timesteps": 1000, "schedule": "cosine"}


@dataclass
class ModelBundle:
    """Everything a pipeline needs: networks (eval mode), the anatomy catalog, latent scaling."""

    autoencoder: PatchVolumeAutoencoder
    denoiser: BiFlowNet
    catalog: Catalog
    latent_range: tuple[float, float]
    downsample: int = 8
    encode_patch_size: int = 64
    controlnets: dict[str, ControlNet] = field(default_factory=dict)
    name: str = "model"
    source: Path | None = None
    diffusion: dict[str, Any] = field(default_factory=_default_diffusion)

    @property
    def timesteps(self) -> int:
        """Length T of the diffusion schedule the denoiser was trained with."""
        return int(self.diffusion.get("timesteps", 1000))

    @property
    def schedule(self) -> str:
        """Name of the noise schedule the bundle declares ("cosine" for the authors' models)."""
        return str(self.diffusion.get("schedule", "cosine"))

    @property
    def device(self) -> torch.device:
        """The device the networks are on (that of the denoiser's first parameter)."""
        return next(self.denoiser.parameters()).device

    def to(self, device: str | torch.device) -> "ModelBundle":
        """Move every network to ``device`` (in place); returns self."""
        self.autoencoder.to(device)
        self.denoiser.to(device)
        for net in self.controlnets.values():
            net.to(device)
        return self

    def controlnet(self, task: str) -> ControlNet:
        """The ControlNet for ``task``; InputError naming the available tasks otherwise."""
        if task not in self.controlnets:
            have = ", ".join(sorted(self.controlnets)) or "none"
            raise InputError(f"model '{self.name}' has no ControlNet for task '{task}' (available: {have})")
        return self.controlnets[task]

    def info(self) -> dict[str, Any]:
        """JSON-able summary (server /v1/models, CLI 'anatomies')."""
        return {
            "name": self.name, "downsample": self.downsample, "latent_range": list(self.latent_range),
            "encode_patch_size": self.encode_patch_size, "diffusion": dict(self.diffusion),
            "tasks": sorted(self.controlnets),
            "anatomies": [{**a.to_dict(), "volume_sizes_xyz": [list(s) for s in a.volume_sizes_xyz(self.downsample)]}
                          for a in self.catalog],
        }


# ------------------------------------------------------------------------------------------------ loading
def default_bundle_dir() -> Path:
    """The demo bundle: $MEDDIFFUSION_DEMO_MODEL, else ``models/demo`` beside the package."""
    return demo_bundle_dir()  # defined without torch, for the Slicer panel


def _manifest_path(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        folder = default_bundle_dir()
        if not (folder / MANIFEST).is_file():
            raise CheckpointError(
                f"The demo model was not found at '{folder}' (no {MANIFEST}). Set {DEMO_ENV} to a model folder, "
                "or pass the folder of a model bundle")
        return folder / MANIFEST
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise CheckpointError(f"Model bundle not found: '{p}' does not exist (a bundle is a folder with {MANIFEST})")
    return p


def _read_manifest(p: Path) -> dict[str, Any]:
    data = read_yaml_file(p)  # no aliases, size-capped: the manifest may come from anyone
    if not isinstance(data, dict):
        raise CheckpointError(f"'{p}' must hold a mapping of bundle settings")
    if data.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"'{p}' is not a MedDiffusion model bundle (format: {data.get('format')!r}, "
                              f"expected {BUNDLE_FORMAT!r})")
    try:
        version = int(data.get("version", 0))
    except (TypeError, ValueError):
        version = -1
    if version != BUNDLE_VERSION:
        raise CheckpointError(f"'{p}' has bundle version {data.get('version')!r}; this version reads {BUNDLE_VERSION}")
    for key in ("autoencoder", "denoiser"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CheckpointError(f"'{p}' must name the {key} file ('{key}: <file>')")
    for key in ("autoencoder_options", "denoiser_options"):
        if data.get(key) is not None and not isinstance(data[key], Mapping):
            raise CheckpointError(f"'{p}': {key} must be a mapping of settings")
    return data


def _resolve_file(folder: Path, name: str, what: str, manifest: Path) -> Path:
    f = Path(name).expanduser()
    f = f if f.is_absolute() else folder / f
    if not f.is_file():
        raise CheckpointError(f"The {what} file '{f}' named in '{manifest}' does not exist")
    return f


def _latent_range(value: Any, autoencoder: PatchVolumeAutoencoder, manifest: Path) -> tuple[float, float]:
    if value is None:
        lo, hi = autoencoder.codebook_range()
        return float(lo), float(hi)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"'{manifest}': latent_range must be [min, max], got {value!r}") from None
    if not hi > lo:
        raise CheckpointError(f"'{manifest}': latent_range max must exceed min, got {value!r}")
    return lo, hi


# What model.yaml may set for sampling: the authors train with 1000 steps; a manifest is not allowed to make
# the sampler allocate tables of billions of steps.
MAX_TIMESTEPS = 100_000
SCHEDULES = ("cosine", "linear")


def _diffusion(value: Any, manifest: Path) -> dict[str, Any]:
    diffusion = {**_default_diffusion(), **(value if isinstance(value, Mapping) else {})}
    if value is not None and not isinstance(value, Mapping):
        raise CheckpointError(f"'{manifest}': diffusion must be a mapping (timesteps, schedule)")
    steps = diffusion["timesteps"]
    if type(steps) is not int or not 1 <= steps <= MAX_TIMESTEPS:
        raise CheckpointError(f"'{manifest}': diffusion.timesteps must be an integer in 1..{MAX_TIMESTEPS}, "
                              f"got {steps!r}")
    if diffusion["schedule"] not in SCHEDULES:
        raise CheckpointError(f"'{manifest}': diffusion.schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {diffusion['schedule']!r}")
    return diffusion


def _patch_size(value: Any, downsample: int, manifest: Path) -> int:
    if value is None:
        return 64
    if type(value) is not int or not downsample <= value <= 1024 or value % downsample:
        raise CheckpointError(f"'{manifest}': encode_patch_size must be a multiple of {downsample} in "
                              f"{downsample}..1024, got {value!r}")
    return value


def _check_compatible(bundle: ModelBundle, where: str) -> None:
    """Fail at load time, with the file named, rather than with a shape error in the first sampling step."""
    ae_cfg, dn_cfg = bundle.autoencoder.config, bundle.denoiser.config
    e, c = ae_cfg.get("embedding_dim"), dn_cfg.get("channels")
    if e is not None and c is not None and int(e) != int(c):
        raise CheckpointError(f"{where}: the denoiser works on {c}-channel latents but the autoencoder makes {e}")
    n_classes = dn_cfg.get("num_classes")
    if n_classes:
        bad = [a.name for a in bundle.catalog if a.class_index >= int(n_classes)]
        if bad:
            raise CheckpointError(f"{where}: anatomies {', '.join(bad)} have class indices the denoiser "
                                  f"({n_classes} classes) does not know")


def load_bundle(path: str | os.PathLike[str] | None = None, map_location: Any = "cpu") -> ModelBundle:
    """Load a bundle folder (or its model.yaml); ``None`` loads the demo model.

    Args:
        path: a bundle folder, its model.yaml, or None for `default_bundle_dir`; '~' is expanded. The networks
            it names must lie inside the folder.
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).

    Returns:
        The bundle: autoencoder, denoiser and ControlNets in eval mode, catalog, latent range and schedule.

    Raises:
        CheckpointError: one line naming the file, when the bundle or a network file is missing, malformed,
            unsafe (code in a pickle) or inconsistent with the rest of the bundle.
    """
    manifest = _manifest_path(path)
    folder = manifest.parent
    data = _read_manifest(manifest)
    diffusion = _diffusion(data.get("diffusion"), manifest)  # cheap checks before the networks load
    ae = load_any_autoencoder(_resolve_file(folder, data["autoencoder"], "autoencoder", manifest), map_location,
                              overrides=data.get("autoencoder_options"))
    dn = load_any_denoiser(_resolve_file(folder, data["denoiser"], "denoiser", manifest), map_location,
                           overrides=data.get("denoiser_options"))
    controlnets: dict[str, ControlNet] = {}
    cn_files = data.get("controlnets") or {}
    if not isinstance(cn_files, Mapping):
        raise CheckpointError(f"'{manifest}': controlnets must map a task name to a file")
    for task, fname in cn_files.items():
        controlnets[str(task)] = load_any_controlnet(_resolve_file(folder, str(fname), f"{task} ControlNet",
                                                                   manifest), map_location)
    downsample = int(ae.config["downsample"])
    try:
        if data.get("anatomies") is not None:
            catalog = Catalog.from_dict(data["anatomies"])
        else:
            catalog = official_catalog(downsample)
    except InputError as exc:
        raise CheckpointError(f"'{manifest}': invalid anatomies: {exc}") from exc
    bundle = ModelBundle(
        autoencoder=ae, denoiser=dn, catalog=catalog, latent_range=_latent_range(data.get("latent_range"), ae, manifest),
        downsample=downsample, encode_patch_size=_patch_size(data.get("encode_patch_size"), downsample, manifest),
        controlnets=controlnets,
        name=str(data.get("name") or folder.name), source=folder, diffusion=diffusion)
    _check_compatible(bundle, f"'{manifest}'")
    return bundle


def bundle_from_official(autoencoder_path: str | os.PathLike[str], denoiser_path: str | os.PathLike[str],
                         catalog: Catalog | None = None, name: str = "official", map_location: Any = "cpu",
                         autoencoder_overrides: Mapping[str, Any] | None = None,
                         denoiser_overrides: Mapping[str, Any] | None = None,
                         encode_patch_size: int = 64) -> ModelBundle:
    """A bundle from the authors' released files (either format also accepts our safetensors files).

    Args:
        autoencoder_path: the authors' autoencoder .ckpt (or our safetensors file).
        denoiser_path: the authors' BiFlowNet file (or our safetensors file); its EMA weights are used.
        catalog: the anatomies the denoiser was trained on; default: the authors' table for the autoencoder's
            downsample factor.
        name: the bundle's name.
        map_location: device the weights are loaded to.
        autoencoder_overrides: config values the autoencoder checkpoint does not record (e.g. num_groups).
        denoiser_overrides: likewise for the denoiser (resnet_groups, dit_num_heads, attn_heads).
        encode_patch_size: patch edge (voxels) in which the autoencoder encodes volumes.

    Raises:
        CheckpointError: a file that is missing, unsafe or not the expected network, or networks that do not
            fit together.
    """
    ae = load_any_autoencoder(autoencoder_path, map_location, overrides=autoencoder_overrides)
    dn = load_any_denoiser(denoiser_path, map_location, overrides=denoiser_overrides)
    downsample = int(ae.config["downsample"])
    if catalog is None:
        try:
            catalog = official_catalog(downsample)
        except InputError as exc:
            raise CheckpointError(f"no official anatomy table for a {downsample}x autoencoder; pass a catalog") from exc
    lo, hi = ae.codebook_range()
    bundle = ModelBundle(autoencoder=ae, denoiser=dn, catalog=catalog, latent_range=(float(lo), float(hi)),
                         downsample=downsample, encode_patch_size=encode_patch_size, name=name)
    _check_compatible(bundle, f"'{autoencoder_path}' + '{denoiser_path}'")
    return bundle


# ------------------------------------------------------------------------------------------------- saving
def _as_bundle(parts: ModelBundle | Mapping[str, Any]) -> ModelBundle:
    if isinstance(parts, ModelBundle):
        return parts
    if not isinstance(parts, Mapping):
        raise InputError("save_bundle needs a ModelBundle or a mapping of its parts")
    kw = dict(parts)
    ae = kw.get("autoencoder")
    if ae is None or kw.get("denoiser") is None:
        raise InputError("save_bundle needs at least an autoencoder and a denoiser")
    kw.setdefault("downsample", int(ae.config["downsample"]))
    if kw.get("catalog") is None:
        kw["catalog"] = official_catalog(kw["downsample"])
    if kw.get("latent_range") is None:
        kw["latent_range"] = tuple(float(v) for v in ae.codebook_range())
    try:
        return ModelBundle(**kw)
    except TypeError as exc:  # unknown or missing part names
        raise InputError(f"save_bundle: {exc}") from None


def _write_files(bundle: ModelBundle, folder: Path) -> None:
    extra = {"bundle": bundle.name}
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "name": bundle.name,
        "autoencoder": "autoencoder.safetensors", "denoiser": "denoiser.safetensors",
    }
    save_network(bundle.autoencoder, folder / manifest["autoencoder"], "autoencoder", extra)
    save_network(bundle.denoiser, folder / manifest["denoiser"], "biflownet", extra)
    if bundle.controlnets:
        manifest["controlnets"] = {}
        for task, net in sorted(bundle.controlnets.items()):
            fname = f"controlnet-{task}.safetensors"
            save_network(net, folder / fname, "controlnet", {**extra, "task": task})
            manifest["controlnets"][task] = fname
    manifest.update({
        "latent_range": [float(bundle.latent_range[0]), float(bundle.latent_range[1])],
        "encode_patch_size": int(bundle.encode_patch_size), "diffusion": dict(bundle.diffusion),
        "anatomies": bundle.catalog.to_dict(),
    })
    # model.yaml last: a reader that finds it also finds every file it names.
    atomic_write_text(folder / MANIFEST, dump_yaml(manifest))


def save_bundle(bundle_or_parts: ModelBundle | Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write the bundle's networks (safetensors) and model.yaml into ``folder``; returns the folder.

    A new folder is assembled under a temporary name and renamed into place (all or nothing); into an
    existing folder each file is replaced atomically, model.yaml last.
    """
    bundle = _as_bundle(bundle_or_parts)
    dest = Path(folder).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise InputError(f"'{dest}' exists and is not a folder")
    if not dest.parent.is_dir():
        raise InputError(f"Output folder '{dest.parent}' does not exist")
    if dest.is_dir():
        _write_files(bundle, dest)
        return dest
    with atomic_folder(dest) as tmp:
        _write_files(bundle, tmp)
    return dest


def add_controlnet_to_bundle(folder: str | os.PathLike[str], task: str, controlnet: ControlNet) -> Path:
    """Save ``controlnet`` as ``controlnet-<task>.safetensors`` in an existing bundle and list it in model.yaml.

    Other entries of model.yaml are kept as they are; the network file is written first and model.yaml last
    (both atomically), so a reader never sees a manifest naming a missing file. Returns the network file.
    """
    manifest = _manifest_path(folder)
    data = _read_manifest(manifest)
    task = str(task).strip()
    if not task or any(c in task for c in "/\\:") or task.startswith("."):
        raise InputError(f"invalid ControlNet task name {task!r}")
    cfg = controlnet.config
    dn_file = _resolve_file(manifest.parent, data["denoiser"], "denoiser", manifest)
    try:  # only our own files record the config; the authors' denoisers are checked when the bundle loads
        from .native import is_safetensors_file, read_network_metadata

        dn_cfg = read_network_metadata(dn_file)["config"] if is_safetensors_file(dn_file) else None
    except CheckpointError:
        dn_cfg = None
    mine = cfg.get("denoiser_config")
    if dn_cfg is not None and mine is not None:
        keys = set(dn_cfg) & set(mine)
        diff = sorted(k for k in keys if dn_cfg[k] != mine[k])
        if diff:
            raise InputError(f"the ControlNet was built for another denoiser than the one in '{manifest}' "
                             f"(differs in {', '.join(diff)})")
    fname = f"controlnet-{task}.safetensors"
    path = save_network(controlnet, manifest.parent / fname, "controlnet", {"bundle": data.get("name"), "task": task})
    nets = dict(data.get("controlnets") or {})
    nets[task] = fname
    data["controlnets"] = dict(sorted(nets.items()))
    atomic_write_text(manifest, dump_yaml(data))
    return path
