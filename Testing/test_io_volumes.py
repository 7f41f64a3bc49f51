"""Volume I/O: round trips keep values and geometry, DICOM series folders, clear errors, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.io import atomic
from MedDiffusionLib.io.atomic import atomic_write_bytes, atomic_write_path, atomic_write_text, check_writable, full_suffix
from MedDiffusionLib.io.volumes import SUPPORTED_SUFFIXES, WRITABLE_SUFFIXES, read_volume, write_volume


def _rotation() -> tuple[float, ...]:
    """A non-trivial orthonormal direction matrix (rotations about two axes), row-major."""
    a, b = np.deg2rad(25.0), np.deg2rad(-40.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def _image(dtype=np.float32, size_xyz=(5, 6, 7)) -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(size_xyz[::-1]) * 300).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 1.3))
    img.SetOrigin((10.5, -20.25, 30.0))
    img.SetDirection(_rotation())
    return img


def _assert_same(a: sitk.Image, b: sitk.Image, geo_tol: float) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=geo_tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=geo_tol * 100)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=geo_tol * 10)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_round_trip_keeps_values_and_geometry(tmp_path: Path, suffix: str, dtype) -> None:
    img = _image(dtype)
    path = write_volume(img, tmp_path / f"vol{suffix}")
    assert path.exists()
    back = read_volume(path)
    # NIfTI stores spacing and the affine in float32: allow its rounding.
    _assert_same(img, back, 1e-5 if suffix.startswith(".nii") else 1e-9)
    assert back.GetPixelID() == img.GetPixelID()
    assert [p.name for p in tmp_path.iterdir()] == [f"vol{suffix}"]  # no temp files left


def test_uncompressed_write(tmp_path: Path) -> None:
    img = _image()
    write_volume(img, tmp_path / "a.nrrd", compress=False)
    write_volume(img, tmp_path / "b.nrrd", compress=True)
    assert (tmp_path / "a.nrrd").stat().st_size > (tmp_path / "b.nrrd").stat().st_size * 0.5
    _assert_same(img, read_volume(tmp_path / "a.nrrd"), 1e-9)


def test_detached_header_formats_read(tmp_path: Path) -> None:
    img = _image()
    sitk.WriteImage(img, str(tmp_path / "v.mhd"))
    sitk.WriteImage(img, str(tmp_path / "v.nhdr"))
    for name in ("v.mhd", "v.nhdr"):
        _assert_same(img, read_volume(tmp_path / name), 1e-9)


def _write_dicom_series(img: sitk.Image, folder: Path, series_uid: str, prefix: str) -> None:
    """Write an int16 volume as one DICOM file per slice with the tags a series reader needs."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    common = {
        "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0008|103e": prefix, "0018|0050": f"{img.GetSpacing()[2]:.4f}",
    }
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"{prefix}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_largest_series(tmp_path: Path) -> None:
    img = sitk.Cast(_image(size_xyz=(8, 9, 6)), sitk.sitkInt16)
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    scout = sitk.Cast(_image(size_xyz=(8, 9, 2)), sitk.sitkInt16)
    scout.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write_dicom_series(img, tmp_path, "1.2.826.0.1.3680043.2.1125.2", "main")
    _write_dicom_series(scout, tmp_path, "1.2.826.0.1.3680043.2.1125.3", "scout")
    back = read_volume(tmp_path)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    # A single file of the series stands for its folder.
    assert read_volume(tmp_path / "main_000.dcm").GetSize() == img.GetSize()


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nrrd"
    with pytest.raises(InputError, match="nope.nrrd"):
        read_volume(missing)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz"):
        read_volume(empty)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="garbage.nrrd"):
        read_volume(garbage)
    odd = tmp_path / "vol.png"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match=r"vol\.png.*\.nrrd"):
        read_volume(odd)
    with pytest.raises(InputError, match="No DICOM series"):
        read_volume(tmp_path)  # a folder without DICOM files


def test_read_refuses_2d_and_vector_images(tmp_path: Path) -> None:
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(4, 5, sitk.sitkFloat32), str(flat))
    with pytest.raises(InputError, match=r"flat\.nrrd.*2D"):
        read_volume(flat)
    vec = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(vec))
    with pytest.raises(InputError, match=r"rgb\.nrrd.*components"):
        read_volume(vec)


def test_singleton_4d_nifti_is_squeezed(tmp_path: Path) -> None:
    arr = np.arange(1 * 6 * 5 * 4, dtype=np.float32).reshape(1, 6, 5, 4)  # (t, z, y, x)
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(path))
    img = read_volume(path)
    assert img.GetDimension() == 3 and img.GetSize() == (4, 5, 6)


def test_write_errors(tmp_path: Path) -> None:
    img = _image()
    with pytest.raises(InputError, match=r"\.nrrd.*\.nii\.gz"):
        write_volume(img, tmp_path / "vol.tiff")
    with pytest.raises(InputError, match="does not exist"):
        write_volume(img, tmp_path / "missing_dir" / "vol.nrrd")
    with pytest.raises(InputError, match="SimpleITK image"):
        write_volume(np.zeros((3, 3, 3)), tmp_path / "vol.nrrd")  # type: ignore[arg-type]
    assert set(WRITABLE_SUFFIXES) <= set(SUPPORTED_SUFFIXES)


def test_full_suffix() -> None:
    assert full_suffix("a/b/vol.nii.gz") == ".nii.gz"
    assert full_suffix("x.y.NRRD") == ".nrrd"
    assert full_suffix("noext") == ""


def test_atomic_temp_keeps_real_suffix_and_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "out.nii.gz"
    dest.write_text("old")
    with atomic_write_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.nii.gz") and tmp != dest
        tmp.write_text("new")
        assert dest.read_text() == "old"  # nothing visible before the block ends
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_atomic_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_volume_failure_never_leaves_half_file(tmp_path: Path, monkeypatch) -> None:
    def broken_write(image, path, useCompression=True):  # noqa: N803 - SimpleITK's keyword
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(InputError, match="out.nrrd"):
        write_volume(_image(), tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_atomic_bytes_and_text(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.json", '{"k": 1}')
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.json").read_text() == '{"k": 1}'


def test_check_writable(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "x.nrrd") == (tmp_path / "x.nrrd").absolute()
    with pytest.raises(InputError, match="folder"):
        check_writable(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "x.txt", "hi")
    if os.name == "posix" and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match="not writable"):
                check_writable(ro / "x.nrrd")
        finally:
            ro.chmod(0o700)
    assert atomic.full_suffix("v.mha") == ".mha"


def test_png_preview_round_trip(tmp_path) -> None:
    """Previews are written by SimpleITK's PNG writer: grey and RGB read back pixel-exact."""
    from MedDiffusionLib.io.preview import mid_slice_montage, save_preview, write_png

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for name, arr in (("grey.png", grey), ("rgb.png", rgb)):
        write_png(tmp_path / name, arr)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), arr)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "bad.png", grey.astype(np.float32))
    vol = rng.normal(size=(6, 8, 10)).astype(np.float32)
    save_preview(tmp_path / "montage.png", vol, (1.0, 1.0, 2.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "montage.png"))),
                                  mid_slice_montage(vol, (1.0, 1.0, 2.0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "montage.png", "rgb.png"]  # no temporaries
