"""Model-agnostic diffusion: the authors' Gaussian diffusion schedule, training loss and samplers."""
from .base import SPACINGS, Sampler, SamplerStepOutput, spaced_timesteps
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler
from .samplers import SAMPLER_CLASSES, make_sampler
from .schedule import BUFFER_NAMES, GaussianDiffusion, cosine_betas, linear_betas

__all__ = [
    "BUFFER_NAMES", "GaussianDiffusion", "cosine_betas", "linear_betas",
    "Sampler", "SamplerStepOutput", "DDPMSampler", "DDIMSampler", "DPMSolverSampler",
    "make_sampler", "spaced_timesteps", "SAMPLER_CLASSES", "SPACINGS",
]
