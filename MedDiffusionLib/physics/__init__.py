"""Differentiable acquisition physics in torch: parallel-beam CT and Cartesian MRI undersampling."""
from .ct import FBP_WINDOWS, ParallelBeamProjector, add_poisson_noise, ramp_filter
from .mri import (
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

__all__ = [
    "FBP_WINDOWS",
    "ParallelBeamProjector",
    "add_poisson_noise",
    "ramp_filter",
    "data_consistency",
    "fft2c",
    "fftnc",
    "gaussian_mask_1d",
    "ifft2c",
    "ifftnc",
    "mask_acceleration",
    "poisson_disc_mask",
    "undersample",
    "zero_filled",
]
