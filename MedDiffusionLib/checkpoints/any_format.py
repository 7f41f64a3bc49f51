"""Loading a network from either file format (ours or the authors'), and converting the authors' to ours.

Kept apart from `native.py` (our safetensors format) and `official.py` (the authors' pickles) so that neither of
those imports the other.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from .native import is_safetensors_file, load_network, save_network
from .official import load_official, load_official_autoencoder, load_official_biflownet

__all__ = ["load_any_autoencoder", "load_any_denoiser", "load_any_controlnet", "convert_official"]


def _load_any(path: str | os.PathLike[str], kind: str, map_location: Any,
              overrides: Mapping[str, Any] | None) -> nn.Module:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{kind} file not found: '{p}'")
    if is_safetensors_file(p) or p.suffix.lower() == ".safetensors":  # by name too: clearer error if corrupt
        return load_network(p, map_location, expected_kind=kind)[0]
    if kind == "autoencoder":
        return load_official_autoencoder(p, map_location, overrides=overrides)
    if kind == "biflownet":
        return load_official_biflownet(p, map_location, overrides=overrides)
    raise CheckpointError(f"'{p}': a {kind} must be in the MedDiffusion safetensors format")


def load_any_autoencoder(path: str | os.PathLike[str], map_location: Any = "cpu",
                         overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """An autoencoder from our safetensors file or the authors' Lightning checkpoint."""
    return _load_any(path, "autoencoder", map_location, overrides)


def load_any_denoiser(path: str | os.PathLike[str], map_location: Any = "cpu",
                      overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """A BiFlowNet from our safetensors file or the authors' checkpoint (EMA weights)."""
    return _load_any(path, "biflownet", map_location, overrides)


def load_any_controlnet(path: str | os.PathLike[str], map_location: Any = "cpu") -> nn.Module:
    """A ControlNet (only our safetensors format exists for these)."""
    return _load_any(path, "controlnet", map_location, None)


def convert_official(path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     overrides: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Convert an authors' checkpoint to our safetensors format (no pickle at load time); returns the kind."""
    kind, model = load_official(path, overrides=overrides)
    save_network(model, out_path, kind, extra={"converted_from": Path(path).name, **(extra or {})})
    return kind
