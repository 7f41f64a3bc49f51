"""Parallel-beam CT operator: adjointness, FBP accuracy and scale, geometry, autograd, Poisson noise."""
from __future__ import annotations

import math

import pytest
import torch

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.physics import FBP_WINDOWS, ParallelBeamProjector, add_poisson_noise

# (intensity, semi-axis x, semi-axis y, centre x, centre y, rotation deg) in [-1, 1]^2 coordinates:
# the modified Shepp-Logan head phantom.
_ELLIPSES = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0), (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18), (-0.2, 0.16, 0.41, -0.22, 0.0, 18),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0), (0.1, 0.046, 0.046, 0.0, 0.1, 0), (0.1, 0.046, 0.046, 0.0, -0.1, 0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0), (0.1, 0.023, 0.023, 0.0, -0.606, 0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0),
]


def shepp_logan(n: int, supersample: int = 4) -> torch.Tensor:
    """Pixel-averaged phantom (supersampled edges, as a scanner's finite pixels would see them)."""
    m = n * supersample
    c = (torch.arange(m, dtype=torch.float64) + 0.5) / m * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    img = torch.zeros(m, m, dtype=torch.float64)
    for val, ax, ay, x0, y0, deg in _ELLIPSES:
        p = math.radians(deg)
        u = (xx - x0) * math.cos(p) + (yy - y0) * math.sin(p)
        v = -(xx - x0) * math.sin(p) + (yy - y0) * math.cos(p)
        img += val * ((u / ax) ** 2 + (v / ay) ** 2 <= 1)
    return img.reshape(n, supersample, n, supersample).mean(dim=(1, 3)).float()


def radius_grid(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    return torch.sqrt(xx**2 + yy**2)


def psnr(x: torch.Tensor, ref: torch.Tensor, region: torch.Tensor) -> float:
    mse = float(((x - ref)[region] ** 2).mean())
    return 10 * math.log10(1.0 / mse)  # the phantom's range is [0, 1]


@pytest.fixture(scope="module")
def phantom128() -> torch.Tensor:
    return shepp_logan(128)


def test_default_geometry_covers_image():
    proj = ParallelBeamProjector((64, 48), n_views=30)
    assert proj.n_detectors >= math.ceil(math.hypot(64, 48))
    assert proj.angles.shape == (30,) and float(proj.angles.max()) < math.pi
    sino = proj(torch.ones(64, 48))
    assert sino.shape == (30, proj.n_detectors)
    # nothing falls off the detector: the outermost bins stay empty
    assert float(sino[:, 0].abs().max()) == 0 and float(sino[:, -1].abs().max()) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_adjoint_inner_products(dtype, tol):
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(17, generator=g, dtype=torch.float64) * math.pi  # irregular angles too
    for proj in (ParallelBeamProjector((40, 56), n_views=23), ParallelBeamProjector((33, 33), 17, angles=angles)):
        x = torch.randn(3, *proj.image_size, generator=g, dtype=dtype)
        y = torch.randn(3, *proj.sinogram_shape, generator=g, dtype=dtype)
        lhs = float((proj(x) * y).sum())
        rhs = float((x * proj.adjoint(y)).sum())
        assert abs(lhs - rhs) <= tol * max(abs(lhs), abs(rhs))
        assert proj(x).dtype == dtype


def test_batched_volume_equals_slice_by_slice():
    proj = ParallelBeamProjector((32, 32), n_views=12)
    vol = torch.randn(2, 5, 32, 32)  # any leading dims; a (Z, X, Y) volume is the 1-dim case
    sino = proj(vol)
    assert sino.shape == (2, 5, 12, proj.n_detectors)
    assert torch.allclose(sino[1, 3], proj(vol[1, 3]), atol=1e-5)
    back = proj.adjoint(sino)
    assert back.shape == vol.shape
    assert torch.allclose(back[0, 2], proj.adjoint(sino[0, 2]), atol=1e-4)


def test_centred_disk_is_rotation_invariant():
    n, r = 96, 30.0
    proj = ParallelBeamProjector((n, n), n_views=24)
    # pixel-averaged disk (4x4 supersampling) so its edge is not a staircase
    sub = (torch.arange(4 * n) + 0.5) / 4 - 0.5 - (n - 1) / 2
    yy, xx = torch.meshgrid(sub, sub, indexing="ij")
    disk = ((xx**2 + yy**2) <= r**2).float().reshape(n, 4, n, 4).mean(dim=(1, 3))
    sino = proj(disk)
    t = torch.arange(proj.n_detectors) - (proj.n_detectors - 1) / 2
    chord = 2 * torch.sqrt(torch.clamp(r**2 - t**2, min=0))
    # every view sees the same profile, equal to the analytic chord length 2 sqrt(r^2 - t^2)
    body = t.abs() < r - 2  # the sqrt edge of the chord is smoothed by the pixels at the rim
    assert torch.allclose(sino[:, body], chord[body].expand(24, -1), atol=0.01 * 2 * r)
    centre = t.abs() < 10
    assert torch.allclose(sino[:, centre], chord[centre].expand(24, -1), rtol=0.01)
    spread = sino.max(dim=0).values - sino.min(dim=0).values
    assert float(spread.max()) < 0.02 * 2 * r
    # mass: each view integrates the disk area
    assert torch.allclose(sino.sum(dim=1), disk.sum().expand(24), rtol=2e-3)


def test_fbp_many_views_reconstructs(phantom128):
    proj = ParallelBeamProjector((128, 128), n_views=180)
    sino = proj(phantom128)
    rec = proj.fbp(sino)
    region = radius_grid(128, 128) < 0.45 * 128
    assert psnr(rec, phantom128, region) > 25.0
    # the pi / n_views scaling puts FBP on the image's intensity scale
    ratio = float(rec[region].mean() / phantom128[region].mean())
    assert abs(ratio - 1) < 0.02
    # a flat disk is reproduced at its level
    disk = (radius_grid(128, 128) <= 50).float()
    flat = proj.fbp(proj(disk))[radius_grid(128, 128) <= 40]
    assert abs(float(flat.mean()) - 1) < 0.01 and float(flat.std()) < 0.03


def test_sparse_views_streak(phantom128):
    region = radius_grid(128, 128) < 0.45 * 128
    scores = {}
    for views in (18, 180):
        proj = ParallelBeamProjector((128, 128), n_views=views)
        scores[views] = psnr(proj.fbp(proj(phantom128)), phantom128, region)
    assert scores[180] > scores[18] + 5.0


def test_fbp_windows(phantom128):
    proj = ParallelBeamProjector((128, 128), n_views=90)
    sino = proj(phantom128)
    region = radius_grid(128, 128) < 0.45 * 128
    for window in FBP_WINDOWS:
        rec = proj.fbp(sino, window=window)
        assert rec.shape == (128, 128)
        assert abs(float(rec[region].mean() / phantom128[region].mean()) - 1) < 0.03, window
    with pytest.raises(InputError):
        proj.fbp(sino, window="bogus")
    with pytest.raises(InputError):
        proj.fbp(sino, filter="shepp")


def test_gradients_flow():
    proj = ParallelBeamProjector((24, 24), n_views=10)
    x = torch.randn(2, 24, 24, requires_grad=True)
    y = torch.randn(2, *proj.sinogram_shape)
    loss = 0.5 * ((proj(x) - y) ** 2).sum()
    loss.backward()
    expected = proj.adjoint(proj(x.detach()) - y)  # gradient of the least-squares loss is A^T (Ax - y)
    assert torch.allclose(x.grad, expected, atol=1e-4)
    # fbp is differentiable w.r.t. the sinogram
    s = proj(x.detach()).requires_grad_(True)
    proj.fbp(s).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_second_order_gradients():
    # Hessian-vector product of 0.5 ||A x||^2 is A^T A v: checks the backward of the backward
    # (without torch.autograd.gradcheck, whose first use imports sympy and costs seconds).
    proj = ParallelBeamProjector((12, 10), n_views=5)
    x = torch.randn(12, 10, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, 10, dtype=torch.float64)
    (grad,) = torch.autograd.grad(0.5 * (proj(x) ** 2).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), x)
    assert torch.allclose(hvp, proj.adjoint(proj(v)), atol=1e-10)


def test_low_precision_input_is_supported():
    proj = ParallelBeamProjector((16, 16), n_views=8)
    x = torch.rand(16, 16)
    out = proj(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), proj(x), rtol=0.02, atol=0.1)


def test_shape_errors_are_input_errors():
    proj = ParallelBeamProjector((16, 16), n_views=8)
    with pytest.raises(InputError):
        proj(torch.zeros(16, 15))
    with pytest.raises(InputError):
        proj.adjoint(torch.zeros(8, proj.n_detectors + 1))
    with pytest.raises(InputError):
        ParallelBeamProjector((16, 16), n_views=3, angles=torch.zeros(4))


def test_poisson_noise_scale_and_reproducibility():
    sino = torch.full((50, 200), 50.0)
    photons, mu = 1e4, 0.02
    a = add_poisson_noise(sino, photons, mu, generator=torch.Generator().manual_seed(3))
    b = add_poisson_noise(sino, photons, mu, generator=torch.Generator().manual_seed(3))
    c = add_poisson_noise(sino, photons, mu, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # delta method: std(-log(N / I0) / mu) = 1 / (mu sqrt(I0 exp(-p mu)))
    expected_std = 1.0 / (mu * math.sqrt(photons * math.exp(-50.0 * mu)))
    noise = a - sino
    assert abs(float(noise.std()) / expected_std - 1) < 0.1
    assert abs(float(noise.mean())) < 0.1 * expected_std
    # more photons, less noise; the method on the projector is the same function
    proj = ParallelBeamProjector((8, 8), n_views=4)
    d = proj.add_poisson_noise(sino, 1e6, mu, generator=torch.Generator().manual_seed(3))
    assert float((d - sino).std()) < 0.2 * float(noise.std())
    with pytest.raises(InputError):
        add_poisson_noise(sino, photons=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    proj = ParallelBeamProjector((64, 64), n_views=30)
    x = torch.randn(3, 64, 64)
    ref = proj(x)
    out = proj(x.cuda())
    assert out.is_cuda and torch.allclose(out.cpu(), ref, atol=1e-3)
    y = torch.randn_like(ref)
    assert torch.allclose(proj.adjoint(y.cuda()).cpu(), proj.adjoint(y), atol=1e-3)
    assert torch.allclose(proj.fbp(ref.cuda()).cpu(), proj.fbp(ref), atol=1e-3)
    xg = x.cuda().requires_grad_(True)
    proj(xg).sum().backward()
    assert xg.grad is not None
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert add_poisson_noise(out, generator=gen).is_cuda
