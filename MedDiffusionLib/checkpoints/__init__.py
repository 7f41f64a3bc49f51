"""Checkpoint files: safe loading of the authors' files, our safetensors format, and model bundles.

Nothing here executes code stored in a file: pickles go through an allow-listing unpickler.
"""
from __future__ import annotations

from .bundle import ModelBundle, bundle_from_official, default_bundle_dir, load_bundle, save_bundle
from .any_format import convert_official, load_any_autoencoder, load_any_controlnet, load_any_denoiser
from .native import (
    is_safetensors_file,
    load_network,
    read_network_metadata,
    save_network,
)
from .official import (
    detect_official_kind,
    load_official,
    load_official_autoencoder,
    load_official_biflownet,
)
from .torch_file import safe_torch_load

__all__ = [
    "safe_torch_load",
    "load_official_autoencoder", "load_official_biflownet", "load_official", "detect_official_kind",
    "convert_official",
    "save_network", "load_network", "read_network_metadata", "is_safetensors_file",
    "load_any_autoencoder", "load_any_denoiser", "load_any_controlnet",
    "ModelBundle", "load_bundle", "save_bundle", "bundle_from_official", "default_bundle_dir",
]
