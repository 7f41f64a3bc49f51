"""Procedural phantoms: geometry, plausible intensities per modality, determinism, tissue contrasts."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.data import phantoms
from MedDiffusionLib.data.phantoms import ANATOMIES, DEFAULT_SPACING, MODALITY, make_phantom, make_phantom_array
from MedDiffusionLib.data.transforms import image_to_network
from MedDiffusionLib.errors import InputError

SIZE = (28, 24, 20)  # distinct X, Y, Z to catch axis mix-ups; small for speed


def test_anatomy_table() -> None:
    assert ANATOMIES == ("ct-head-neck", "ct-chest-abdomen", "ct-legs", "mr-t1-brain", "mr-t2-brain",
                         "mr-abdomen", "mr-knee")
    assert [MODALITY[a] for a in ANATOMIES] == ["CT"] * 3 + ["MR"] * 4
    assert set(DEFAULT_SPACING) == set(ANATOMIES)


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_geometry_and_intensity_ranges(anatomy: str) -> None:
    img = make_phantom(anatomy, SIZE, (1.1, 0.9, 1.7), seed=0)
    assert img.GetSize() == SIZE and img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSpacing() == pytest.approx((1.1, 0.9, 1.7))
    assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in SIZE])
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)  # origin centres the volume
    arr = sitk.GetArrayFromImage(img)
    assert np.isfinite(arr).all()
    if MODALITY[anatomy] == "CT":
        assert arr.min() >= -1024 and arr.max() <= 3071 and np.array_equal(arr, np.rint(arr))
        assert (arr < -900).any(), "no air"
        assert (arr > 300).any(), "no bone"
        assert ((arr > -150) & (arr < 100)).mean() > 0.1, "too little soft tissue/fat"
    else:
        assert arr.min() >= 0 and arr.max() > 0
        assert (arr > 0.3 * arr.max()).mean() > 0.05, "body nearly empty"


@pytest.mark.parametrize("anatomy", ["ct-chest-abdomen", "mr-knee"])
def test_default_spacing_and_determinism(anatomy: str) -> None:
    a = make_phantom(anatomy, (20, 20, 16), seed=3)
    b = make_phantom(anatomy, (20, 20, 16), seed=3)
    c = make_phantom(anatomy, (20, 20, 16), seed=4)
    assert a.GetSpacing() == DEFAULT_SPACING[anatomy]
    assert make_phantom(anatomy, (8, 8, 8), seed=-5).GetSize() == (8, 8, 8)  # any int seed works
    arr_a, arr_b, arr_c = (sitk.GetArrayFromImage(i) for i in (a, b, c))
    np.testing.assert_array_equal(arr_a, arr_b)
    assert np.abs(arr_a - arr_c).mean() > 1e-3 * np.abs(arr_a).mean()


def test_phantom_array_is_network_order() -> None:
    arr = make_phantom_array("mr-t1-brain", (20, 28, 24), seed=1)  # (Z, X, Y)
    assert arr.shape == (20, 28, 24) and arr.dtype == np.float32
    img = make_phantom("mr-t1-brain", (28, 24, 20), seed=1)
    np.testing.assert_array_equal(arr, image_to_network(img))


def _median_by_tissue(anatomy: str, seed: int = 0) -> dict[str, float]:
    """Median intensity per tissue label (median: robust to partial volume at the many small-grid edges)."""
    vol, labels = phantoms._build(anatomy, (40, 40, 40), (1.0, 1.0, 1.0), seed)
    names = phantoms.tissue_names()
    return {names[k]: float(np.median(vol[labels == k])) for k in np.unique(labels)}


def test_mr_brain_contrasts() -> None:
    t1, t2 = _median_by_tissue("mr-t1-brain"), _median_by_tissue("mr-t2-brain")
    assert t1["wm"] > t1["gm"] > t1["csf"]  # T1: white matter bright, CSF dark
    assert t2["csf"] > t2["gm"] > t2["wm"]  # T2: CSF bright
    assert t1["fat"] > t1["muscle"]


def test_ct_tissue_values() -> None:
    ct = _median_by_tissue("ct-chest-abdomen", seed=1)
    assert ct["air"] < -900 and -950 < ct["lung"] < -700 and -150 < ct["fat"] < -50
    assert 0 < ct["muscle"] < 100 and ct["cortical"] > 400 and 150 < ct["cancellous"] < 500
    assert ct["liver"] > ct["fat"]


def test_errors_are_clear() -> None:
    with pytest.raises(InputError, match="ct-head-neck"):
        make_phantom("ct-brain", SIZE)
    with pytest.raises(InputError, match="size"):
        make_phantom("ct-legs", (2, 8, 8))
    with pytest.raises(InputError, match="spacing"):
        make_phantom("ct-legs", SIZE, (1, -1, 1))
