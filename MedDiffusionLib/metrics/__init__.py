"""Evaluation metrics: paired image quality (PSNR, SSIM, MS-SSIM) and set distances (MMD, Frechet)."""
from .distribution import (
    VolumeFeatureExtractor,
    extract_features,
    frechet_distance,
    frechet_distance_from_stats,
    mmd,
    simple_volume_features,
)
from .image import ms_ssim3d, psnr, ssim3d

__all__ = [
    "VolumeFeatureExtractor", "extract_features", "frechet_distance", "frechet_distance_from_stats", "mmd",
    "simple_volume_features", "ms_ssim3d", "psnr", "ssim3d",
]
