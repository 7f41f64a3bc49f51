"""Loading a network from either file format (ours or the authors'), and converting the authors' to ours.

Kept apart from `native.py` (our safetensors format) and `official.py` (the authors' pickles) so that neither of
those imports the other.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ..errors import CheckpointError
from .native import is_safetensors_file, load_network, save_network
from ..models.autoencoder import PatchVolumeAutoencoder
from ..models.biflownet import BiFlowNet
from ..models.controlnet import ControlNet
from .official import load_official, load_official_autoencoder, load_official_biflownet

__all__ = ["load_any_autoencoder", "load_any_denoiser", "load_any_controlnet", "convert_official"]


_Net = TypeVar("_Net", bound=nn.Module)


def _load_any(path: str | os.PathLike[str], kind: str, map_location: Any,
              overrides: Mapping[str, Any] | None, cls: type[_Net]) -> _Net:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{kind} file not found: '{p}'")
    model: nn.Module
    if is_safetensors_file(p) or p.suffix.lower() == ".safetensors":  # by name too: clearer error if corrupt
        model = load_network(p, map_location, expected_kind=kind)[0]
    elif kind == "autoencoder":
        model = load_official_autoencoder(p, map_location, overrides=overrides)
    elif kind == "biflownet":
        model = load_official_biflownet(p, map_location, overrides=overrides)
    else:
        raise CheckpointError(f"'{p}': a {kind} must be in the MedDiffusion safetensors format")
    if not isinstance(model, cls):  # the file's kind was checked; this keeps the type honest for the callers
        raise CheckpointError(f"'{p}' holds a {type(model).__name__}, not a {cls.__name__}")
    return model


def load_any_autoencoder(path: str | os.PathLike[str], map_location: Any = "cpu",
                         overrides: Mapping[str, Any] | None = None) -> PatchVolumeAutoencoder:
    """An autoencoder from our safetensors file or the authors' Lightning checkpoint.

    Args:
        path: the file; the format is detected from its first bytes ('.safetensors' files are always read as
            ours).
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).
        overrides: config values an authors' checkpoint does not record (ignored for our files).

    Returns:
        The autoencoder in eval mode.

    Raises:
        CheckpointError: one line naming the file, when it is missing, unreadable, unsafe (code in a pickle,
            TorchScript), not a autoencoder, or its weights do not match its config.
    """
    return _load_any(path, "autoencoder", map_location, overrides, PatchVolumeAutoencoder)


def load_any_denoiser(path: str | os.PathLike[str], map_location: Any = "cpu",
                      overrides: Mapping[str, Any] | None = None) -> BiFlowNet:
    """A BiFlowNet from our safetensors file or the authors' checkpoint (EMA weights).

    Args:
        path: the file; the format is detected from its first bytes.
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).
        overrides: config values an authors' checkpoint does not record (resnet_groups, dit_num_heads,
            attn_heads; ignored for our files).

    Returns:
        The denoiser in eval mode.

    Raises:
        CheckpointError: one line naming the file, when it is missing, unreadable, unsafe (code in a pickle,
            TorchScript), not a BiFlowNet, or its weights do not match its config.
    """
    return _load_any(path, "biflownet", map_location, overrides, BiFlowNet)


def load_any_controlnet(path: str | os.PathLike[str], map_location: Any = "cpu") -> ControlNet:
    """A ControlNet (only our safetensors format exists for these).

    Args:
        path: our safetensors file.
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).

    Returns:
        The ControlNet in eval mode.

    Raises:
        CheckpointError: one line naming the file, when it is missing, unreadable, unsafe (code in a pickle,
            TorchScript), not a ControlNet, or its weights do not match its config.
    """
    return _load_any(path, "controlnet", map_location, None, ControlNet)


def convert_official(path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     overrides: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Convert an authors' checkpoint to our safetensors format (no pickle at load time); returns the kind.

    Args:
        path: the authors' autoencoder .ckpt or BiFlowNet file (read by the allow-listing unpickler).
        out_path: the safetensors file to write (atomically).
        overrides: config values the checkpoint does not record.
        extra: JSON values stored in the file's metadata beside ``converted_from``.

    Returns:
        'autoencoder' or 'biflownet'.

    Raises:
        CheckpointError: a file that is unreadable, unsafe or neither kind.
    """
    kind, model = load_official(path, overrides=overrides)
    save_network(model, out_path, kind, extra={"converted_from": Path(path).name, **(extra or {})})
    return kind
