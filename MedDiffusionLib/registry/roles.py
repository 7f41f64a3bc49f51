"""Which file of a Hub listing is a model's autoencoder and which its BiFlowNet, before downloading anything.

The authors' file names are known only from their README (``PatchVolume_8x_s2.ckpt``, ``BiFlowNet_0453500.pt``,
...); the repository may rename or add files. So the match goes, per role:

1. the file name the README gives, when the listing has exactly that name;
2. else names that look like the role (autoencoder: PatchVolume / autoencoder / VQ-GAN / AE; denoiser:
   BiFlowNet / diffusion / denoiser) and carry the model's factor ("8x", "x8"), else carry no factor at all;
   a stage-2 autoencoder ("s2", "stage2") beats an unmarked one, which beats a stage-1 one.

More than one best candidate is refused with the candidates named (``--autoencoder-file`` / ``--denoiser-file``
pick one). After download the configuration read from each file confirms the match (see convert.py).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .hub import HubError, RemoteFile
from .known import KnownModel

__all__ = ["RoleMatch", "match_roles", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ROLE_PATTERNS = {
    "autoencoder": re.compile(r"patch[-_ ]?volume|auto[-_ ]?encoder|vq[-_ ]?gan|vqvae|(^|[^a-z])ae([^a-z]|$)", re.I),
    "denoiser": re.compile(r"bi[-_ ]?flow|diffusion|denoiser|(^|[^a-z])dit([^a-z]|$)", re.I),
}
_FACTOR = re.compile(r"(?:^|[^a-z0-9])(?:(\d+)x|x(\d+))(?:[^a-z0-9]|$)", re.I)
_STAGE = re.compile(r"(?:^|[^a-z0-9])(?:s|stage)[-_]?([12])(?:[^a-z0-9]|$)", re.I)


@dataclass(frozen=True)
class RoleMatch:
    """The checkpoint files of a repository chosen as autoencoder and denoiser."""
    autoencoder: RemoteFile
    denoiser: RemoteFile

    def items(self) -> tuple[tuple[str, RemoteFile], ...]:
        """(role, file) pairs, autoencoder first."""
        return (("autoencoder", self.autoencoder), ("denoiser", self.denoiser))


def _factors(name: str) -> set[int]:
    return {int(a or b) for a, b in _FACTOR.findall(name)}


def _rank(file: RemoteFile, role: str, downsample: int) -> int | None:
    """Lower is better; None: not a candidate for this role of this model."""
    name = file.name
    if not name.lower().endswith(CHECKPOINT_SUFFIXES) or not _ROLE_PATTERNS[role].search(name):
        return None
    factors = _factors(file.path)
    if factors and downsample not in factors:
        return None  # marked for another factor
    rank = 0 if factors else 10
    if role == "autoencoder":
        stages = {int(s) for s in _STAGE.findall(name)}
        rank += 0 if stages == {2} else 2 if stages == {1} else 1
    return rank


def _pick(files: Sequence[RemoteFile], role: str, model: KnownModel, chosen: str | None) -> RemoteFile:
    what = f"{model.name}'s {role}"
    if chosen:
        hit = [f for f in files if f.path == chosen] or [f for f in files if f.name == chosen]
        if len(hit) != 1:
            raise HubError(f"{what}: the repository has {'no' if not hit else 'several'} file(s) named "
                           f"'{chosen}' ({_names(files, model)})")
        return hit[0]
    preferred = model.preferred_files[0 if role == "autoencoder" else 1]
    exact = [f for f in files if f.name == preferred]
    if len(exact) == 1:
        return exact[0]
    ranked = [(r, f) for f in files if (r := _rank(f, role, model.downsample)) is not None]
    if not ranked:
        raise HubError(f"{what}: no file in '{model.repo_id}' looks like one ({_names(files, model)}); name it "
                       f"with --{role}-file")
    best = min(r for r, _ in ranked)
    top = [f for r, f in ranked if r == best]
    if len(top) > 1:
        raise HubError(f"{what} is ambiguous in '{model.repo_id}': {', '.join(f.path for f in top)}; pick one "
                       f"with --{role}-file")
    return top[0]


def _names(files: Sequence[RemoteFile], model: KnownModel) -> str:
    ckpts = [f.path for f in files if f.name.lower().endswith(CHECKPOINT_SUFFIXES)]
    return "checkpoint files there: " + (", ".join(ckpts) if ckpts else "none")


def match_roles(files: Sequence[RemoteFile], model: KnownModel, autoencoder_file: str | None = None,
                denoiser_file: str | None = None) -> RoleMatch:
    """The autoencoder and BiFlowNet files of ``model`` in a listing; HubError naming candidates otherwise."""
    ae = _pick(files, "autoencoder", model, autoencoder_file)
    dn = _pick(files, "denoiser", model, denoiser_file)
    if ae.path == dn.path:
        raise HubError(f"{model.name}: '{ae.path}' matches both the autoencoder and the denoiser; name them with "
                       "--autoencoder-file and --denoiser-file")
    return RoleMatch(ae, dn)
