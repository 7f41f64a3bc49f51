"""The published models this project knows how to fetch: written once here, listed by CLI, server and Slicer.

Sizes are what a user is asked to consent to before anything is known from the Hub: the converted bundle size
is exact (parameter counts of the official networks, float32), the download size an estimate (the authors'
files also hold training state: the BiFlowNet file keeps training weights, EMA weights and Adam moments; the
autoencoder checkpoint keeps the discriminator, LPIPS and optimizer states). The real download size comes from
the Hub's file listing and is shown before downloading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

__all__ = ["KnownModel", "KNOWN_MODELS", "DEMO_MODEL_NAME", "OFFICIAL_REPO", "known_model", "valid_model_name",
           "ROLES"]

OFFICIAL_REPO = "MMorss/3D-MedDiffusion"
DEMO_MODEL_NAME = "demo"
ROLES = ("autoencoder", "denoiser")  # the two files a downloaded model is made of

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KnownModel:
    """One downloadable model: where it lives on the Hub and how to recognise its files there."""

    name: str
    description: str
    repo_id: str
    downsample: int                       # the autoencoder's factor (4 or 8); also tells the files apart
    denoiser_patch_size: int              # BiFlowNet patch size: 1 for the 8x model, 2 for the 4x model
    bundle_bytes: int                     # the converted safetensors bundle on disk (exact)
    download_bytes_estimate: int          # the authors' files (estimate; the Hub listing gives the real size)
    preferred_files: tuple[str, str]      # file names the authors' README gives (autoencoder, denoiser)
    revision: str = "main"

    def to_dict(self) -> dict:
        """The entry as JSON values (for `models list --json` and the server)."""
        return {"name": self.name, "description": self.description, "repo_id": self.repo_id,
                "revision": self.revision, "downsample": self.downsample,
                "bundle_bytes": self.bundle_bytes, "download_bytes_estimate": self.download_bytes_estimate}


def _f32_bytes(params: int) -> int:
    return 4 * params


# Parameter counts of the official networks (the authors' state-dict manifest).
_AE8_PARAMS, _AE4_PARAMS = 37_731_405, 11_398_125
_BIFLOWNET8_PARAMS, _BIFLOWNET4_PARAMS = 157_654_880, 157_773_824


def _download_estimate(ae_params: int, dn_params: int) -> int:
    # BiFlowNet file: model + ema + Adam exp_avg + exp_avg_sq = 4 copies. Autoencoder: weights, Adam moments
    # (3 copies) plus discriminator and LPIPS (VGG-16 features, ~15 M parameters) and their state.
    return _f32_bytes(4 * dn_params + 3 * ae_params + 4 * 15_000_000)


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        name="official-8x",
        description="the authors' released 8x model (Patch-Volume autoencoder 8x + BiFlowNet): CT and MR, "
                    "7 anatomies, volumes up to 512x512x512",
        repo_id=OFFICIAL_REPO, downsample=8, denoiser_patch_size=1,
        bundle_bytes=_f32_bytes(_AE8_PARAMS + _BIFLOWNET8_PARAMS),
        download_bytes_estimate=_download_estimate(_AE8_PARAMS, _BIFLOWNET8_PARAMS),
        preferred_files=("PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt")),
    KnownModel(
        name="official-4x",
        description="the authors' released 4x model (Patch-Volume autoencoder 4x + BiFlowNet): finer detail, "
                    "smaller volumes for the same memory",
        repo_id=OFFICIAL_REPO, downsample=4, denoiser_patch_size=2,
        bundle_bytes=_f32_bytes(_AE4_PARAMS + _BIFLOWNET4_PARAMS),
        download_bytes_estimate=_download_estimate(_AE4_PARAMS, _BIFLOWNET4_PARAMS),
        preferred_files=("PatchVolume_4x_s2.ckpt", "BiFlowNet_4x.pt")),
)


def known_model(name: str) -> KnownModel | None:
    """The downloadable model called ``name``, or None."""
    return next((m for m in KNOWN_MODELS if m.name == name), None)


def valid_model_name(name: str) -> str:
    """``name`` if it can name a model (lower-case letters, digits, '.', '_', '-'); InputError otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise InputError(f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' or '-' "
                         "(at most 64, starting with a letter or digit)")
    return name
