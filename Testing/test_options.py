"""The task options (MedDiffusionLib.options): defaults, bounds, choices and validation, with and without a bundle."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.options import (DEFAULT_STEPS, MASKS, SAMPLERS, SCHEDULE_LENGTH, TASKS, Bound, GenerateOptions,
                                     ReconstructOptions, default_steps, format_size, parse_size)

from helpers import tiny_bundle as make_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle():
    return make_bundle(controlnets=True)


def test_defaults_are_valid() -> None:
    g = GenerateOptions(anatomy="ct-legs").validate()
    assert (g.sampler, g.steps, g.seed, g.size_xyz) == ("dpmpp", None, None, None)
    assert g.steps_or_default() == DEFAULT_STEPS["dpmpp"] == 50
    r = ReconstructOptions().validate()
    assert (r.task, r.views, r.acceleration, r.mask, r.sampler) == ("sparse-ct", 30, 8.0, "gaussian", "dpmpp")
    assert r.modality == "CT"


def test_one_steps_table() -> None:
    assert set(DEFAULT_STEPS) == set(SAMPLERS)
    assert default_steps("ddpm") == SCHEDULE_LENGTH
    assert default_steps("ddpm", timesteps=200) == 200  # never more than a short schedule


@pytest.mark.parametrize("options, field", [
    (ReconstructOptions(acceleration=1), "acceleration"),     # > 1: R=1 is a fully sampled scan
    (ReconstructOptions(acceleration=65), "acceleration"),
    (ReconstructOptions(acceleration=float("nan")), "acceleration"),
    (ReconstructOptions(steps=0), "steps"),
    (ReconstructOptions(steps=SCHEDULE_LENGTH + 1), "steps"),
    (ReconstructOptions(steps=2.5), "steps"),                # type: ignore[arg-type]
    (ReconstructOptions(steps=True), "steps"),               # type: ignore[arg-type]
    (ReconstructOptions(sampler="euler"), "sampler"),
    (ReconstructOptions(views=0), "views"),
    (ReconstructOptions(views=2049), "views"),
    (ReconstructOptions(task="pet"), "task"),
    (ReconstructOptions(mask="radial"), "mask"),
    (ReconstructOptions(tv_weight=-1.0), "tv_weight"),
    (ReconstructOptions(method="magic"), "method"),
    (ReconstructOptions(task="mri", method="sart"), "does not apply to task 'mri'"),
    # No measurements to solve against: refused up front, not after the upload in the worker.
    (ReconstructOptions(task="mri", method="tv", simulate=False), "'tv' needs measurements"),
    (ReconstructOptions(dc_every=-1), "dc_every"),
    (ReconstructOptions(noise_photons=0), "noise_photons"),
    (ReconstructOptions(seed=-1), "seed"),
    (ReconstructOptions(simulate="yes"), "simulate"),        # type: ignore[arg-type]
    (GenerateOptions(anatomy="ct-legs", seed=2**63), "seed"),
    (GenerateOptions(anatomy="ct-legs", size_xyz="64x64"), "size"),
    (GenerateOptions(anatomy="ct-legs", hu_range=(100, -100)), "hu_range"),
    (GenerateOptions(), "anatomy"),
])
def test_bad_values_name_the_field(options, field) -> None:
    with pytest.raises(InputError, match=field):
        options.validate()


def test_normalises() -> None:
    r = ReconstructOptions(task=" MRI ", sampler="DDIM", mask="Poisson", views="12", acceleration="4",  # form text
                           anatomy="").validate()  # type: ignore[arg-type]
    assert (r.task, r.sampler, r.mask, r.views, r.acceleration, r.anatomy) == ("mri", "ddim", "poisson", 12, 4.0,
                                                                              None)
    g = GenerateOptions(anatomy="ct-legs", size_xyz="64 x 32 x 16", hu_range=[-1000, 1000]).validate()
    assert g.size_xyz == (64, 32, 16) and g.hu_range == (-1000.0, 1000.0)


def test_from_mapping_refuses_unknown_names() -> None:
    assert ReconstructOptions.from_mapping({"views": 12}).validate().views == 12
    with pytest.raises(InputError, match="stpes"):
        ReconstructOptions.from_mapping({"stpes": 12})


def test_specs_describe_every_field() -> None:
    specs = ReconstructOptions.specs()
    assert specs["sampler"].choices == SAMPLERS and specs["task"].choices == tuple(TASKS)
    assert specs["mask"].choices == MASKS
    assert specs["acceleration"].bound == Bound(1, 64, low_open=True)
    assert specs["acceleration"].bound.int_range() == (2, 64)  # what an integer widget offers
    assert specs["steps"].optional and not specs["views"].optional
    assert all(s.help for s in specs.values())
    assert GenerateOptions.spec("anatomy").optional  # checked by validate: "anatomy is required"


def test_bounds_follow_the_bundle(tiny_bundle) -> None:
    short = dataclasses.replace(tiny_bundle, diffusion={"timesteps": 20, "schedule": "cosine"})
    with pytest.raises(InputError, match="steps must be between 1 and 20"):
        ReconstructOptions(steps=21).validate(short)
    assert ReconstructOptions(steps=20).validate(short).steps == 20


def test_generate_against_a_bundle(tiny_bundle) -> None:
    b = tiny_bundle
    step = b.downsample * b.denoiser.latent_multiple
    name = b.catalog[0].name
    assert GenerateOptions(anatomy=name.upper()).validate(b).anatomy == name  # as the catalog spells it
    with pytest.raises(InputError, match="unknown anatomy"):
        GenerateOptions(anatomy="ct-elbow").validate(b)
    with pytest.raises(InputError, match=f"multiple of {step} voxels"):
        GenerateOptions(anatomy=name, size_xyz=(step + 1, step, step)).validate(b)
    assert GenerateOptions(anatomy=name, size_xyz=(step, step, 2 * step)).validate(b).size_xyz == (step, step,
                                                                                                   2 * step)
    mr = [a.name for a in b.catalog if a.modality == "MR"]
    if mr:
        with pytest.raises(InputError, match="hu_range only applies to CT"):
            GenerateOptions(anatomy=mr[0], hu_range=(0, 1)).validate(b)


def test_reconstruct_against_a_bundle(tiny_bundle) -> None:
    b = tiny_bundle
    with pytest.raises(InputError, match="no ControlNet for task"):
        ReconstructOptions(task="mri").validate(dataclasses.replace(b, controlnets={}))
    ct = [a.name for a in b.catalog if a.modality == "CT"]
    mr = [a.name for a in b.catalog if a.modality == "MR"]
    if "sparse-ct" in b.controlnets and mr:
        with pytest.raises(InputError, match="needs a CT anatomy"):
            ReconstructOptions(task="sparse-ct", anatomy=mr[0]).validate(b)
    if "sparse-ct" in b.controlnets and ct:
        assert ReconstructOptions(anatomy=ct[0].upper()).validate(b).anatomy == ct[0]


@pytest.mark.parametrize("text, expected", [
    ("256x256x128", (256, 256, 128)), ("64X32x16", (64, 32, 16)), (" 8 x 8 x 8 ", (8, 8, 8)), ((8, 8, 8), (8, 8, 8)),
    ([1.0, 2, 3], (1, 2, 3)),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected
    assert parse_size(format_size(expected)) == expected


@pytest.mark.parametrize("bad", ["256x256", "axbxc", "0x8x8", "1.5x2x3", (1, 2), (1.5, 2, 3), (True, 2, 3), None])
def test_parse_size_refuses(bad) -> None:
    with pytest.raises(InputError, match="size"):
        parse_size(bad)


def test_imports_no_torch() -> None:
    """The Slicer panel reads the options at start-up, before (and without) the heavy stack."""
    code = ("import sys; import MedDiffusionLib.options; "
            "heavy = [m for m in ('torch', 'numpy', 'SimpleITK') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
