"""Sampler registry: `make_sampler(name, diffusion, steps)` and the sampler classes."""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..options import SAMPLERS
from .base import SPACINGS, Sampler, SamplerStepOutput, spaced_timesteps
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler
from .schedule import GaussianDiffusion

# The class behind each name of options.SAMPLERS (the one list of sampler choices, in its order).
SAMPLER_CLASSES: dict[str, type[Sampler]] = dict(zip(SAMPLERS, (DDPMSampler, DDIMSampler, DPMSolverSampler)))
_ALIASES = {"dpm++": "dpmpp", "dpmsolver++": "dpmpp", "dpm-solver++": "dpmpp", "dpmpp2m": "dpmpp"}


def make_sampler(name: str, diffusion: GaussianDiffusion, steps: int | None = None, **kwargs: Any) -> Sampler:
    """A sampler by name ("ddpm", "ddim", "dpmpp"); `steps=None` takes the library's default for it
    (options.DEFAULT_STEPS, at most T). Extra kwargs go to the class (e.g. eta).

    Args:
        name: one of `options.SAMPLERS`, case-insensitive; 'dpm++', 'dpmsolver++', 'dpm-solver++' and 'dpmpp2m'
            also name dpmpp.
        diffusion: the schedule the model was trained with.
        steps: 1 .. T, or None for the default.
        **kwargs: the class's own keywords: clip_x0, spacing; ddim: eta; dpmpp: lower_order_final.

    Raises:
        InputError: an unknown name, or settings the class refuses.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    cls = SAMPLER_CLASSES.get(key)
    if cls is None:
        raise InputError(f"unknown sampler '{name}' (valid: {', '.join(SAMPLERS)})")
    return cls(diffusion, steps=steps, **kwargs)


__all__ = ["Sampler", "SamplerStepOutput", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "make_sampler",
           "spaced_timesteps", "SAMPLER_CLASSES", "SPACINGS"]
