"""Dataset generation (pipelines/batch.py, `generate --count --out-dir`) on a tiny bundle, in one process."""
from __future__ import annotations

import csv
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.checkpoints.bundle import load_bundle
from MedDiffusionLib.cli import main as cli_main
from MedDiffusionLib.errors import InputError
from MedDiffusionLib.pipelines.batch import (MANIFEST_COLUMNS, assign_batches, generate_dataset,
                                             group_batches, item_seed, make_spec, model_id, parse_anatomy_mix,
                                             plan_dataset, weighted_order)
from MedDiffusionLib.pipelines.generate import GenerationPipeline

from helpers import make_tiny_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def pipe(bundle_dir) -> GenerationPipeline:
    return GenerationPipeline(load_bundle(bundle_dir), device="cpu")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset(out: Path, bundle_dir: Path, *extra: str) -> int:
    return cli_main(["generate", "--anatomy", "ct-legs:2", "mr-knee:1", "--count", "5", "--out-dir", str(out),
                     "--steps", "2", "--seed", "11", "--device", "cpu", "--quiet", "--model", str(bundle_dir),
                     *extra])


def test_mix_order_is_proportional_in_every_prefix_and_seeds_are_independent():
    order = weighted_order([Fraction(2), Fraction(1)], 30)
    assert order[:3].count(0) == 2 and order.count(0) == 20
    for n in range(1, 31):  # never more than one item away from the exact share
        assert abs(order[:n].count(0) - n * 2 / 3) < 1
    assert weighted_order([Fraction(1)], 4) == [0, 0, 0, 0]
    seeds = [item_seed(5, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[:3] == [item_seed(5, i) for i in range(3)] and item_seed(6, 0) != seeds[0]
    assert parse_anatomy_mix(["ct-legs", "mr-knee:0.5"]) == [("ct-legs", 1), ("mr-knee", Fraction(1, 2))]
    for bad in (["ct-legs:0"], ["ct-legs:x"], ["ct-legs", "CT-LEGS:2"], [":3"]):
        with pytest.raises(InputError):
            parse_anatomy_mix(bad)


def test_plan_batches_and_shards(pipe):
    with pytest.warns(UserWarning, match="ct-legs was trained at 16x16x16; 32x32x16 may look worse"):
        spec = make_spec(pipe, ["ct-legs:1", "ct-chest-abdomen:1"], 7, 3, [(16, 16, 16), (32, 32, 16)],
                         batch_size=2, steps=2, model="m")
    plan = plan_dataset(spec, pipe)
    assert [p.anatomy for p in plan][:4] == ["ct-legs", "ct-chest-abdomen", "ct-legs", "ct-chest-abdomen"]
    # Each anatomy cycles through the sizes on its own.
    assert [p.size_xyz for p in plan if p.anatomy == "ct-legs"] == [(16, 16, 16), (32, 32, 16)] * 2
    assert plan[3].file == "000003_ct-chest-abdomen.nrrd" and plan[3].seed == item_seed(3, 3)
    batches = group_batches(plan, 2)
    assert all(len({i.latent for i in b}) == 1 and len(b) <= 2 for b in batches)
    assert sorted(i.index for b in batches for i in b) == list(range(7))
    # Mixed anatomies of one size share a batch.
    assert any(len({i.anatomy for i in b}) == 2 for b in batches)
    shards = assign_batches(batches, 2)
    assert sorted(shards[0] + shards[1]) == list(range(len(batches))) and shards[0] and shards[1]
    assert assign_batches(batches, 2) == shards and assign_batches(batches, 1) == [list(range(len(batches)))]


def test_spec_rejects_bad_requests_with_one_line(pipe):
    with pytest.raises(InputError, match="unknown anatomy"):
        make_spec(pipe, ["ct-nose"], 2, 0)
    with pytest.raises(InputError, match="only applies to CT"):
        make_spec(pipe, ["ct-legs", "mr-knee"], 2, 0, hu_range=(-1000, 1000))
    with pytest.raises(InputError, match="grid"):
        make_spec(pipe, ["ct-legs"], 2, 0, [(15, 16, 16)])
    with pytest.raises(InputError, match="count"):
        make_spec(pipe, ["ct-legs"], 0, 0)
    with pytest.raises(InputError, match="format"):
        make_spec(pipe, ["ct-legs"], 1, 0, suffix=".png")


def test_model_id_identifies_the_weights(pipe, bundle_dir, tmp_path):
    assert model_id(pipe) == model_id(GenerationPipeline(load_bundle(bundle_dir), device="cpu"))
    other = GenerationPipeline(load_bundle(make_tiny_bundle(tmp_path / "b", seed=1)), device="cpu")
    assert model_id(other) != model_id(pipe) and model_id(pipe).startswith("sha256:")


def test_batched_items_use_their_own_noise(pipe):
    """A batch of three equals the three run alone up to float rounding (not the other items' noise)."""
    seeds = [item_seed(1, i) for i in range(3)]
    names = ["ct-legs", "mr-t1-brain", "ct-legs"]
    batched = [r.image for r in pipe.generate_batch(names, None, "ddpm", 3, seeds)]
    for name, seed, img in zip(names, seeds, batched):
        alone = sitk.GetArrayFromImage(pipe(name, None, "ddpm", 3, seed).image)
        np.testing.assert_allclose(sitk.GetArrayFromImage(img), alone, atol=1e-4)
    a, b = (sitk.GetArrayFromImage(batched[i]) for i in (0, 2))
    assert np.abs(a - b).max() > 0.01  # same anatomy, different seeds: different volumes


def test_dataset_manifest_and_single_regeneration(bundle_dir, tmp_path):
    out = tmp_path / "ds"
    assert dataset(out, bundle_dir) == 0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [r["anatomy"] for r in rows] == ["ct-legs", "mr-knee", "ct-legs", "ct-legs", "mr-knee"]
    assert {r["size_xyz"] for r in rows if r["anatomy"] == "mr-knee"} == {"32x32x16"}
    assert rows[0]["steps"] == "2" and rows[0]["sampler"] == "dpmpp" and rows[0]["modality"] == "CT"
    assert len({r["seed"] for r in rows}) == 5 and len({r["model_id"] for r in rows}) == 1
    for r in rows:
        assert sha(out / r["file"]) == r["sha256"]
        img = sitk.ReadImage(str(out / r["file"]))
        assert "x".join(map(str, img.GetSize())) == r["size_xyz"]
        assert "x".join(f"{v:g}" for v in img.GetSpacing()) == r["spacing_xyz"]
    # Any volume again, alone, from its manifest row: the same bytes.
    r = rows[4]
    again = tmp_path / "again.nrrd"
    assert cli_main(["generate", "--anatomy", r["anatomy"], "--size", r["size_xyz"], "--seed", r["seed"],
                     "--steps", r["steps"], "--sampler", r["sampler"], "--out", str(again), "--device", "cpu",
                     "--quiet", "--model", str(bundle_dir)]) == 0
    assert sha(again) == r["sha256"]


def test_resume_skips_complete_files_and_redoes_partial_ones(bundle_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    assert dataset(out, bundle_dir, "--batch-size", "2") == 0
    first = {p.name: sha(p) for p in out.glob("*.nrrd")}
    manifest = (out / "manifest.csv").read_text()
    assert len(first) == 5
    capsys.readouterr()
    (out / "000001_mr-knee.nrrd").unlink()                                      # lost
    (out / "000002_ct-legs.nrrd").write_bytes(b"NRRD0004\ntruncated")          # partial
    entry = out / ".entries" / "000003_ct-legs.nrrd.json"
    entry.unlink()                                                              # volume without its entry
    (out / ".000004_mr-knee.1a2b3c4d.tmp.nrrd").write_bytes(b"junk")           # left by a killed write
    stamp = (out / "000000_ct-legs.nrrd").stat().st_mtime_ns
    assert dataset(out, bundle_dir, "--batch-size", "2") == 0
    assert "(2 were already complete)" in capsys.readouterr().out
    assert {p.name: sha(p) for p in out.glob("*.nrrd")} == first  # the same bytes as the uninterrupted run
    assert (out / "000000_ct-legs.nrrd").stat().st_mtime_ns == stamp  # complete files are not rewritten
    assert (out / "manifest.csv").read_text() == manifest
    assert not list(out.glob(".*.tmp*"))
    # Resuming without --seed keeps the folder's base seed; other settings are refused.
    assert cli_main(["generate", "--anatomy", "ct-legs:2", "mr-knee:1", "--count", "5", "--out-dir", str(out),
                     "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet", "--model",
                     str(bundle_dir)]) == 0
    assert "(5 were already complete)" in capsys.readouterr().out
    assert dataset(out, bundle_dir, "--batch-size", "3") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "batch_size 3 (folder: 2)" in err and len(err.strip().splitlines()) == 1


def test_entry_must_match_the_plan(pipe, tmp_path):
    spec = make_spec(pipe, ["ct-legs"], 2, 4, steps=1, model="m")
    report = generate_dataset(pipe, spec, tmp_path)
    assert (report.generated, report.skipped) == (2, 0)
    entry = tmp_path / ".entries" / "000000_ct-legs.nrrd.json"
    data = json.loads(entry.read_text())
    entry.write_text(json.dumps(dict(data, seed=data["seed"] + 1)))  # an entry from some other run
    report = generate_dataset(pipe, spec, tmp_path)
    assert (report.generated, report.skipped) == (1, 1)
    assert json.loads(entry.read_text()) == data


def test_cli_dataset_argument_errors(bundle_dir, tmp_path, capsys):
    base = ["generate", "--anatomy", "ct-legs", "--device", "cpu", "--model", str(bundle_dir)]
    assert cli_main(base + ["--out-dir", str(tmp_path / "d")]) == 2
    assert "--count" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "x.nrrd"), "--count", "3"]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert cli_main(["generate", "--anatomy", "ct-legs", "mr-knee", "--out", str(tmp_path / "x.nrrd")]) == 2
    assert "one --anatomy" in capsys.readouterr().err
    assert cli_main(base + ["--out-dir", str(tmp_path / "no" / "d"), "--count", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
