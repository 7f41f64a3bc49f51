"""Anatomy catalog: the official table, lookups, (X, Y, Z) sizes, serialisation, size parsing."""
from __future__ import annotations

import json

import pytest
import yaml

from MedDiffusionLib.catalog import (
    OFFICIAL_CATALOG_8X,
    Anatomy,
    Catalog,
    latent_to_volume_xyz,
    official_catalog,
    parse_size,
    volume_xyz_to_latent,
)
from MedDiffusionLib.errors import InputError

NAMES = ["ct-head-neck", "ct-chest-abdomen", "ct-legs", "mr-t1-brain", "mr-t2-brain", "mr-abdomen", "mr-knee"]


def test_official_table() -> None:
    cat = OFFICIAL_CATALOG_8X
    assert cat.names == NAMES and [a.class_index for a in cat] == list(range(7))
    assert [a.modality for a in cat] == ["CT"] * 3 + ["MR"] * 4
    assert cat.get("ct-head-neck").latent_sizes == ((32, 32, 32), (16, 32, 32))
    assert cat.get("ct-legs").latent_sizes == ((32, 32, 32), (64, 32, 32))
    assert cat.get("mr-knee").latent_sizes == ((8, 40, 40),)
    assert cat.get("mr-abdomen").spacing_xyz == (1.2, 1.2, 2.0)
    chest = cat.get("ct-chest-abdomen")
    assert chest.spacing_for((32, 32, 32)) == (1.25, 1.25, 1.25)
    assert chest.spacing_for((64, 64, 64)) == (0.7, 0.7, 1.0)
    assert chest.spacing_for((8, 8, 8)) == chest.spacing_xyz


def test_volume_sizes_and_4x_catalog() -> None:
    # Latent (D, H, W) -> volume (X, Y, Z) = (H, W, D) * downsample.
    knee = OFFICIAL_CATALOG_8X.get("mr-knee")
    assert knee.volume_sizes_xyz(8) == [(320, 320, 64)]
    assert OFFICIAL_CATALOG_8X.get("ct-head-neck").volume_sizes_xyz(8) == [(256, 256, 256), (256, 256, 128)]
    cat4 = official_catalog(4)
    assert cat4.names == NAMES
    assert cat4.get("mr-knee").latent_sizes == ((16, 80, 80),)
    for a8, a4 in zip(OFFICIAL_CATALOG_8X, cat4):  # same volumes, twice the latent
        assert a8.volume_sizes_xyz(8) == a4.volume_sizes_xyz(4)
    assert official_catalog(8) is OFFICIAL_CATALOG_8X
    with pytest.raises(InputError, match="4x or 8x"):
        official_catalog(16)
    assert latent_to_volume_xyz((16, 32, 48), 8) == (256, 384, 128)
    assert volume_xyz_to_latent((256, 384, 128), 8) == (16, 32, 48)
    with pytest.raises(InputError, match="multiples of 8"):
        volume_xyz_to_latent((250, 256, 128), 8)


def test_lookups_and_errors() -> None:
    cat = OFFICIAL_CATALOG_8X
    assert cat.get("  MR-Knee ").name == "mr-knee"  # case and spaces are forgiven
    with pytest.raises(InputError) as info:
        cat.get("ct-brain")
    assert "ct-brain" in str(info.value) and all(n in str(info.value) for n in NAMES)
    assert [a.name for a in cat.by_modality("ct")] == NAMES[:3]
    assert [a.name for a in cat.by_modality("MRI")] == NAMES[3:]
    with pytest.raises(InputError, match="modality"):
        cat.by_modality("PET")
    assert cat.by_index(4).name == "mr-t2-brain"
    with pytest.raises(InputError, match="class index"):
        cat.by_index(7)
    assert len(cat) == 7 and cat[0].name == "ct-head-neck" and "mr-knee" in repr(cat)


def test_invalid_catalogs() -> None:
    a = Anatomy("a", 0, "CT", ((4, 4, 4),))
    with pytest.raises(InputError, match="duplicate"):
        Catalog([a, Anatomy("a", 1, "CT", ((4, 4, 4),))])
    with pytest.raises(InputError, match="class index"):
        Catalog([a, Anatomy("b", 0, "MR", ((4, 4, 4),))])
    with pytest.raises(InputError, match="modality"):
        Anatomy("c", 0, "PET", ((4, 4, 4),))
    with pytest.raises(InputError, match="latent size"):
        Anatomy("c", 0, "CT", ((4, 4),))
    with pytest.raises(InputError, match="at least one"):
        Anatomy("c", 0, "CT", ())
    with pytest.raises(InputError):
        Catalog.from_dict("not a list")
    with pytest.raises(InputError, match="lacks"):
        Catalog.from_dict([{"name": "x"}])


def test_serialisation_round_trip() -> None:
    data = OFFICIAL_CATALOG_8X.to_dict()
    for text in (json.dumps(data), yaml.safe_dump(data)):
        back = Catalog.from_dict(yaml.safe_load(text))  # JSON is YAML
        assert back == OFFICIAL_CATALOG_8X
    assert Catalog.from_dict({"anatomies": data}) == OFFICIAL_CATALOG_8X
    assert "spacings_xyz" in data[1] and "spacings_xyz" not in data[0]


@pytest.mark.parametrize("text, expected", [
    ("256x256x128", (256, 256, 128)), ("64X32x16", (64, 32, 16)), (" 8 x 8 x 8 ", (8, 8, 8)),
    ("320,320,64", (320, 320, 64)), ("96\u00d796\u00d748", (96, 96, 48)), ([1, 2, 3], (1, 2, 3)),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["256x256", "256x256x128x4", "axbxc", "256x-1x128", "0x8x8", "", "1.5x2x3", [1, 2]])
def test_parse_size_errors(text) -> None:
    with pytest.raises(InputError):
        parse_size(text)
