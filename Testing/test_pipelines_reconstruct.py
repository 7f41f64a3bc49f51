"""Reconstruction pipeline on a tiny bundle: geometry and dtype round trip, determinism, data consistency, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffusionLib.data.phantoms import make_phantom
from MedDiffusionLib.errors import Cancelled, InputError
from MedDiffusionLib.pipelines.consistency import make_operator
from MedDiffusionLib.pipelines.reconstruct import ReconstructionPipeline, back_to_input, prepare_volume

from helpers import tiny_bundle

FAST = dict(sampler="ddim", steps=2)
OBLIQUE = (0.0, 1.0, 0.0, -0.8, 0.0, 0.6, 0.6, 0.0, 0.8)  # a rotation, not a permutation of the axes


@pytest.fixture(scope="module")
def pipe():
    return ReconstructionPipeline(tiny_bundle(controlnets=True), device="cpu")


def scan(anatomy: str = "ct-head-neck", dtype=sitk.sitkInt16, seed: int = 1) -> sitk.Image:
    """A small clinical-looking volume: anisotropic spacing, oblique direction, offset origin, integer voxels."""
    img = make_phantom(anatomy, (18, 14, 5), (1.3, 1.1, 3.2), seed)
    img = sitk.Cast(img, dtype)
    img.SetDirection(OBLIQUE)
    img.SetOrigin((12.5, -40.0, 7.25))
    return img


def _same_geometry(out: sitk.Image, ref: sitk.Image) -> None:
    assert out.GetSize() == ref.GetSize()
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()
    assert out.GetPixelID() == ref.GetPixelID()


@pytest.mark.parametrize("task,anatomy", [("sparse-ct", "ct-head-neck"), ("mri", "mr-t1-brain")])
def test_result_has_the_input_grid_and_dtype(pipe, task, anatomy):
    img = scan(anatomy)
    r = pipe(img, task=task, views=6, acceleration=4, seed=3, **FAST)
    _same_geometry(r.image, img)
    _same_geometry(r.degraded, img)
    arr = sitk.GetArrayFromImage(r.image)
    assert arr.dtype == np.int16 and arr.min() >= np.iinfo(np.int16).min
    assert r.task == task and r.anatomy == anatomy and r.seed == 3 and r.simulated
    assert r.data_consistency and r.dc_applications >= 1
    for v in (r.psnr, r.ssim, r.degraded_psnr, r.degraded_ssim, r.residual):
        assert v is not None and np.isfinite(v)
    d, h, w = (s // 4 for s in (r.model_size_xyz[2], r.model_size_xyz[0], r.model_size_xyz[1]))
    assert all(s % 4 == 0 for s in r.model_size_xyz) and d * h * w > 0


def test_float_input_stays_float_and_default_anatomy_follows_the_task(pipe):
    img = scan("mr-t2-brain", sitk.sitkFloat32)
    r = pipe(img, task="mri", mask="gaussian", acceleration=4, seed=0, data_consistency=False, **FAST)
    _same_geometry(r.image, img)
    assert r.anatomy == pipe.bundle.catalog.by_modality("MR")[0].name
    assert not r.data_consistency and r.dc_applications == 0


def test_deterministic_for_a_seed(pipe):
    img = scan()
    a = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=11, **FAST)
    b = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=11, **FAST)
    c = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=12, **FAST)
    arrays = [sitk.GetArrayFromImage(r.image) for r in (a, b, c)]
    same = [np.array_equal(arrays[0], arrays[1]), np.array_equal(arrays[0], arrays[2])]
    assert same == [True, False]
    assert np.array_equal(sitk.GetArrayFromImage(a.degraded), sitk.GetArrayFromImage(b.degraded))


@pytest.mark.parametrize("task", ["sparse-ct", "mri"])
def test_data_consistency_lowers_the_measurement_residual(pipe, task):
    img = scan("ct-legs" if task == "sparse-ct" else "mr-knee")
    kw = dict(task=task, views=6, acceleration=4, seed=5, **FAST)
    off = pipe(img, data_consistency=False, **kw)
    on = pipe(img, data_consistency=True, dc_every=1, **kw)
    assert on.residual < 0.5 * off.residual
    assert on.dc_applications == 1  # every step but the last (the final step is done in image space)


def test_already_degraded_input(pipe):
    img = scan()
    ct = pipe(img, task="sparse-ct", views=8, simulate=False, seed=2, **FAST)
    _same_geometry(ct.image, img)
    assert not ct.simulated and ct.psnr is None and ct.data_consistency  # the input's projections stand in
    assert np.array_equal(sitk.GetArrayFromImage(ct.degraded), sitk.GetArrayFromImage(img))
    mr = pipe(scan("mr-knee"), task="mri", simulate=False, seed=2, **FAST)
    assert not mr.data_consistency and mr.residual is None  # no k-space: nothing to be consistent with


def test_poisson_mask(pipe):
    r = pipe(scan("mr-abdomen"), task="mri", mask="poisson", acceleration=3, seed=1, **FAST)
    assert r.mask == "poisson" and r.acceleration == 3.0


def test_progress_and_cancel(pipe):
    seen = []
    pipe(scan(), task="sparse-ct", views=4, seed=0, progress=seen.append, **FAST)
    stages = [p.stage for p in seen]
    assert stages[0] == "preparing" and "sampling" in stages and "decoding" in stages
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        pipe(scan(), task="sparse-ct", seed=0, cancel=cancel, **FAST)


def test_bad_inputs_are_input_errors(pipe):
    flat = sitk.Image(16, 16, sitk.sitkFloat32)
    with pytest.raises(InputError, match="2D"):
        pipe(flat, task="sparse-ct", **FAST)
    nan = sitk.Cast(scan(), sitk.sitkFloat32)
    nan[3, 4, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        pipe(nan, task="sparse-ct", **FAST)
    with pytest.raises(InputError, match="SimpleITK image"):
        pipe(np.zeros((8, 8, 8)), task="sparse-ct", **FAST)
    bad_spacing = scan()
    bad_spacing.SetSpacing((1.0, 1.0, 1e-6))
    with pytest.raises(InputError, match="spacing"):
        pipe(bad_spacing, task="sparse-ct", **FAST)
    with pytest.raises(InputError, match="unknown reconstruction task"):
        pipe(scan(), task="dehaze", **FAST)
    with pytest.raises(InputError, match="needs a CT anatomy"):
        pipe(scan(), task="sparse-ct", anatomy="mr-knee", **FAST)
    with pytest.raises(InputError, match="acceleration"):
        pipe(scan(), task="mri", acceleration=1, **FAST)
    with pytest.raises(InputError, match="views"):
        pipe(scan(), task="sparse-ct", views=0, **FAST)


def test_missing_controlnet_names_the_available_tasks():
    plain = ReconstructionPipeline(tiny_bundle(controlnets=False), device="cpu")
    with pytest.raises(InputError, match=r"no ControlNet for task 'mri' \(available: none\)"):
        plain(scan(), task="mri", **FAST)
    only_ct = tiny_bundle(controlnets=True)
    only_ct.controlnets.pop("mri")
    with pytest.raises(InputError, match=r"available: sparse-ct"):
        ReconstructionPipeline(only_ct, device="cpu")(scan(), task="mri", **FAST)


def test_prepare_and_back_to_input_round_trip():
    img = sitk.Cast(scan(), sitk.sitkFloat32)
    prep = prepare_volume(img, (1.0, 1.0, 1.0), step=16, patch=16)
    assert all(s % 16 == 0 for s in prep.x.shape) and prep.x.min() >= -1 and prep.x.max() <= 1
    back = back_to_input(prep.x[prep.undo], prep, img)
    _same_geometry(back, img)
    a, b = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(back)
    inside = (a > prep.lo) & (a < prep.hi)  # outside the percentiles the normalisation clips
    # Resampling there and back (3.2 mm -> 1 mm -> 3.2 mm, linear) blurs edges a little.
    assert np.median(np.abs(a - b)[inside]) < 0.05 * (prep.hi - prep.lo)


def test_ct_projection_is_monotone_and_mri_projection_is_consistent():
    g = torch.Generator().manual_seed(0)
    u = torch.rand((3, 16, 16), generator=g)
    guess = torch.rand((3, 16, 16), generator=g)
    ct = make_operator("sparse-ct", (16, 16), views=5)
    y = ct.measure(u)
    residuals = [ct.residual(ct.project(guess, y, iters=n), y) for n in (0, 1, 4)]
    assert residuals[0] < ct.residual(guess, y) and residuals == sorted(residuals, reverse=True)
    mr = make_operator("mri", (16, 16), acceleration=4, seed=0)
    k = mr.measure(u)
    assert mr.residual(mr.project(guess, k, iters=20), k) < 0.1 * mr.residual(guess, k)
    half = mr.project(guess, k, weight=0.5)
    assert mr.residual(guess, k) > mr.residual(half, k) > mr.residual(mr.project(guess, k), k)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_every_sampler_with_latent_consistency(pipe, sampler):
    r = pipe(scan(), task="sparse-ct", views=6, sampler=sampler, steps=3, seed=1, dc_every=1)
    assert r.dc_applications == 2 and r.sampler == sampler and r.steps == 3
    assert np.isfinite(sitk.GetArrayFromImage(sitk.Cast(r.image, sitk.sitkFloat32))).all()
