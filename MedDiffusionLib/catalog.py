"""What a model can generate: anatomies (class index, modality, latent sizes, voxel spacing).

Latent sizes are (D, H, W) in network order; users see volume sizes in (X, Y, Z) voxels. The network order
is (Z, X, Y), so for a latent (D, H, W) the volume is X = H*f, Y = W*f, Z = D*f with f the autoencoder's
downsample factor.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Tuple

from .errors import InputError
from .options import parse_size  # noqa: F401  (re-exported: sizes are parsed in one place)

__all__ = [
    "Anatomy", "Catalog", "OFFICIAL_ANATOMIES", "OFFICIAL_CATALOG_8X", "official_catalog", "parse_size",
    "latent_to_volume_xyz", "volume_xyz_to_latent", "MODALITIES",
]

MODALITIES = ("CT", "MR")
LatentSize = Tuple[int, int, int]
SizeXYZ = Tuple[int, int, int]
SpacingXYZ = Tuple[float, float, float]


def latent_to_volume_xyz(latent: Sequence[int], downsample: int) -> SizeXYZ:
    """User-facing volume size (X, Y, Z) of a (D, H, W) latent."""
    d, h, w = (int(v) for v in latent)
    return h * downsample, w * downsample, d * downsample


def volume_xyz_to_latent(size_xyz: Sequence[int], downsample: int) -> LatentSize:
    """(D, H, W) latent of an (X, Y, Z) volume size; each must be a multiple of ``downsample``."""
    x, y, z = (int(v) for v in size_xyz)
    bad = [f"{a}={v}" for a, v in zip("XYZ", (x, y, z)) if v <= 0 or v % downsample]
    if bad:
        raise InputError(f"volume size {x}x{y}x{z} must be positive multiples of {downsample} "
                         f"(the autoencoder's downsample factor): {', '.join(bad)}")
    return z // downsample, x // downsample, y // downsample


def _triple(value: Any, what: str, cast: type = int) -> tuple:
    try:
        vals = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three numbers, got {value!r}") from None
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise InputError(f"{what} must be three positive numbers, got {value!r}")
    return vals


@dataclass(frozen=True)
class Anatomy:
    """One generatable class of the denoiser.

    Attributes:
        name: the name users type (e.g. 'ct-legs'); looked up case-insensitively.
        class_index: the denoiser's class label.
        modality: 'CT' or 'MR'.
        latent_sizes: trained latent sizes (D, H, W), the first the default; volume = (H, W, D) * downsample
            as (X, Y, Z).
        spacing_xyz: voxel spacing in mm (X, Y, Z).
        description: one line for listings.
        spacings_xyz: spacing in mm per latent size, where the trained sizes differ in spacing; () = all
            ``spacing_xyz``.

    Raises:
        InputError: an unknown modality, no latent size, or a size or spacing that is not three positive
            numbers.
    """

    name: str
    class_index: int
    modality: str
    latent_sizes: tuple[LatentSize, ...]
    spacing_xyz: SpacingXYZ = (1.0, 1.0, 1.0)
    description: str = ""
    spacings_xyz: tuple[SpacingXYZ, ...] = field(default=())  # per latent size, if they differ

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InputError(f"anatomy '{self.name}': modality must be one of {MODALITIES}, got {self.modality!r}")
        if not self.latent_sizes:
            raise InputError(f"anatomy '{self.name}' needs at least one latent size")
        # Normalise (lists from YAML/JSON -> tuples) so instances compare and hash consistently.
        object.__setattr__(self, "latent_sizes",
                           tuple(_triple(s, f"latent size of '{self.name}'") for s in self.latent_sizes))
        object.__setattr__(self, "spacing_xyz", _triple(self.spacing_xyz, f"spacing of '{self.name}'", float))
        object.__setattr__(self, "spacings_xyz",
                           tuple(_triple(s, f"spacing of '{self.name}'", float) for s in self.spacings_xyz))
        object.__setattr__(self, "class_index", int(self.class_index))

    @property
    def default_latent_size(self) -> LatentSize:
        """The first trained latent size (D, H, W): the default when no size is asked for."""
        return self.latent_sizes[0]

    def volume_sizes_xyz(self, downsample: int) -> list[SizeXYZ]:
        """The trained volume sizes as (X, Y, Z) voxels: (H, W, D) * downsample."""
        return [latent_to_volume_xyz(s, downsample) for s in self.latent_sizes]

    def spacing_for(self, latent_size: Sequence[int]) -> SpacingXYZ:
        """Spacing used with a trained latent size (the default spacing for other sizes)."""
        size = tuple(int(v) for v in latent_size)
        if self.spacings_xyz and size in self.latent_sizes:
            return self.spacings_xyz[self.latent_sizes.index(size)]
        return self.spacing_xyz

    def scaled(self, factor: int) -> "Anatomy":
        """The same anatomy with latent sizes multiplied by ``factor`` (4x models: factor 2)."""
        sizes = tuple((x * factor, y * factor, z * factor) for x, y, z in self.latent_sizes)
        return Anatomy(self.name, self.class_index, self.modality, sizes, self.spacing_xyz, self.description,
                       self.spacings_xyz)

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain JSON/YAML values (the form model.yaml stores)."""
        out: dict[str, Any] = {"name": self.name, "class_index": self.class_index, "modality": self.modality,
                               "latent_sizes": [list(s) for s in self.latent_sizes],
                               "spacing_xyz": list(self.spacing_xyz), "description": self.description}
        if self.spacings_xyz:
            out["spacings_xyz"] = [list(s) for s in self.spacings_xyz]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Anatomy":
        """An anatomy from its `to_dict` form; InputError naming the missing or bad field."""
        if not isinstance(data, Mapping):
            raise InputError(f"an anatomy entry must be a mapping, got {data!r}")
        missing = [k for k in ("name", "class_index", "modality", "latent_sizes") if k not in data]
        if missing:
            raise InputError(f"anatomy entry {dict(data)!r} lacks {', '.join(missing)}")
        return cls(name=str(data["name"]), class_index=int(data["class_index"]), modality=str(data["modality"]),
                   latent_sizes=tuple(tuple(s) for s in data["latent_sizes"]),
                   spacing_xyz=tuple(data.get("spacing_xyz", (1.0, 1.0, 1.0))),
                   description=str(data.get("description", "")),
                   spacings_xyz=tuple(tuple(s) for s in data.get("spacings_xyz", ())))


class Catalog(Sequence[Anatomy]):
    """Ordered anatomies of one model; lookup by name (case-insensitive).

    Raises:
        InputError: two anatomies with one name or one class index.
    """

    def __init__(self, anatomies: Iterable[Anatomy]) -> None:
        self._items: tuple[Anatomy, ...] = tuple(anatomies)
        names = [a.name for a in self._items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"duplicate anatomy names in the catalog: {', '.join(dupes)}")
        indices = [a.class_index for a in self._items]
        if len(set(indices)) != len(indices):
            raise InputError("two anatomies in the catalog share a class index")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]

    def __iter__(self) -> Iterator[Anatomy]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._items == other._items

    def __repr__(self) -> str:
        return f"Catalog({', '.join(self.names)})"

    @property
    def names(self) -> list[str]:
        """The anatomy names in class-index order."""
        return [a.name for a in self._items]

    def get(self, name: str) -> Anatomy:
        """The anatomy called ``name``; InputError listing the valid names otherwise."""
        key = str(name).strip().lower()
        for a in self._items:
            if a.name.lower() == key:
                return a
        raise InputError(f"unknown anatomy '{name}'; choose one of: {', '.join(self.names)}")

    def by_index(self, class_index: int) -> Anatomy:
        """The anatomy the denoiser knows as class ``class_index``; InputError if there is none."""
        for a in self._items:
            if a.class_index == int(class_index):
                return a
        raise InputError(f"no anatomy with class index {class_index}; valid: "
                         f"{', '.join(str(a.class_index) for a in self._items)}")

    def by_modality(self, modality: str) -> list[Anatomy]:
        """The anatomies of one modality ("CT" or "MR"; "MRI" is accepted), in class-index order."""
        m = str(modality).strip().upper()
        if m == "MRI":
            m = "MR"
        if m not in MODALITIES:
            raise InputError(f"unknown modality '{modality}'; choose one of: {', '.join(MODALITIES)}")
        return [a for a in self._items if a.modality == m]

    def to_dict(self) -> list[dict[str, Any]]:
        """A list of plain dicts (the ``anatomies`` entry of model.yaml)."""
        return [a.to_dict() for a in self._items]

    @classmethod
    def from_dict(cls, data: Any) -> "Catalog":
        """From ``to_dict()`` output (a list) or a mapping with an ``anatomies`` list."""
        if isinstance(data, Mapping):
            data = data.get("anatomies")
        if not isinstance(data, (list, tuple)):
            raise InputError("a catalog must be a list of anatomy entries")
        return cls(Anatomy.from_dict(d) for d in data)


# Table of OFFICIAL.md (8x latent sizes, (D, H, W)); the first size is the default.
OFFICIAL_ANATOMIES: tuple[Anatomy, ...] = (
    Anatomy("ct-head-neck", 0, "CT", ((32, 32, 32), (16, 32, 32)), (1.0, 1.0, 1.0), "CT head and neck"),
    Anatomy("ct-chest-abdomen", 1, "CT", ((32, 32, 32), (64, 64, 64)), (1.25, 1.25, 1.25),
            "CT chest and abdomen", spacings_xyz=((1.25, 1.25, 1.25), (0.7, 0.7, 1.0))),
    Anatomy("ct-legs", 2, "CT", ((32, 32, 32), (64, 32, 32)), (1.25, 1.25, 1.25), "CT lower limbs"),
    Anatomy("mr-t1-brain", 3, "MR", ((24, 24, 24),), (1.0, 1.0, 1.0), "MR T1-weighted brain"),
    Anatomy("mr-t2-brain", 4, "MR", ((24, 24, 24),), (1.0, 1.0, 1.0), "MR T2-weighted brain"),
    Anatomy("mr-abdomen", 5, "MR", ((16, 32, 32),), (1.2, 1.2, 2.0), "MR abdomen"),
    Anatomy("mr-knee", 6, "MR", ((8, 40, 40),), (1.0, 1.0, 1.0), "MR knee"),
)
OFFICIAL_CATALOG_8X = Catalog(OFFICIAL_ANATOMIES)


def official_catalog(downsample: int = 8) -> Catalog:
    """The published models' catalog: the 4x models use twice each 8x latent size (same volume sizes)."""
    if downsample not in (4, 8):
        raise InputError(f"the published models downsample 4x or 8x, got {downsample}")
    if downsample == 8:
        return OFFICIAL_CATALOG_8X
    return Catalog(a.scaled(8 // downsample) for a in OFFICIAL_ANATOMIES)
