"""Reconstruction on the scan's own grid: methods and their ordering, intensity round trip, edges, anatomy, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffusionLib.catalog import OFFICIAL_ANATOMIES, Anatomy, Catalog
from MedDiffusionLib.data.phantoms import make_phantom
from MedDiffusionLib.errors import Cancelled, InputError
from MedDiffusionLib.pipelines.native import GridMap, IntensityScale
from MedDiffusionLib.pipelines.recon_settings import METHODS, choose_anatomy
from MedDiffusionLib.pipelines.reconstruct import ReconstructionPipeline, _PriorGrid, reconstruct_model_free

from helpers import tiny_bundle

FAST = dict(sampler="ddim", steps=2)
OBLIQUE = (0.0, 1.0, 0.0, -0.8, 0.0, 0.6, 0.6, 0.0, 0.8)  # a rotation, not a permutation of the axes


def coarse_bundle(controlnets: bool = True):
    """The tiny bundle with the demo model's coarse spacings (6-10 mm): its prior grids stay small and fast."""
    bundle = tiny_bundle(controlnets=controlnets)
    bundle.catalog = Catalog(Anatomy(a.name, a.class_index, a.modality, a.latent_sizes, (6.5, 6.5, 9.5))
                             for a in bundle.catalog)
    return bundle


@pytest.fixture(scope="module")
def pipe():
    return ReconstructionPipeline(coarse_bundle(), device="cpu")


def scan(anatomy: str = "ct-head-neck", dtype=sitk.sitkInt16, seed: int = 1, size=(18, 14, 5)) -> sitk.Image:
    """A small clinical-looking volume: anisotropic spacing, oblique direction, offset origin, integer voxels."""
    img = make_phantom(anatomy, size, (1.3, 1.1, 3.2), seed)
    img = sitk.Cast(img, dtype)
    img.SetDirection(OBLIQUE)
    img.SetOrigin((12.5, -40.0, 7.25))
    return img


@pytest.fixture(scope="module")
def head96() -> sitk.Image:
    """A native-resolution head CT phantom: 96 x 96 pixels of 2.5 mm, 8 slices of 3 mm."""
    return sitk.Cast(make_phantom("ct-head-neck", (96, 96, 8), (2.5, 2.5, 3.0), 21), sitk.sitkInt16)


def _same_geometry(out: sitk.Image, ref: sitk.Image) -> None:
    assert out.GetSize() == ref.GetSize()
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()
    assert out.GetPixelID() == ref.GetPixelID()


@pytest.mark.parametrize("task,anatomy", [("sparse-ct", "ct-head-neck"), ("mri", "mr-t1-brain")])
def test_result_has_the_input_grid_and_dtype(pipe, task, anatomy):
    img = scan(anatomy)
    r = pipe(img, task=task, views=6, acceleration=4, seed=3, anatomy=anatomy, **FAST)
    _same_geometry(r.image, img)
    _same_geometry(r.degraded, img)
    assert r.task == task and r.method == "diffusion" and r.anatomy == anatomy and r.seed == 3 and r.simulated
    assert r.data_consistency and r.dc_applications >= 1 and r.anatomy_reason == "given"
    for v in (r.psnr, r.ssim, r.degraded_psnr, r.degraded_ssim, r.residual):
        assert v is not None and np.isfinite(v)
    assert all(s % 4 == 0 for s in r.model_size_xyz)


def test_ct_methods_order_on_a_native_phantom(pipe, head96):
    """At 30 views on the 96 x 96 grid: SART and TV clearly beat FBP, and the diffusion method (here with a random
    tiny prior: the native-grid data consistency carries it) is at least 3 dB above FBP too."""
    scores = {m: pipe(head96, task="sparse-ct", method=m, views=30, seed=2, **FAST) for m in
              ("fbp", "sart", "tv", "diffusion")}
    psnr = {m: r.psnr for m, r in scores.items()}
    assert scores["fbp"].psnr == pytest.approx(scores["fbp"].degraded_psnr)
    assert psnr["sart"] > psnr["fbp"] + 2.0, psnr
    assert psnr["tv"] > psnr["fbp"] + 3.0, psnr
    assert psnr["diffusion"] > psnr["fbp"] + 3.0, psnr
    assert scores["tv"].residual < scores["fbp"].residual
    assert scores["diffusion"].metric_range == (-1000.0, 1000.0)


def test_mri_tv_beats_zero_filling():
    img = make_phantom("mr-t1-brain", (96, 96, 6), (2.3, 2.3, 3.0), 5)
    zf = reconstruct_model_free(img, "mri", "zero-filled", acceleration=4, seed=1)
    tv = reconstruct_model_free(img, "mri", "tv", acceleration=4, seed=1)
    assert tv.psnr > zf.psnr + 2.0 and tv.ssim > zf.ssim


def _lesion_scan() -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A 64 x 64 soft-tissue disc with a +100 HU, 5-pixel-radius insert -> (image, insert mask, surrounding ring)."""
    arr = np.full((4, 64, 64), -1000, np.int16)
    yy, xx = np.mgrid[:64, :64]
    arr[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 27 ** 2] = 40
    r = np.sqrt((yy - 28.0) ** 2 + (xx - 36.0) ** 2)
    arr[:, r <= 5] += 100
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    return img, np.broadcast_to(r <= 3.5, arr.shape), np.broadcast_to((r >= 7) & (r <= 10), arr.shape)


def test_debiasing_after_tv_keeps_the_lesion_contrast():
    """TV alone flattens a small low-contrast insert; the rule's debiasing CG (anchored at the TV result) gives its
    contrast back and fits the measurements better, without losing PSNR."""
    from MedDiffusionLib.pipelines.measurements import prepare_problem, solve_tv, to_image
    from MedDiffusionLib.pipelines.recon_settings import tv_weight
    from MedDiffusionLib.physics.solvers import tv_pdhg

    img, inside, ring = _lesion_scan()
    truth = sitk.GetArrayFromImage(img).astype(np.float32)
    problem = prepare_problem(img, "sparse-ct", views=20, seed=0)
    beta = tv_weight("sparse-ct", 20)
    x0 = problem.degraded.clamp_min(0.0)
    plain = tv_pdhg(problem.op, problem.measurements, beta, 60, z_weight=problem.z_weight, x0=x0)
    debiased = solve_tv(problem, beta, x0)

    def kept(u: torch.Tensor) -> float:
        a = sitk.GetArrayFromImage(to_image(u, problem, img)).astype(np.float32)
        return float(a[inside].mean() - a[ring].mean()) / float(truth[inside].mean() - truth[ring].mean())

    def err(u: torch.Tensor) -> float:
        return float(np.abs(sitk.GetArrayFromImage(to_image(u, problem, img)).astype(np.float32) - truth).mean())

    assert kept(debiased) > kept(plain) + 0.05 and 0.8 <= kept(debiased) <= 1.2, (kept(plain), kept(debiased))
    assert problem.residual(debiased) < problem.residual(plain)
    assert err(debiased) <= err(plain) * 1.05
    assert float(debiased.min()) >= 0.0


def test_debiasing_does_not_bring_the_noise_back(head96, monkeypatch):
    """Low-dose data (1e3 photons): the debiasing anchor grows with the noise, so TV + debiasing stays within
    0.5 dB of TV alone and well above SART and FBP."""
    from MedDiffusionLib.pipelines import recon_settings

    def run(method: str) -> float:
        return reconstruct_model_free(head96, "sparse-ct", method, views=30, noise_photons=1e3, seed=2).psnr

    psnr = {m: run(m) for m in ("fbp", "sart", "tv")}
    monkeypatch.setattr(recon_settings, "DEBIAS_CG_ITERS", 0)
    plain = run("tv")
    assert psnr["tv"] > plain - 0.5 and psnr["tv"] > psnr["sart"] + 1.0 > psnr["fbp"] + 1.0, (psnr, plain)


def test_bone_keeps_its_hu_and_nothing_is_clipped(pipe):
    """A 3000 HU insert (far above any normalisation percentile) comes back near 3000 HU from every method."""
    arr = np.full((6, 48, 48), -1000, np.int16)
    yy, xx = np.mgrid[:48, :48]
    arr[:, (yy - 24) ** 2 + (xx - 24) ** 2 < 18 ** 2] = 40          # soft-tissue disc
    bone = (yy - 24) ** 2 + (xx - 30) ** 2 < 4 ** 2
    arr[:, bone] = 3000
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    for method in ("fbp", "tv", "diffusion"):
        r = pipe(img, task="sparse-ct", method=method, views=90, seed=0, **FAST)
        out = sitk.GetArrayFromImage(r.image)
        inner = (yy - 24) ** 2 + (xx - 30) ** 2 < 2 ** 2
        assert abs(out[:, inner].mean() - 3000) < 300, (method, out[:, inner].mean())
        assert out.max() > 2500


def test_intensity_scale_round_trips_exactly():
    ct = np.array([-1024.0, -1000.0, 0.0, 3071.0], np.float32)
    s = IntensityScale.for_scan(ct, "CT")
    assert s.to_physics(torch.tensor(ct)).tolist() == pytest.approx([-0.024, 0.0, 1.0, 4.071])
    assert s.from_physics(s.to_physics(torch.tensor(ct))).tolist() == pytest.approx(ct.tolist())
    mr = np.linspace(0, 800, 1000).astype(np.float32)
    m = IntensityScale.for_scan(mr, "MR")
    assert m.offset == 0 and m.from_physics(m.to_physics(torch.tensor(mr))).numpy() == pytest.approx(mr, rel=1e-6)


def test_edge_slices_are_not_pulled_towards_air(pipe):
    """Anatomy that runs through the top and bottom slice stays there: the model grid's padding reflects the scan
    and the native-grid solve sees no air beyond the edges."""
    arr = np.full((5, 40, 40), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    arr[:, (yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 4.0))
    r = pipe(img, task="sparse-ct", views=30, seed=1, **FAST)
    out = sitk.GetArrayFromImage(r.image).astype(float)
    inside = (yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2
    for z in (0, 4):
        assert abs(out[z][inside].mean() - 60) < 60, (z, out[z][inside].mean())


def test_grid_map_and_padding_invent_nothing_at_the_edges():
    grids = GridMap((5, 30, 20), (4.0, 1.0, 1.0), (9.5, 6.5, 6.5))
    const = torch.full((5, 30, 20), 0.7)
    assert torch.allclose(grids.to_model(const), torch.full(grids.model_shape, 0.7))
    assert torch.allclose(grids.to_native(grids.to_model(const)), const)
    ramp = torch.arange(5.0)[:, None, None].expand(5, 30, 20).contiguous()
    prior = _PriorGrid(grids, ramp, step=16, patch=16)
    cond = prior.condition[0, 0]
    assert all(s % 16 == 0 for s in cond.shape)
    # Padded slices mirror the scan's own slices (reflection without repeating the edge), never air.
    (before, after), n = prior.pads[0], grids.model_shape[0]
    assert before >= 1 and after >= 1
    assert torch.equal(cond[before - 1], cond[before + 1]) and torch.equal(cond[before + n], cond[before + n - 2])


def test_anatomy_is_chosen_from_the_field_of_view():
    catalog = Catalog(OFFICIAL_ANATOMIES)

    def image(fov: float, n: int = 64) -> sitk.Image:
        img = sitk.Image(n, n, 4, sitk.sitkInt16)
        img.SetSpacing((fov / n, fov / n, 3.0))
        return img

    head, why = choose_anatomy(catalog, "CT", image(240))
    chest, why_chest = choose_anatomy(catalog, "CT", image(420))
    assert head.name == "ct-head-neck" and "240 mm" in why and chest.name == "ct-chest-abdomen"
    assert choose_anatomy(catalog, "MR", image(160))[0].name == "mr-knee"
    assert choose_anatomy(catalog, "MR", image(230))[0].name == "mr-t1-brain"
    assert choose_anatomy(catalog, "MR", image(380))[0].name == "mr-abdomen"


def test_default_anatomy_is_printed_with_its_reason(pipe):
    r = pipe(scan("mr-t2-brain", sitk.sitkFloat32), task="mri", acceleration=4, seed=0, data_consistency=False,
             **FAST)
    assert r.anatomy == "mr-knee" and "field of view" in r.anatomy_reason  # 18 x 1.3 mm: a knee-sized FOV
    assert not r.data_consistency and r.dc_applications == 0


def test_deterministic_for_a_seed(pipe):
    img = scan()
    a = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=11, **FAST)
    b = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=11, **FAST)
    c = pipe(img, task="sparse-ct", views=5, noise_photons=1e4, seed=12, **FAST)
    arrays = [sitk.GetArrayFromImage(r.image) for r in (a, b, c)]
    assert [np.array_equal(arrays[0], arrays[1]), np.array_equal(arrays[0], arrays[2])] == [True, False]


@pytest.mark.parametrize("task", ["sparse-ct", "mri"])
def test_data_consistency_lowers_the_measurement_residual(pipe, task):
    img = scan("ct-legs" if task == "sparse-ct" else "mr-knee")
    kw = dict(task=task, views=6, acceleration=4, seed=5, **FAST)
    off = pipe(img, data_consistency=False, **kw)
    on = pipe(img, data_consistency=True, dc_every=1, **kw)
    assert on.residual < 0.5 * off.residual
    assert on.dc_applications == 1  # every step but the last (the final solve is on the native grid)


def test_already_degraded_input(pipe):
    img = scan()
    ct = pipe(img, task="sparse-ct", views=8, simulate=False, seed=2, **FAST)
    _same_geometry(ct.image, img)
    assert not ct.simulated and ct.psnr is None and ct.data_consistency  # the input's projections stand in
    assert np.array_equal(sitk.GetArrayFromImage(ct.degraded), sitk.GetArrayFromImage(img))
    mr = pipe(scan("mr-knee"), task="mri", simulate=False, seed=2, **FAST)
    assert not mr.data_consistency and mr.residual is None  # no k-space: nothing to be consistent with
    with pytest.raises(InputError, match="sampling mask"):
        pipe(scan("mr-knee"), task="mri", method="tv", simulate=False)


def test_poisson_mask(pipe):
    r = pipe(scan("mr-abdomen"), task="mri", mask="poisson", acceleration=3, seed=1, **FAST)
    assert r.mask == "poisson" and r.acceleration == 3.0


def test_progress_and_cancel(pipe):
    seen = []
    pipe(scan(), task="sparse-ct", views=4, seed=0, progress=seen.append, **FAST)
    stages = [p.stage for p in seen]
    assert stages[0] == "measuring" and "sampling" in stages and "data consistency" in stages
    seen.clear()
    pipe(scan(), task="sparse-ct", method="tv", views=4, seed=0, progress=seen.append)
    assert {p.stage for p in seen} == {"tv"} and seen[-1].step == seen[-1].total
    cancel = threading.Event()
    cancel.set()
    for method in ("diffusion", "sart"):
        with pytest.raises(Cancelled):
            pipe(scan(), task="sparse-ct", method=method, seed=0, cancel=cancel, **FAST)


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
    with pytest.raises(InputError, match="unknown task 'dehaze'"):
        pipe(scan(), task="dehaze", **FAST)
    with pytest.raises(InputError, match="needs a CT anatomy"):
        pipe(scan(), task="sparse-ct", anatomy="mr-knee", **FAST)
    with pytest.raises(InputError, match="acceleration"):
        pipe(scan(), task="mri", acceleration=1, **FAST)
    with pytest.raises(InputError, match="views"):
        pipe(scan(), task="sparse-ct", views=0, **FAST)
    with pytest.raises(InputError, match="does not apply to task 'mri'"):
        pipe(scan(), task="mri", method="sart")
    with pytest.raises(InputError, match="unknown method"):
        pipe(scan(), task="sparse-ct", method="magic")
    with pytest.raises(InputError, match="tv_weight"):
        pipe(scan(), task="sparse-ct", method="tv", tv_weight=-1)
    assert set(METHODS) == {"fbp", "zero-filled", "sart", "tv", "diffusion"}


def test_missing_controlnet_names_the_available_tasks():
    plain = ReconstructionPipeline(coarse_bundle(controlnets=False), device="cpu")
    with pytest.raises(InputError, match=r"no ControlNet for task 'mri' \(available: none\)"):
        plain(scan(), task="mri", **FAST)
    assert plain(scan(), task="mri", method="zero-filled", acceleration=4, seed=0).psnr is not None  # model-free
    only_ct = coarse_bundle()
    only_ct.controlnets.pop("mri")
    with pytest.raises(InputError, match=r"available: sparse-ct"):
        ReconstructionPipeline(only_ct, device="cpu")(scan(), task="mri", **FAST)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_every_sampler_with_latent_consistency(pipe, sampler):
    r = pipe(scan(), task="sparse-ct", views=6, sampler=sampler, steps=3, seed=1, dc_every=1)
    assert r.dc_applications == 2 and r.sampler == sampler and r.steps == 3
    assert np.isfinite(sitk.GetArrayFromImage(sitk.Cast(r.image, sitk.sitkFloat32))).all()
