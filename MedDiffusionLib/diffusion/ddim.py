"""DDIM sampling (Song et al. 2021) with eta >= 0 and a noise estimate made consistent with the clipped x0."""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from .base import Sampler, SamplerStepOutput
from .schedule import GaussianDiffusion, _randn


class DDIMSampler(Sampler):
    """x_{t'} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, with a = alpha_bar.

    sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'): eta = 0 is deterministic, eta = 1 has the
    DDPM posterior variance. After clipping x0 to [-1, 1] the noise estimate is recomputed from the
    clipped x0, eps = (x_t - sqrt(a) x0) / sqrt(1 - a); otherwise the step would pair an in-range x0 with
    the noise of an out-of-range one and push the sample off the data manifold, which shows with few steps.
    Timesteps are quadratically spaced by default (see `DPMSolverSampler` for why); "linear" is optional.

    Args:
        diffusion: see `Sampler`.
        steps: see `Sampler`.
        eta: noise level, a finite number >= 0 (0: deterministic; 1: DDPM posterior variance).
        clip_x0: see `Sampler`.
        spacing: see `Sampler`.

    Raises:
        InputError: a negative or non-finite eta, or what `Sampler` refuses.
    """

    name = "ddim"

    default_spacing = "quadratic"

    def __init__(self, diffusion: GaussianDiffusion, steps: int | None = None, eta: float = 0.0,
                 clip_x0: bool = True, spacing: str | None = None) -> None:
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise InputError(f"DDIM eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        super().__init__(diffusion, steps, clip_x0, spacing)

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerStepOutput:
        """One DDIM step from timestep ``t`` to the next kept one (deterministic when eta is 0).

        Arguments, returns and errors as in `Sampler.step`; ``generator`` draws the noise when eta > 0.
        """
        i = self.index_for(t)
        t_now, t_next = int(self.timesteps[i]), self.prev_timestep(i)
        x0 = self._pred_x0(model_output, t_now, x)
        if t_next < 0:
            return SamplerStepOutput(x0, x0)  # alpha_bar' = 1: the clean estimate itself
        eps = self.diffusion.predict_eps_from_x0(x, t_now, x0) if self.clip_x0 else model_output
        a, a_next = self.diffusion.alpha_bar(t_now), self.diffusion.alpha_bar(t_next)
        sigma = self.eta * math.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
        # eta > 1 could make the direction coefficient imaginary; all the variance then goes to the noise.
        direction = math.sqrt(max(1.0 - a_next - sigma * sigma, 0.0))
        prev = math.sqrt(a_next) * x0 + direction * eps
        if sigma > 0.0:
            prev = prev + sigma * _randn(x.shape, generator, x.device, x.dtype)
        return SamplerStepOutput(prev, x0)
