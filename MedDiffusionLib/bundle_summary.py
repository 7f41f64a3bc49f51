"""What a model bundle offers, read from its ``model.yaml`` without importing torch (for the Slicer panel).

The panel lists anatomies and volume sizes and the CT intensity range of the selected model before any model is
loaded, and the model itself is only loaded by the job server. The autoencoder's downsample factor (which turns
latent sizes into volume sizes) is read from the JSON header of its safetensors file; the authors' release
files (not safetensors) use the official factor, 8.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .catalog import Catalog, official_catalog
from .errors import CheckpointError, InputError
from .safe_yaml import read_yaml_file

__all__ = ["BundleSummary", "demo_bundle_dir", "DEMO_ENV", "MANIFEST", "summarize_bundle", "summarize_official",
           "HU_RANGE_KEY", "OFFICIAL_HU_RANGE", "parse_hu_range"]

MANIFEST = "model.yaml"                # a bundle is a folder with this file (checkpoints/bundle.py)
HU_RANGE_KEY = "hu_range"              # model.yaml: HU of the intensities 0 and 1 of generated CT
# The authors normalise CT from [-1000, 1000] HU (their data preparation clips to that window).
OFFICIAL_HU_RANGE = (-1000.0, 1000.0)
OFFICIAL_DOWNSAMPLE = 8
DEMO_ENV = "MEDDIFFUSION_DEMO_MODEL"
MAX_SAFETENSORS_HEADER = 16 << 20


def demo_bundle_dir() -> Path:
    """The demo bundle: $MEDDIFFUSION_DEMO_MODEL, else ``models/demo`` beside the package."""
    env = os.environ.get(DEMO_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "models" / "demo"


@dataclass(frozen=True)
class BundleSummary:
    """What a bundle folder declares (name, anatomies, downsample factor, HU range), read without loading networks."""
    name: str
    catalog: Catalog
    downsample: int
    hu_range: Optional[tuple[float, float]]
    tasks: tuple[str, ...]


def _downsample_from_safetensors(path: Path) -> Optional[int]:
    """The 'downsample' of our safetensors autoencoder config, from the file's JSON header; None if unknown."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_SAFETENSORS_HEADER:
                return None
            header = json.loads(fh.read(n).decode("utf-8"))
        config = json.loads(header.get("__metadata__", {}).get("config", "{}"))
        value = int(config["downsample"])
    except (OSError, ValueError, KeyError, TypeError, struct.error, AttributeError):
        return None
    return value if value > 0 else None


def parse_hu_range(value: Any, where: str = "hu_range") -> Optional[tuple[float, float]]:
    """[low, high] with low < high, or None for a missing value."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be two numbers [low, high], got {value!r}") from None
    if not low < high:
        raise InputError(f"{where} must be increasing (low < high), got {value!r}")
    return low, high


def summarize_bundle(path: str | Path) -> BundleSummary:
    """Anatomies, sizes and HU range of the bundle folder (or model.yaml) at ``path``."""
    p = Path(path).expanduser()
    manifest = p / MANIFEST if p.is_dir() else p
    data = read_yaml_file(manifest)  # the same reader as the loader: no aliases, at most 1 MiB
    if not isinstance(data, dict) or data.get("format") != "meddiffusion-bundle":
        raise CheckpointError(f"'{manifest}' is not a MedDiffusion model bundle")
    downsample = None
    autoencoder = data.get("autoencoder")
    if isinstance(autoencoder, str) and autoencoder.endswith(".safetensors"):
        downsample = _downsample_from_safetensors(manifest.parent / autoencoder)
    downsample = downsample or OFFICIAL_DOWNSAMPLE
    try:
        catalog = Catalog.from_dict(data["anatomies"]) if data.get("anatomies") is not None \
            else official_catalog(downsample)
        hu_range = parse_hu_range(data.get(HU_RANGE_KEY), f"'{manifest}': {HU_RANGE_KEY}")
    except InputError as exc:
        raise CheckpointError(f"'{manifest}': {exc}") from None
    tasks = tuple(sorted(str(t) for t in (data.get("controlnets") or {}))) \
        if isinstance(data.get("controlnets") or {}, dict) else ()
    return BundleSummary(str(data.get("name") or manifest.parent.name), catalog, downsample, hu_range, tasks)


def summarize_official() -> BundleSummary:
    """The authors' released model (two checkpoint files, no model.yaml)."""
    return BundleSummary("official", official_catalog(OFFICIAL_DOWNSAMPLE), OFFICIAL_DOWNSAMPLE,
                         OFFICIAL_HU_RANGE, ())
