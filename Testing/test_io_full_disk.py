"""A full disk never replaces a good file with a truncated one (issue 11, item 3).

SimpleITK's NIfTI writer ignores short writes: before the fix, writing to a full disk "succeeded" and the atomic
rename put the truncated file over the previous one. Now the temporary file is verified (the size its header
implies, a read-back compared voxel for voxel) before the rename. A real full disk (a 1 MiB tmpfs, where
mounting is permitted) and simulated short writes (everywhere) are both tested."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.io.atomic import STALE_TMP_S, WriteVerificationError, atomic_write_path, atomic_write_text
from MedDiffusionLib.io.volumes import WRITABLE_SUFFIXES, read_volume, write_volume


def _image(side: int, seed: int = 0) -> sitk.Image:
    arr = np.random.default_rng(seed).normal(size=(side, side, side)).astype(np.float32)  # incompressible
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((1.0, -2.0, 3.0))
    return img


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a real 'No space left on device'. Skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


@pytest.mark.parametrize("suffix", WRITABLE_SUFFIXES)
def test_full_disk_keeps_the_previous_file(tiny_disk: Path, suffix: str) -> None:
    dest = tiny_disk / f"result{suffix}"
    write_volume(_image(16, seed=1), dest)  # 16 KB: fits
    before = dest.read_bytes()
    with pytest.raises(InputError, match=f"result{suffix}"):
        write_volume(_image(80, seed=2), dest)  # 2 MB of random floats: does not fit
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == [dest.name]  # no temporary left behind
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(dest)),
                                  sitk.GetArrayFromImage(_image(16, seed=1)))


@pytest.mark.parametrize("suffix", WRITABLE_SUFFIXES)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_short_or_corrupt_writes_are_caught(tmp_path: Path, monkeypatch, suffix: str, damage: str) -> None:
    """A writer that silently writes less (or other bytes) than asked, as on a full disk."""
    real_write = sitk.WriteImage

    def damaging_write(image, path, useCompression=True):  # noqa: N803 - SimpleITK's keyword
        real_write(image, path, useCompression)
        data = bytearray(Path(path).read_bytes())
        if damage == "truncate":
            data = data[: len(data) * 2 // 3]
        else:
            data[-100] ^= 0x40  # same size, one voxel (or compressed byte) changed
        Path(path).write_bytes(bytes(data))

    dest = tmp_path / f"out{suffix}"
    write_volume(_image(8), dest)
    before = dest.read_bytes()
    monkeypatch.setattr(sitk, "WriteImage", damaging_write)
    with pytest.raises(InputError, match=f"could not write '.*out{suffix}'.*unchanged"):
        write_volume(_image(12, seed=3), dest, compress=False)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_verified_write_round_trips_exactly(tmp_path: Path) -> None:
    img = _image(10)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = np.nan  # NaN compares equal to itself byte-wise
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    for suffix in WRITABLE_SUFFIXES:
        for compress in (False, True):
            write_volume(nan_img, tmp_path / f"v{compress}{suffix}", compress=compress)


def test_stale_temporaries_are_swept(tmp_path: Path) -> None:
    old = time.time() - STALE_TMP_S - 60
    stale = [tmp_path / ".result.0badc0de.tmp.nii.gz", tmp_path / ".config.12345678.tmp"]
    fresh = tmp_path / ".result.89abcdef.tmp.nrrd"  # another process may be writing it right now
    foreign = [tmp_path / ".hidden.tmp", tmp_path / "notes.0badc0de.tmp.txt", tmp_path / ".x.zzzzzzzz.tmp"]
    for p in stale + [fresh] + foreign:
        p.write_text("x")
    for p in stale + foreign:
        os.utime(p, (old, old))
    atomic_write_text(tmp_path / "new.txt", "hello")
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in foreign)


def test_truncated_checkpoint_formats_are_caught(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    for name, save in (("w.safetensors", lambda p: save_file({"w": torch.ones(1000)}, str(p))),
                       ("c.pt", lambda p: torch.save({"w": torch.ones(1000)}, p))):
        dest = tmp_path / name
        dest.write_bytes(b"previous")
        with pytest.raises(WriteVerificationError, match="unchanged"):
            with atomic_write_path(dest) as tmp:
                save(tmp)
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) - 700])
        assert dest.read_bytes() == b"previous"
        with atomic_write_path(dest) as tmp:  # the complete file passes
            save(tmp)
        assert dest.stat().st_size > 1000
