"""Distribution metrics between two sets of volumes, computed on feature vectors: MMD and Frechet distance.

About the features: the usual 3D choice (a MedicalNet-style ResNet pretrained on medical volumes) cannot be
downloaded in this offline project, so Frechet distance / MMD here are computed on the features of a named
3D network whose weights the project ships (the demo autoencoder's encoder, global-average-pooled per level,
wired in by the evaluation pipeline). The numbers are therefore comparable only within this project and
with the same feature network, never with FID/FVD values published elsewhere.
``simple_volume_features`` is a network-free baseline (intensity histogram and gradient statistics) for
tests and quick sanity checks.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, Union, runtime_checkable

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "VolumeFeatureExtractor",
    "extract_features",
    "simple_volume_features",
    "mmd",
    "frechet_distance",
    "frechet_distance_from_stats",
    "median_bandwidth",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


@runtime_checkable
class VolumeFeatureExtractor(Protocol):
    """Maps one volume (network order (Z, X, Y) or (C, Z, X, Y), values in [-1, 1]) to a 1D feature vector."""

    def __call__(self, volume: ArrayLike) -> ArrayLike:  # pragma: no cover - protocol
        """Feature array (any shape, flattened by the caller) of one volume."""
        ...


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def extract_features(fn: VolumeFeatureExtractor, volumes: Iterable[ArrayLike]) -> np.ndarray:
    """Apply ``fn`` to each volume (gradients off) and stack the flattened results into (N, F) float64."""
    feats: list[np.ndarray] = []
    with torch.no_grad():
        for vol in volumes:
            f = _np(fn(vol)).reshape(-1)
            if feats and f.shape != feats[0].shape:
                raise InputError(f"feature extractor returned {f.shape[0]} values, earlier {feats[0].shape[0]}")
            feats.append(f)
    if not feats:
        raise InputError("no volumes to extract features from")
    return np.stack(feats)


def simple_volume_features(volume: ArrayLike, bins: int = 32, value_range: tuple[float, float] = (-1.0, 1.0)
                           ) -> np.ndarray:
    """Network-free baseline features: intensity histogram, moments and gradient-magnitude statistics."""
    v = _np(volume)
    v = v.reshape(v.shape[-3:]) if v.ndim > 3 and int(np.prod(v.shape[:-3])) == 1 else v
    hist, _ = np.histogram(np.clip(v, *value_range), bins=bins, range=value_range)
    hist = hist / max(v.size, 1)
    grads = np.gradient(v) if min(v.shape) > 1 else [np.zeros_like(v)]
    gmag = np.sqrt(sum(g * g for g in grads))
    stats = [v.mean(), v.std(), np.percentile(v, 5), np.percentile(v, 50), np.percentile(v, 95),
             gmag.mean(), gmag.std(), np.percentile(gmag, 90)]
    return np.concatenate([hist, np.asarray(stats)])


def _check_feats(a: ArrayLike, b: ArrayLike, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _np(a), _np(b)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"feature sets must be (N, F) with the same F, got {x.shape} and {y.shape}")
    if len(x) < min_n or len(y) < min_n:
        raise InputError(f"need at least {min_n} samples per set, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("feature sets contain NaN or infinite values")
    return x, y


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: the median pairwise Euclidean distance over the pooled samples (off-diagonal)."""
    z = np.concatenate([x, y])
    d = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
    d = d[d > 0]
    return float(np.sqrt(np.median(d))) if d.size else 1.0


def mmd(feats_a: ArrayLike, feats_b: ArrayLike, kernel: str = "rbf", bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy between two (N, F) feature sets.

    ``kernel`` "rbf": exp(-|x - y|^2 / (2 bandwidth^2)), bandwidth by the median heuristic when None;
    "linear": x . y (then MMD^2 is the squared distance between the means, minus finite-sample terms).
    The unbiased estimator can be slightly negative when both sets come from the same distribution.
    """
    x, y = _check_feats(feats_a, feats_b, 2)
    if kernel == "rbf":
        bw = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
        if not bw > 0:
            raise InputError(f"RBF bandwidth must be positive, got {bandwidth}")
        gamma = 1.0 / (2.0 * bw * bw)
        kxx, kyy, kxy = (np.exp(-gamma * _sq_dists(p, q)) for p, q in ((x, x), (y, y), (x, y)))
    elif kernel == "linear":
        kxx, kyy, kxy = x @ x.T, y @ y.T, x @ y.T
    else:
        raise InputError(f"unknown MMD kernel '{kernel}'; use 'rbf' or 'linear'")
    m, n = len(x), len(y)
    # Unbiased: drop the diagonal (self-similarity) terms of the within-set kernels.
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) for Gaussians (the FID formula).

    tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    C1^(1/2) C2 C1^(1/2) (same spectrum as C1 C2), which avoids the complex round-off of a general sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise InputError(f"mismatched statistics: means {mu1.shape}/{mu2.shape}, covariances "
                         f"{cov1.shape}/{cov2.shape}")
    s1 = _sqrt_psd(cov1)
    mid = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((mid + mid.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    return max(value, 0.0)  # tiny negative values are round-off


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets (sample covariance, N - 1)."""
    x, y = _check_feats(feats_a, feats_b, 2)
    return frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
