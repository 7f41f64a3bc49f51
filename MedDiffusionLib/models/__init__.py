"""Networks only (no I/O, no sampling loops). Names are exported lazily so importing one network stays cheap."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PatchVolumeAutoencoder": "autoencoder",
    "VectorQuantizer": "quantizer",
    "QuantizerOutput": "quantizer",
    "BiFlowNet": "biflownet",
    "ControlResiduals": "biflownet",
    "ControlNet": "controlnet",
    "PatchDiscriminator3D": "discriminator",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
