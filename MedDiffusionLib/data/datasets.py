"""Training datasets: volume files listed in a manifest, on-the-fly phantoms, and cached latents.

Every dataset accepts either an integer index or an ``(index, sample_seed)`` key. The training sampler passes
the tuple so that random crops and flips depend only on (seed, epoch, position) - never on worker processes
or on how many steps ran before - which is what makes ``--resume`` reproduce the exact same batches.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from ..io.volumes import DICOM_SUFFIXES, SUPPORTED_SUFFIXES, read_volume
from ..io.atomic import full_suffix
from .transforms import (image_to_network, normalize_percentile, pad_or_crop_to_multiple, random_crop,
                         random_flip, resample_to_spacing)

__all__ = ["ManifestEntry", "load_manifest", "VolumeDataset", "PhantomDataset", "LatentDataset",
           "read_latent_index", "Key"]

log = logging.getLogger(__name__)
Key = Union[int, tuple]


def _split_key(key: Key) -> tuple[int, np.random.Generator]:
    """(index, rng) from an int (rng seeded by the index: deterministic) or an (index, sample_seed) tuple."""
    if isinstance(key, (tuple, list)):
        idx, seed = int(key[0]), int(key[1])
    else:
        idx, seed = int(key), int(key)
    return idx, np.random.default_rng(seed)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestEntry:
    """One volume of a manifest: its file and anatomy class."""
    path: str
    class_name: str
    class_index: int


def _expand(pattern: str, base: Path) -> list[str]:
    """A file, a folder (its volume files, or itself if it holds a DICOM series) or a glob -> paths."""
    p = Path(os.path.expanduser(pattern))
    if not p.is_absolute():
        p = base / p
    if any(c in pattern for c in "*?["):
        hits = sorted(glob.glob(str(p), recursive=True))
        return [h for h in hits if Path(h).is_dir() or full_suffix(h) in SUPPORTED_SUFFIXES + DICOM_SUFFIXES]
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and full_suffix(f) in SUPPORTED_SUFFIXES)
        if files:
            return files
        return [str(p)]  # no single-file volumes: treat as a DICOM series folder
    # Missing files are kept: the dataset reports them by name and skips them.
    return [str(p)]


def load_manifest(path: str | os.PathLike[str] | dict, base_dir: str | os.PathLike[str] | None = None
                  ) -> list[ManifestEntry]:
    """Parse a dataset manifest: class name -> list of files, folders or globs (relative to the manifest).

    Accepted YAML (or an equivalent dict)::

        classes:                      # optional wrapper
          ct-head-neck: [scans/hn/*.nii.gz, /data/more_hn]
          mr-knee: {index: 6, paths: [knee/]}

    Class indices follow the order of appearance unless given with ``index``.
    """
    import yaml

    if isinstance(path, dict):
        raw, base = path, Path(base_dir or ".")
    else:
        mp = Path(path).expanduser()
        if not mp.is_file():
            raise InputError(f"Dataset manifest '{mp}' does not exist")
        try:
            raw = yaml.safe_load(mp.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"Dataset manifest '{mp}' is not valid YAML: {exc}") from exc
        base = Path(base_dir) if base_dir is not None else mp.parent
    if isinstance(raw, dict) and "classes" in raw:
        raw = raw["classes"]
    if not isinstance(raw, dict) or not raw:
        raise InputError("Dataset manifest must map class names to lists of files/folders/globs")
    entries: list[ManifestEntry] = []
    used: dict[int, str] = {}
    for order, (name, spec) in enumerate(raw.items()):
        index = order
        if isinstance(spec, dict):
            index = int(spec.get("index", order))
            spec = spec.get("paths", [])
        if isinstance(spec, str):
            spec = [spec]
        if not isinstance(spec, list):
            raise InputError(f"Manifest class '{name}': expected a list of paths, got {type(spec).__name__}")
        if index in used:
            raise InputError(f"Manifest classes '{used[index]}' and '{name}' share class index {index}")
        used[index] = str(name)
        found = [f for pattern in spec for f in _expand(str(pattern), base)]
        if not found:
            log.warning("manifest class '%s' matched no files", name)
        entries += [ManifestEntry(f, str(name), index) for f in found]
    if not entries:
        raise InputError("Dataset manifest lists no volume files")
    return entries


# --------------------------------------------------------------------------- volume preprocessing


def _prepare(arr: np.ndarray, rng: np.random.Generator, crop: Sequence[int] | None, max_voxels: int | None,
             max_crop: Sequence[int] | None, flip_axes: Sequence[int], flip_prob: float,
             min_foreground: float, retries: int = 10) -> np.ndarray:
    """Random crop (re-drawn when almost empty, as the authors re-sample empty patches) and random flips."""
    if crop is not None:
        for _ in range(retries):
            out = random_crop(arr, crop, rng)
            if float((out > -1.0 + 1e-3).mean()) >= min_foreground:
                break
        arr = out
    elif max_voxels is not None and max_crop is not None and arr.size > max_voxels:
        arr = random_crop(arr, [min(n, c) for n, c in zip(arr.shape, max_crop)], rng)
    if flip_axes and flip_prob > 0:
        arr = random_flip(arr, rng, axes=flip_axes, p=flip_prob)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as3(v: int | Sequence[int] | None) -> tuple[int, int, int] | None:
    if v is None:
        return None
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise InputError(f"expected one or three sizes, got {v}")
    return t


class VolumeDataset(Dataset):
    """Volumes from a manifest: read, resample, normalise to [-1, 1], pad to a multiple, crop and flip.

    ``crop`` (Z, X, Y) gives fixed-size random patches (autoencoder stage 1). Without it whole volumes are
    returned, randomly cropped to ``max_crop`` when they hold more than ``max_voxels`` voxels (stage 2).
    Files that cannot be read (or are empty) are logged by name once and replaced by another volume.
    """

    def __init__(self, entries: Sequence[ManifestEntry], spacing_xyz: Sequence[float] | None = None,
                 crop: int | Sequence[int] | None = None, pad_multiple: int | Sequence[int] = 1,
                 max_voxels: int | None = None, max_crop: int | Sequence[int] | None = None,
                 flip_axes: Sequence[int] = (1, 2), flip_prob: float = 0.5,
                 percentiles: tuple[float, float] = (0.5, 99.5), min_foreground: float = 0.0,
                 cache: bool = False) -> None:
        if not entries:
            raise InputError("VolumeDataset needs at least one file")
        self.entries = list(entries)
        self.spacing = None if spacing_xyz is None else tuple(float(s) for s in spacing_xyz)
        self.crop = _as3(crop)
        self.pad_multiple = pad_multiple
        self.max_voxels = max_voxels
        self.max_crop = _as3(max_crop)
        self.flip_axes = tuple(flip_axes)
        self.flip_prob = float(flip_prob)
        self.percentiles = tuple(percentiles)
        self.min_foreground = float(min_foreground)
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def spacing_of(self, idx: int) -> tuple[float, ...] | None:
        """(X, Y, Z) spacing every item is resampled to (None: each file keeps its own)."""
        return self.spacing

    def load(self, idx: int) -> np.ndarray:
        """The preprocessed whole volume (Z, X, Y) in [-1, 1], padded to ``pad_multiple`` (no randomness)."""
        if idx in self._cache:
            return self._cache[idx]
        entry = self.entries[idx]
        img = read_volume(entry.path)
        if self.spacing is not None:
            img = resample_to_spacing(img, self.spacing)
        arr = image_to_network(img)
        if arr.size == 0:
            raise InputError(f"Volume file '{entry.path}' is empty")
        arr, (lo, hi) = normalize_percentile(arr, *self.percentiles)
        if not hi > lo:  # blank scan (all one value): nothing to learn from, treat like an empty file
            raise InputError(f"Volume file '{entry.path}' is constant (every voxel {lo:g})")
        arr, _ = pad_or_crop_to_multiple(arr, self.pad_multiple, value=-1.0)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.cache:
            self._cache[idx] = arr
        return arr

    def _load_or_skip(self, idx: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        tried = 0
        while True:
            if idx not in self.bad:
                try:
                    return idx, self.load(idx)
                except Exception as exc:  # any reader failure: report by name, skip, keep training
                    self.bad.add(idx)
                    log.warning("skipping unreadable volume '%s': %s", self.entries[idx].path, exc)
            tried += 1
            if len(self.bad) >= len(self.entries) or tried > 10 * len(self.entries):
                raise InputError("No readable volume in the dataset (every file failed; see the warnings above)")
            idx = int(rng.integers(0, len(self.entries)))

    def __getitem__(self, key: Key) -> dict[str, Any]:
        idx, rng = _split_key(key)
        idx, arr = self._load_or_skip(idx, rng)
        arr = _prepare(arr, rng, self.crop, self.max_voxels, self.max_crop, self.flip_axes, self.flip_prob,
                       self.min_foreground)
        entry = self.entries[idx]
        return {"image": torch.from_numpy(arr)[None], "class_index": torch.tensor(entry.class_index),
                "index": torch.tensor(idx)}

    def check_files(self) -> list[str]:
        """Try to read every file once; return (and log) the names of the unreadable ones."""
        bad = []
        for i, entry in enumerate(self.entries):
            try:
                read_volume(entry.path)
            except Exception as exc:
                self.bad.add(i)
                bad.append(entry.path)
                log.warning("unreadable volume '%s': %s", entry.path, exc)
        return bad


class PhantomDataset(Dataset):
    """Synthetic phantoms generated on the fly (CI, demo model): ``volumes_per_class`` distinct seeds each.

    Items cycle through anatomies; the phantom of (anatomy, seed) is cached after its first generation so an
    epoch costs one generation per distinct phantom.
    """

    def __init__(self, anatomies: Sequence[str], size_xyz: Sequence[int],
                 spacing_xyz: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                 volumes_per_class: int = 4, class_indices: dict[str, int] | None = None, seed: int = 0,
                 crop: int | Sequence[int] | None = None, pad_multiple: int | Sequence[int] = 1,
                 flip_axes: Sequence[int] = (1, 2), flip_prob: float = 0.5, min_foreground: float = 0.0,
                 cache: bool = True) -> None:
        from .phantoms import ANATOMIES

        unknown = [a for a in anatomies if a not in ANATOMIES]
        if unknown or not anatomies:
            raise InputError(f"unknown phantom anatomies {unknown}; choose from {', '.join(ANATOMIES)}")
        self.anatomies = list(anatomies)
        self.class_indices = class_indices or _default_class_indices(self.anatomies)
        self.size_xyz = tuple(int(s) for s in size_xyz)
        # One spacing for all, one per anatomy (a mapping), or None: each anatomy's official spacing.
        if isinstance(spacing_xyz, Mapping):
            self.spacing_xyz: Any = {k: tuple(float(s) for s in v) for k, v in spacing_xyz.items()}
        else:
            self.spacing_xyz = None if spacing_xyz is None else tuple(float(s) for s in spacing_xyz)
        self.volumes_per_class = int(volumes_per_class)
        self.seed = int(seed)
        self.crop = _as3(crop)
        self.pad_multiple = pad_multiple
        self.flip_axes = tuple(flip_axes)
        self.flip_prob = float(flip_prob)
        self.min_foreground = float(min_foreground)
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.anatomies) * self.volumes_per_class

    def spacing_of(self, idx: int) -> tuple[float, float, float]:
        """(X, Y, Z) spacing of item ``idx``."""
        from .phantoms import DEFAULT_SPACING

        anatomy = self.describe(idx)[0]
        if isinstance(self.spacing_xyz, dict):
            return self.spacing_xyz.get(anatomy, DEFAULT_SPACING[anatomy])
        if self.spacing_xyz is not None:
            return self.spacing_xyz
        sx, sy, sz = DEFAULT_SPACING[anatomy]
        return float(sx), float(sy), float(sz)

    def describe(self, idx: int) -> tuple[str, int]:
        """(anatomy, phantom seed) of item ``idx``."""
        return self.anatomies[idx % len(self.anatomies)], self.seed + idx // len(self.anatomies)

    def load(self, idx: int) -> np.ndarray:
        """Phantom ``idx`` in [-1, 1] (Z, X, Y) float32, made on first use and then cached."""
        if idx in self._cache:
            return self._cache[idx]
        from .phantoms import make_phantom

        anatomy, seed = self.describe(idx)
        arr = image_to_network(make_phantom(anatomy, self.size_xyz, self.spacing_of(idx), seed))
        arr, _ = normalize_percentile(arr)
        arr, _ = pad_or_crop_to_multiple(arr, self.pad_multiple, value=-1.0)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.cache:
            self._cache[idx] = arr
        return arr

    def __getitem__(self, key: Key) -> dict[str, Any]:
        idx, rng = _split_key(key)
        arr = _prepare(self.load(idx), rng, self.crop, None, None, self.flip_axes, self.flip_prob,
                       self.min_foreground)
        anatomy, _ = self.describe(idx)
        return {"image": torch.from_numpy(arr)[None], "class_index": torch.tensor(self.class_indices[anatomy]),
                "index": torch.tensor(idx)}


def _default_class_indices(anatomies: Sequence[str]) -> dict[str, int]:
    """The catalog's class index when the anatomy is an official one, else the position in the list."""
    from ..catalog import OFFICIAL_ANATOMIES

    table = {a.name: a.class_index for a in OFFICIAL_ANATOMIES}
    if all(a in table for a in anatomies):
        return {a: int(table[a]) for a in anatomies}
    return {a: i for i, a in enumerate(anatomies)}


# --------------------------------------------------------------------------- cached latents


def read_latent_index(index_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``index.json`` written by the latents stage (see Training/stages/latents.py)."""
    p = Path(index_path)
    if p.is_dir():
        p = p / "index.json"
    if not p.is_file():
        raise InputError(f"Latent index '{p}' does not exist; run `train.py latents` first")
    data = json.loads(p.read_text())
    if data.get("format") != "meddiffusion-latents":
        raise InputError(f"'{p}' is not a MedDiffusion latent index")
    data["root"] = str(p.parent)
    return data


def load_latent_file(path: str | os.PathLike[str]) -> torch.Tensor:
    p = Path(path)
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p, allow_pickle=False).astype(np.float32))
    from safetensors.torch import load_file

    return load_file(str(p))["latent"].float()


class LatentDataset(Dataset):
    """Cached, normalised latents with their class index and resolution condition ``res = shape / divisor``.

    ``shape`` keeps only latents of that (D, H, W) size; mixed sizes cannot share a batch, so with
    ``batch_size > 1`` the training stage asks for it explicitly. ``flip_axes`` optionally flips latents
    (off by default: the authors do not augment latents).
    """

    def __init__(self, index_path: str | os.PathLike[str], shape: Sequence[int] | None = None,
                 res_divisor: float = 64.0, flip_axes: Sequence[int] = (), flip_prob: float = 0.5,
                 cache: bool = True) -> None:
        index = read_latent_index(index_path)
        root = Path(index["root"])
        items = index["items"]
        if shape is not None:
            want = [int(s) for s in shape]
            items = [it for it in items if list(it["shape"][1:]) == want]
            if not items:
                raise InputError(f"No cached latent has shape {want}; available: "
                                 f"{sorted({tuple(it['shape'][1:]) for it in index['items']})}")
        if not items:
            raise InputError(f"Latent index '{index_path}' lists no latents")
        self.items = items
        self.paths = [root / it["file"] for it in items]
        self.index = index
        self.res_divisor = float(res_divisor)
        self.flip_axes = tuple(flip_axes)
        self.flip_prob = float(flip_prob)
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The distinct latent shapes (D, H, W) in the store."""
        return sorted({tuple(int(s) for s in it["shape"][1:]) for it in self.items})

    @property
    def codebook_range(self) -> tuple[float, float]:
        """(min, max) of the autoencoder's codebook, with which the latents were normalised to [-1, 1]."""
        lo, hi = self.index["codebook_range"]
        return float(lo), float(hi)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        idx, rng = _split_key(key)
        z = self._cache.get(idx)
        if z is None:
            z = load_latent_file(self.paths[idx])
            if self.cache:
                self._cache[idx] = z
        if self.flip_axes and self.flip_prob > 0:
            z = torch.from_numpy(random_flip(z.numpy(), rng, axes=self.flip_axes, p=self.flip_prob))
        res = torch.tensor(z.shape[1:], dtype=torch.float32) / self.res_divisor
        return {"latent": z, "class_index": torch.tensor(int(self.items[idx]["class_index"])), "res": res,
                "index": torch.tensor(idx)}
