"""Volume transforms: axis order, geometry, percentile normalisation, resampling, shapes, random crops/flips."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.data.transforms import (
    center_pad_or_crop,
    denormalize,
    image_to_network,
    network_to_image,
    network_to_image_like,
    normalize_percentile,
    pad_or_crop_to_multiple,
    random_crop,
    random_flip,
    resample_like,
    resample_to_spacing,
)
from MedDiffusionLib.errors import InputError

DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z: orthonormal, not identity


def _image(size_xyz=(5, 6, 7)) -> sitk.Image:
    arr = np.random.default_rng(1).random(size_xyz[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((1.0, 2.0, -3.0))
    img.SetDirection(DIRECTION)
    return img


def test_image_to_network_axis_order() -> None:
    img = _image((5, 6, 7))  # X=5, Y=6, Z=7
    net = image_to_network(img)
    assert net.shape == (7, 5, 6) and net.dtype == np.float32  # (Z, X, Y)
    for x, y, z in ((0, 0, 0), (4, 1, 2), (2, 5, 6), (3, 3, 1)):
        assert net[z, x, y] == pytest.approx(img.GetPixel(x, y, z))


def test_network_to_image_round_trip_and_geometry() -> None:
    img = _image()
    net = image_to_network(img)
    back = network_to_image(net, img.GetSpacing(), img.GetOrigin(), DIRECTION)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert back.GetSpacing() == img.GetSpacing() and back.GetOrigin() == img.GetOrigin()
    np.testing.assert_allclose(back.GetDirection(), DIRECTION)
    like = network_to_image_like(net * 2, img)
    assert like.GetSize() == img.GetSize() and like.GetDirection() == img.GetDirection()
    np.testing.assert_allclose(sitk.GetArrayFromImage(like), 2 * sitk.GetArrayFromImage(img))
    default = network_to_image(net)
    assert default.GetSpacing() == (1.0, 1.0, 1.0) and default.GetOrigin() == (0.0, 0.0, 0.0)
    # The direction may also be given as a 3x3 matrix.
    assert network_to_image(net, direction=np.eye(3)).GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_network_to_image_errors() -> None:
    with pytest.raises(InputError):
        network_to_image(np.zeros((4, 4)))
    with pytest.raises(InputError):
        network_to_image(np.zeros((4, 4, 4)), spacing_xyz=(1, 0, 1))
    with pytest.raises(InputError, match="reference"):
        network_to_image_like(np.zeros((4, 4, 4)), _image())


def test_normalize_percentile_matches_numpy_reference() -> None:
    arr = np.random.default_rng(2).normal(40, 300, (12, 10, 9)).astype(np.float32)
    arr[0, 0, 0] = 5000.0  # outlier clipped by the percentile window
    out, (lo, hi) = normalize_percentile(arr)
    ref_lo, ref_hi = np.percentile(arr, [0.5, 99.5])
    ref = (np.clip(arr, ref_lo, ref_hi) - ref_lo) / (ref_hi - ref_lo) * 2 - 1
    assert lo == pytest.approx(ref_lo, rel=1e-5) and hi == pytest.approx(ref_hi, rel=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    inside = (arr > lo) & (arr < hi)
    np.testing.assert_allclose(denormalize(out, lo, hi)[inside], arr[inside], rtol=1e-4, atol=1e-2)


def test_normalize_constant_volume_gives_zeros() -> None:
    out, (lo, hi) = normalize_percentile(np.full((4, 5, 6), 7.0))
    assert np.all(out == 0) and not np.isnan(out).any() and lo == hi == 7.0
    with pytest.raises(InputError):
        normalize_percentile(np.zeros((2, 2, 2)), 60, 40)


def test_resample_keeps_extent_origin_direction() -> None:
    img = _image((20, 16, 10))
    out = resample_to_spacing(img, (1.0, 1.5, 1.0))
    assert out.GetSize() == (10, 8, 20)
    extent_in = np.array(img.GetSize()) * np.array(img.GetSpacing())
    extent_out = np.array(out.GetSize()) * np.array(out.GetSpacing())
    np.testing.assert_allclose(extent_out, extent_in)
    assert out.GetOrigin() == img.GetOrigin() and out.GetDirection() == img.GetDirection()
    assert out.GetPixelID() == img.GetPixelID()
    sized = resample_to_spacing(img, (1.0, 1.0, 1.0), size=(3, 4, 5))
    assert sized.GetSize() == (3, 4, 5)


def test_resample_nearest_keeps_labels_and_linear_is_smooth() -> None:
    lab = sitk.GetImageFromArray(np.random.default_rng(3).integers(0, 4, (8, 9, 10)).astype(np.uint8))
    near = resample_to_spacing(lab, (0.5, 0.5, 0.5), interpolator="nearest")
    assert set(np.unique(sitk.GetArrayFromImage(near))) <= {0, 1, 2, 3}
    with pytest.raises(InputError, match="interpolator"):
        resample_to_spacing(lab, (1, 1, 1), interpolator="cubic-ish")
    # Linear resampling of a linear ramp along x is exact at the new voxel centres.
    ramp = np.tile(np.arange(10, dtype=np.float32), (4, 4, 1))  # (Z, Y, X)
    img = sitk.GetImageFromArray(ramp)
    out = sitk.GetArrayFromImage(resample_to_spacing(img, (0.5, 1.0, 1.0)))
    np.testing.assert_allclose(out[0, 0, :19], np.arange(19) * 0.5, atol=1e-5)


def test_resample_like_uses_reference_grid() -> None:
    img, ref = _image((10, 10, 10)), _image((4, 5, 6))
    ref.SetSpacing((2.0, 2.0, 2.0))
    out = resample_like(img, ref)
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(out, getter)() == getattr(ref, getter)()


def test_pad_to_multiple_and_undo() -> None:
    arr = np.random.default_rng(4).random((5, 17, 16)).astype(np.float32)
    out, undo = pad_or_crop_to_multiple(arr, 8)
    assert out.shape == (8, 24, 16)
    np.testing.assert_array_equal(out[undo], arr)
    assert out[0, 0, 0] == -1.0 and (out == -1.0).sum() == out.size - arr.size
    same, undo2 = pad_or_crop_to_multiple(arr, 1)
    assert same.shape == arr.shape and np.array_equal(same[undo2], arr)
    per_axis, _ = pad_or_crop_to_multiple(arr, (4, 2, 3), value=0.0)
    assert per_axis.shape == (8, 18, 18)
    edge, _ = pad_or_crop_to_multiple(arr, 8, mode="edge")
    assert edge[0, 0, 0] == arr[0, 0, 0]


def test_center_pad_or_crop() -> None:
    arr = np.arange(6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6)
    out = center_pad_or_crop(arr, (4, 8, 6), value=-5)
    assert out.shape == (4, 8, 6)
    np.testing.assert_array_equal(out[:, 1:7, :], arr[1:5])
    assert np.all(out[:, 0, :] == -5)
    with pytest.raises(InputError):
        center_pad_or_crop(arr, (4, 4))


def test_random_crop_and_flip_are_seeded() -> None:
    arr = np.random.default_rng(5).random((10, 12, 14)).astype(np.float32)
    a = random_crop(arr, (4, 5, 6), np.random.default_rng(7))
    b = random_crop(arr, (4, 5, 6), np.random.default_rng(7))
    assert a.shape == (4, 5, 6) and np.array_equal(a, b)
    # The crop is a contiguous block of the input.
    hits = [(z, x, y) for z in range(7) for x in range(8) for y in range(9)
            if np.array_equal(arr[z:z + 4, x:x + 5, y:y + 6], a)]
    assert len(hits) == 1
    small = random_crop(arr, (12, 5, 6), np.random.default_rng(0))  # larger than the input: padded
    assert small.shape == (12, 5, 6)
    chan = random_crop(arr[None], (4, 4, 4), np.random.default_rng(0))  # channel axis kept
    assert chan.shape == (1, 4, 4, 4)
    flipped = random_flip(arr, np.random.default_rng(0), axes=(0, 1, 2), p=1.0)
    np.testing.assert_array_equal(flipped, arr[::-1, ::-1, ::-1])
    assert np.array_equal(random_flip(arr, np.random.default_rng(0), p=0.0), arr)
    f1 = random_flip(arr, np.random.default_rng(9))
    f2 = random_flip(arr, np.random.default_rng(9))
    assert np.array_equal(f1, f2) and f1.flags["C_CONTIGUOUS"]
