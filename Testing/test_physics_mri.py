"""Cartesian MRI physics: centred orthonormal FFTs, sampling masks, zero-filling, data consistency."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.physics import (
    data_consistency,
    fft2c,
    fftnc,
    gaussian_mask_1d,
    ifft2c,
    ifftnc,
    mask_acceleration,
    poisson_disc_mask,
    undersample,
    zero_filled,
)


def brain_like(n: int = 64) -> torch.Tensor:
    """Smooth-edged positive test image: an ellipse 'head' with a few darker/brighter blobs."""
    c = torch.linspace(-1, 1, n)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    img = torch.sigmoid(40 * (1 - (xx / 0.75) ** 2 - (yy / 0.9) ** 2))
    img = img - 0.5 * torch.exp(-((xx - 0.25) ** 2 + yy**2) / 0.02)
    img = img - 0.4 * torch.exp(-((xx + 0.3) ** 2 + (yy + 0.2) ** 2) / 0.01)
    img = img + 0.3 * ((xx.abs() < 0.1) & (yy.abs() < 0.5)).float()
    return img.clamp_min(0)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.max()) ** 2 / float(((x - ref) ** 2).mean()))


@pytest.mark.parametrize("shape", [(16, 16), (15, 20)])
def test_fft2c_inverse_orthonormal_centred(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, dtype=torch.complex64, generator=g)
    k = fft2c(x)
    assert torch.allclose(ifft2c(k), x, atol=1e-5)
    # Parseval: the orthonormal FFT preserves energy, and ifft2c is its adjoint
    assert math.isclose(float(k.abs().pow(2).sum()), float(x.abs().pow(2).sum()), rel_tol=1e-5)
    y = torch.randn(2, *shape, dtype=torch.complex64, generator=g)
    assert torch.allclose(torch.vdot(k.flatten(), y.flatten()), torch.vdot(x.flatten(), ifft2c(y).flatten()),
                          rtol=1e-4, atol=1e-3)
    # centred: a constant image has all its energy at index (H // 2, W // 2)
    kc = fft2c(torch.ones(shape))
    peak = divmod(int(kc.abs().argmax()), shape[1])
    assert peak == (shape[0] // 2, shape[1] // 2)
    assert math.isclose(float(kc.abs().max()), math.sqrt(shape[0] * shape[1]), rel_tol=1e-5)


def test_fftnc_over_three_dims():
    x = torch.randn(6, 8, 10, dtype=torch.complex128)
    k = fftnc(x, dims=(0, 1, 2))
    assert torch.allclose(ifftnc(k, dims=(0, 1, 2)), x)
    assert torch.allclose(fftnc(x, (-2, -1)), fft2c(x))


@pytest.mark.parametrize("shape,accel", [((128, 96), 8), ((256, 64), 4), ((64, 64), 8)])
def test_gaussian_mask_1d(shape, accel):
    mask = gaussian_mask_1d(shape, acceleration=accel, center_fraction=0.08, seed=0)
    assert mask.shape == shape and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, mask[:, :1].expand(shape))  # whole phase-encode lines
    assert abs(mask_acceleration(mask) / accel - 1) < 0.1
    n_center = round(shape[0] * 0.08)
    c = shape[0] // 2
    assert bool((mask[c - n_center // 2 : c - n_center // 2 + n_center] == 1).all())
    assert torch.equal(mask, gaussian_mask_1d(shape, acceleration=accel, seed=0))
    assert not torch.equal(mask, gaussian_mask_1d(shape, acceleration=accel, seed=1))


def test_gaussian_mask_variable_density():
    # summed over seeds, central lines are sampled more often than peripheral ones
    ny = 128
    freq = sum(gaussian_mask_1d((ny, 4), acceleration=4, seed=s)[:, 0] for s in range(40))
    centre = freq[ny // 2 - 20 : ny // 2 + 20].mean()
    edge = torch.cat([freq[:20], freq[-20:]]).mean()
    assert centre > 2 * edge


def test_mask_argument_errors():
    with pytest.raises(InputError):
        gaussian_mask_1d((64, 64), acceleration=1)
    with pytest.raises(InputError):
        gaussian_mask_1d((64,), acceleration=4)
    with pytest.raises(InputError):
        poisson_disc_mask((32, 32), acceleration=8, calib=(20, 20))


def test_poisson_disc_mask():
    pytest.importorskip("sigpy")
    shape = (96, 80)
    mask = poisson_disc_mask(shape, acceleration=8, calib=(10, 10), seed=0)
    assert mask.shape == shape and mask.dtype == torch.float32
    assert abs(mask_acceleration(mask) / 8 - 1) < 0.1
    cy, cx = shape[0] // 2, shape[1] // 2
    assert bool((mask[cy - 5 : cy + 5, cx - 5 : cx + 5] == 1).all())  # fully sampled calibration region
    assert torch.equal(mask, poisson_disc_mask(shape, acceleration=8, calib=(10, 10), seed=0))
    assert not torch.equal(mask, poisson_disc_mask(shape, acceleration=8, calib=(10, 10), seed=1))
    assert not torch.equal(mask, mask[:, :1].expand(shape))  # genuinely 2D, not lines


def test_poisson_disc_mask_names_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sigpy", None)
    monkeypatch.setitem(sys.modules, "sigpy.mri", None)
    with pytest.raises(ImportError, match="sigpy"):
        poisson_disc_mask((32, 32), acceleration=4)


def test_zero_filled_full_mask_is_identity():
    img = brain_like(48) - 0.3  # negative values too: the real part keeps them, magnitude would not
    full = torch.ones(48, 48)
    k = undersample(img, full)
    assert k.is_complex()
    assert torch.allclose(zero_filled(k, full), img, atol=1e-5)
    pos = brain_like(48)
    assert torch.allclose(zero_filled(undersample(pos, full), full, output="magnitude"), pos, atol=1e-5)
    assert zero_filled(k, full, output="complex").is_complex()
    with pytest.raises(InputError):
        zero_filled(k, full, output="phase")


def test_zero_filled_quality_drops_with_acceleration():
    img = brain_like(64)
    scores = {}
    for accel in (2, 8):
        mask = gaussian_mask_1d((64, 64), acceleration=accel, seed=0)
        scores[accel] = psnr(zero_filled(undersample(img, mask), mask), img)
    assert scores[2] > scores[8] + 3


def test_data_consistency_hard_projection():
    g = torch.Generator().manual_seed(2)
    truth = brain_like(32)
    mask = gaussian_mask_1d((32, 32), acceleration=4, seed=0)
    y = undersample(truth, mask)
    x = torch.randn(32, 32, generator=g)
    x_dc = data_consistency(x, y, mask)
    k = fft2c(x_dc)
    on = mask.bool().expand_as(k)
    assert torch.allclose(k[on], y[on], atol=1e-5)  # measured samples equal the measurements
    assert torch.allclose(k[~on], fft2c(x)[~on], atol=1e-5)  # the rest is untouched
    assert torch.allclose(data_consistency(x_dc, y, mask), x_dc, atol=1e-5)  # idempotent
    # a real image that already fits the data is a fixed point of the real-output variant
    assert torch.allclose(data_consistency(truth, y, mask, output="real"), truth, atol=1e-5)


def test_data_consistency_soft_weighting_and_volume():
    g = torch.Generator().manual_seed(3)
    vol = torch.stack([brain_like(32) * s for s in (1.0, 0.8, 0.6)])  # (Z, X, Y): mask per axial slice
    mask = gaussian_mask_1d((32, 32), acceleration=4, seed=0)
    y = undersample(vol, mask)
    x = torch.randn(3, 32, 32, generator=g)
    assert torch.allclose(data_consistency(x, y, mask, lam=0.0), x.to(torch.complex64), atol=1e-5)
    hard = data_consistency(x, y, mask)
    assert torch.allclose(data_consistency(x, y, mask, lam=1e7), hard, atol=1e-4)
    half = fft2c(data_consistency(x, y, mask, lam=1.0))
    on = mask.bool().expand_as(half)
    assert torch.allclose(half[on], 0.5 * (fft2c(x)[on] + y[on]), atol=1e-5)
    with pytest.raises(InputError):
        data_consistency(x, y, mask, lam=-1.0)
    with pytest.raises(InputError):
        data_consistency(x, y, torch.ones(16, 16))


def test_data_consistency_is_differentiable():
    mask = gaussian_mask_1d((16, 16), acceleration=4, seed=0)
    y = undersample(brain_like(16), mask)
    x = torch.randn(16, 16, requires_grad=True)
    data_consistency(x, y, mask, output="real").pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mri_on_cuda():
    img = brain_like(32).cuda()
    mask = gaussian_mask_1d((32, 32), acceleration=4, seed=0, device="cuda")
    y = undersample(img, mask)
    out = data_consistency(torch.zeros_like(img), y, mask, output="real")
    assert out.is_cuda
    assert torch.allclose(zero_filled(y, mask).cpu(), zero_filled(y.cpu(), mask.cpu()), atol=1e-5)
