"""Training data: manifests, unreadable files skipped by name, normalisation, crops/flips, resumable order."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from _training_helpers import single_thread, write_latents, write_manifest, write_volumes  # noqa: F401
from MedDiffusionLib.data.datasets import LatentDataset, VolumeDataset, load_manifest
from MedDiffusionLib.errors import InputError
from Training.config import apply_overrides, load_config
from MedDiffusionLib.pipelines.distributed import WorldInfo
from Training.trainer import ResumableSampler, StatefulLoader


@pytest.fixture()
def vols(tmp_path: Path) -> list[Path]:
    return write_volumes(tmp_path / "data", n=4)


def test_manifest_files_folders_globs_and_indices(tmp_path: Path, vols: list[Path]) -> None:
    (tmp_path / "data" / "notes.txt").write_text("not a volume")
    m = write_manifest(tmp_path / "m.yaml", {
        "ct-head-neck": ["data/v0.nii.gz", "data/v1.nrrd"],          # relative to the manifest
        "mr-knee": {"index": 6, "paths": ["data/*.nii.gz"]},         # glob, explicit class index
        "mr-abdomen": [str(tmp_path / "data")],                      # a folder: its volume files
    })
    entries = load_manifest(m)
    by_class = {}
    for e in entries:
        by_class.setdefault((e.class_name, e.class_index), []).append(Path(e.path).name)
    assert by_class[("ct-head-neck", 0)] == ["v0.nii.gz", "v1.nrrd"]
    assert by_class[("mr-knee", 6)] == ["v0.nii.gz", "v2.nii.gz"]
    assert by_class[("mr-abdomen", 2)] == ["v0.nii.gz", "v1.nrrd", "v2.nii.gz", "v3.nrrd"]


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="class names"):
        load_manifest(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="share class index"):
        load_manifest({"a": {"index": 1, "paths": ["x.nii"]}, "b": {"index": 1, "paths": ["y.nii"]}})


def test_unreadable_and_empty_files_reported_by_name_and_skipped(tmp_path: Path, vols: list[Path],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "data" / "empty.nii.gz"
    empty.write_bytes(b"")
    corrupt = tmp_path / "data" / "corrupt.nrrd"
    corrupt.write_bytes(b"NRRD0004\ngarbage that is not a header\n")
    import SimpleITK as sitk

    blank = tmp_path / "data" / "blank.nrrd"
    sitk.WriteImage(sitk.Image(6, 6, 6, sitk.sitkInt16), str(blank))  # readable but all zeros
    entries = load_manifest({"a": [str(empty), str(vols[0]), str(corrupt), str(tmp_path / "missing.nii"),
                                   str(blank)]})
    ds = VolumeDataset(entries, crop=8)
    with caplog.at_level(logging.WARNING):
        items = [ds[(i, 100 + i)] for i in range(len(ds))]  # a whole "epoch": never raises
    assert all(it["image"].shape == (1, 8, 8, 8) for it in items)
    assert all(int(it["index"]) == 1 for it in items)  # every bad item replaced by the readable one
    text = caplog.text
    for bad in (empty, corrupt, tmp_path / "missing.nii", blank):
        assert bad.name in text
    assert ds.bad == {0, 2, 3, 4}
    all_bad = VolumeDataset(load_manifest({"a": [str(empty)]}))
    with pytest.raises(InputError, match="No readable volume"):
        all_bad[0]


def test_check_files_lists_bad_names(tmp_path: Path, vols: list[Path]) -> None:
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    ds = VolumeDataset(load_manifest({"a": [str(vols[0]), str(empty)]}))
    assert ds.check_files() == [str(empty)]


def test_normalisation_and_padding(vols: list[Path]) -> None:
    ds = VolumeDataset(load_manifest({"a": [str(vols[0])]}), pad_multiple=8, flip_prob=0)
    arr = ds.load(0)
    # SimpleITK (Z, Y, X) = (12, 10, 14) -> network (Z, X, Y) = (12, 14, 10), padded to multiples of 8.
    assert arr.shape == (16, 16, 16) and arr.dtype == np.float32
    assert arr.min() == pytest.approx(-1.0) and arr.max() == pytest.approx(1.0)
    assert (arr == -1.0).sum() > 16 * 16 * 16 - 12 * 14 * 10  # padding is background (-1)
    whole = ds[0]["image"]
    assert whole.shape == (1, 16, 16, 16)


def test_resampling_to_target_spacing(vols: list[Path]) -> None:
    ds = VolumeDataset(load_manifest({"a": [str(vols[0])]}), spacing_xyz=(2.0, 2.0, 2.0), flip_prob=0)
    assert ds.load(0).shape == (6, 7, 5)


def test_crops_flips_deterministic_per_key(vols: list[Path]) -> None:
    ds = VolumeDataset(load_manifest({"a": [str(p) for p in vols]}), crop=(4, 6, 8), flip_prob=0.5)
    a, b, c = ds[(1, 42)], ds[(1, 42)], ds[(1, 43)]
    assert a["image"].shape == (1, 4, 6, 8)
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    # Large-volume stage-2 crop: whole volume unless above max_voxels, then a random max_crop crop.
    big = VolumeDataset(load_manifest({"a": [str(vols[0])]}), max_voxels=1000, max_crop=8, flip_prob=0)
    assert big[(0, 1)]["image"].shape == (1, 8, 8, 8)
    small = VolumeDataset(load_manifest({"a": [str(vols[0])]}), max_voxels=10**6, max_crop=8, flip_prob=0)
    assert small[(0, 1)]["image"].shape == (1, 12, 14, 10)


def test_flip_axes_flip_the_right_axes(vols: list[Path]) -> None:
    ds = VolumeDataset(load_manifest({"a": [str(vols[0])]}), flip_axes=(1,), flip_prob=1.0)
    ref = VolumeDataset(load_manifest({"a": [str(vols[0])]}), flip_prob=0.0)
    assert torch.equal(ds[0]["image"], ref[0]["image"].flip(2))


def test_sampler_shards_resumes_and_repeats() -> None:
    data = list(range(10))
    s0, s1 = ResumableSampler(data, 2, 0, seed=3), ResumableSampler(data, 2, 1, seed=3)
    s0.set_position(0, 0)
    s1.set_position(0, 0)
    i0, i1 = [i for i, _ in s0], [i for i, _ in s1]
    assert sorted(i0 + i1) == data and len(i0) == len(i1) == 5
    s0.set_position(0, 2)
    assert [i for i, _ in s0] == i0[2:]  # resumed mid-epoch: the same remaining order
    s0.set_position(1, 0)
    assert [i for i, _ in s0] != i0  # a new epoch reshuffles
    tiny = ResumableSampler([0, 1], 2, 0, seed=0, min_per_rank=4)
    tiny.set_position(0, 0)
    assert len(list(tiny)) == 4 == len(tiny)


def test_stateful_loader_continues_exactly(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=5)
    ds = LatentDataset(latents)
    full = StatefulLoader(ds, 2, WorldInfo(), seed=1)
    it = iter(full)
    ref = [next(it)["index"].tolist() for _ in range(5)]  # crosses an epoch (2 batches per epoch)
    part = StatefulLoader(ds, 2, WorldInfo(), seed=1)
    it = iter(part)
    first = [next(it)["index"].tolist() for _ in range(3)]
    resumed = StatefulLoader(ds, 2, WorldInfo(), seed=1)
    resumed.load_state_dict(part.state_dict())
    it = iter(resumed)
    rest = [next(it)["index"].tolist() for _ in range(2)]
    assert first + rest == ref


def test_latent_dataset_conditioning_and_shape_filter(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=4, shape=(2, 4, 8, 8))
    ds = LatentDataset(latents, res_divisor=4)
    item = ds[0]
    assert item["latent"].shape == (2, 4, 8, 8)
    assert item["res"].tolist() == [1.0, 2.0, 2.0]
    assert int(item["class_index"]) == 0 and ds.codebook_range == (-1.5, 2.0)
    with pytest.raises(InputError, match="No cached latent has shape"):
        LatentDataset(latents, shape=(4, 4, 4))
    with pytest.raises(InputError, match="train.py latents"):
        LatentDataset(tmp_path / "nowhere")


def test_phantom_dataset(tmp_path: Path) -> None:
    from MedDiffusionLib.data.datasets import PhantomDataset

    ds = PhantomDataset(["ct-head-neck", "mr-knee"], (16, 16, 16), volumes_per_class=2, crop=8)
    assert len(ds) == 4
    item = ds[(3, 5)]
    assert item["image"].shape == (1, 8, 8, 8)
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert int(ds[0]["class_index"]) == 0 and int(ds[1]["class_index"]) == 6  # the catalog's indices


def test_config_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train: {lr: 1.0e-4, batch_size: 2}\nmodel: {dim: 8}\n")
    (tmp_path / "c.yaml").write_text("base: base.yaml\ntrain: {batch_size: 4}\n")
    cfg = apply_overrides(load_config(tmp_path / "c.yaml"),
                          ["train.lr=3e-5", "model.dim_mults=[1,2]", "data.latent_shape=null", "name=x"])
    assert cfg["train"] == {"lr": 3e-5, "batch_size": 4}
    assert cfg["model"] == {"dim": 8, "dim_mults": [1, 2]}
    assert cfg["data"]["latent_shape"] is None and cfg["name"] == "x"
    with pytest.raises(InputError):
        apply_overrides(cfg, ["no_equals_sign"])
