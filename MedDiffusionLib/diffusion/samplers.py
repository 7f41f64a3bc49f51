"""Sampler registry: `make_sampler(name, diffusion, steps)` and the sampler classes."""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from .base import SPACINGS, Sampler, SamplerStepOutput, spaced_timesteps
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler
from .schedule import GaussianDiffusion

SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp": DPMSolverSampler}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
_ALIASES = {"dpm++": "dpmpp", "dpmsolver++": "dpmpp", "dpm-solver++": "dpmpp", "dpmpp2m": "dpmpp"}


def make_sampler(name: str, diffusion: GaussianDiffusion, steps: int | None = None, **kwargs: Any) -> Sampler:
    """A sampler by name ("ddpm", "ddim", "dpmpp"); `steps=None` takes the library's default for it
    (options.DEFAULT_STEPS, at most T). Extra kwargs go to the class (e.g. eta)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    cls = SAMPLERS.get(key)
    if cls is None:
        raise InputError(f"unknown sampler '{name}' (valid: {', '.join(SAMPLER_NAMES)})")
    return cls(diffusion, steps=steps, **kwargs)


__all__ = ["Sampler", "SamplerStepOutput", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "make_sampler",
           "spaced_timesteps", "SAMPLERS", "SAMPLER_NAMES", "SPACINGS"]
