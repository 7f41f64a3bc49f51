"""Metrics: PSNR/SSIM/MS-SSIM behaviour, MMD and Frechet distance against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.metrics import (
    extract_features,
    frechet_distance,
    frechet_distance_from_stats,
    mmd,
    ms_ssim3d,
    psnr,
    simple_volume_features,
    ssim3d,
)


def _smooth_volume(shape=(24, 24, 24), seed=0) -> np.ndarray:
    """A structured volume in [0, 1] (SSIM on pure white noise says little)."""
    rng = np.random.default_rng(seed)
    z, x, y = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = 0.5 + 0.3 * np.sin(3 * x + 1) * np.cos(2 * y) + 0.2 * (z ** 2 < 0.3)
    return np.clip(vol + 0.02 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def test_psnr() -> None:
    x = _smooth_volume()
    assert psnr(x, x, 1.0) == math.inf
    assert psnr(x, x + 0.1, 1.0) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert psnr(x, x + 0.1, 2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-4)
    with pytest.raises(InputError):
        psnr(x, x[:-1], 1.0)
    with pytest.raises(InputError):
        psnr(x, x, 0.0)


def test_ssim_identity_noise_and_input_types() -> None:
    x = _smooth_volume()
    assert ssim3d(x, x, 1.0) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(1)
    values = [ssim3d(x, x + s * rng.standard_normal(x.shape).astype(np.float32), 1.0) for s in (0.02, 0.05, 0.15)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    noisy = x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    ref = ssim3d(x, noisy, 1.0)
    assert ssim3d(torch.from_numpy(x), torch.from_numpy(noisy), 1.0) == pytest.approx(ref, abs=1e-6)
    assert ssim3d(x[None], noisy[None], 1.0) == pytest.approx(ref, abs=1e-6)  # (C, D, H, W)
    assert ssim3d(x[None, None], noisy[None, None], 1.0) == pytest.approx(ref, abs=1e-6)
    # Scaling both volumes and data_range together changes nothing.
    assert ssim3d(x * 1000, noisy * 1000, 1000.0) == pytest.approx(ref, abs=1e-4)
    assert ssim3d(x, noisy, 1.0, dtype=torch.float64) == pytest.approx(ref, abs=1e-5)
    with pytest.raises(InputError):
        ssim3d(x, x, 1.0, win=6)


def test_ssim_small_volume_shrinks_window() -> None:
    x = _smooth_volume((5, 9, 9))
    assert ssim3d(x, x, 1.0, win=7) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim() -> None:
    x = _smooth_volume((40, 40, 40))  # 3 scales with a 7-voxel window
    assert ms_ssim3d(x, x, 1.0) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(2)
    light = ms_ssim3d(x, x + 0.03 * rng.standard_normal(x.shape).astype(np.float32), 1.0)
    heavy = ms_ssim3d(x, x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), 1.0)
    assert 0.0 < heavy < light < 1.0
    opposite = ms_ssim3d(x, 1.0 - x, 1.0)  # anti-correlated structure: clamped, still in [0, 1]
    assert 0.0 <= opposite < heavy
    small = _smooth_volume((16, 16, 16))
    assert 0.0 < ms_ssim3d(small, small * 0.9, 1.0) <= 1.0  # fewer scales chosen automatically
    assert ms_ssim3d(x, x, 1.0, weights=(0.5, 0.5)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="too small"):
        ms_ssim3d(small, small, 1.0, weights=(0.2,) * 5)


def test_mmd_same_vs_shifted() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((150, 8)), rng.standard_normal((150, 8))
    shifted = rng.standard_normal((150, 8)) + 1.0
    same = mmd(a, b)
    diff = mmd(a, shifted)
    assert abs(same) < 0.02 and diff > 10 * max(abs(same), 1e-3)
    assert mmd(a, shifted, bandwidth=2.0) > 0.05
    # Linear kernel: MMD^2 estimates |mean_a - mean_b|^2 (= 8 for a shift of 1 in 8 dimensions).
    assert mmd(a, shifted, kernel="linear") == pytest.approx(8.0, rel=0.25)
    assert mmd(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(same)
    with pytest.raises(InputError):
        mmd(a, b, kernel="laplace")
    with pytest.raises(InputError):
        mmd(a[:1], b)
    with pytest.raises(InputError):
        mmd(a, b[:, :3])


def _sqrtm_reference(m: np.ndarray) -> np.ndarray:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    return np.real(scipy_linalg.sqrtm(m))


def test_frechet_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    # Diagonal (commuting) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General (non-commuting) covariances against the textbook sqrtm formula.
    rng = np.random.default_rng(4)
    m1, m2 = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(3), m2 @ m2.T + 0.1 * np.eye(3)
    ref = 5.0 + np.trace(c1 + c2 - 2 * _sqrtm_reference(c1 @ c2))
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance_from_stats(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)
    # Singular covariance (rank-deficient features) stays finite and non-negative.
    assert frechet_distance_from_stats(mu1, np.zeros((3, 3)), mu2, c2) >= 0.0


def test_frechet_from_samples() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 4))
    y = rng.standard_normal((400, 4)) * 2.0 + 3.0
    fd = frechet_distance(x, y)
    stats = frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fd == pytest.approx(stats)
    assert fd == pytest.approx(4 * 9 + 4 * (2 - 1) ** 2, rel=0.15)  # population value 40
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(InputError):
        frechet_distance(x, y[:, :2])


def test_feature_extraction() -> None:
    vols = [np.random.default_rng(k).uniform(-1, 1, (8, 8, 8)) for k in range(3)]
    feats = extract_features(simple_volume_features, vols)
    assert feats.shape == (3, 32 + 8) and np.isfinite(feats).all()
    torch_feats = extract_features(lambda v: torch.as_tensor(v).mean().reshape(1), vols)
    assert torch_feats.shape == (3, 1)
    with pytest.raises(InputError):
        extract_features(simple_volume_features, [])
