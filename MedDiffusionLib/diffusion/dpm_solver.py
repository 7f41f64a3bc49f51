"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep solver of the diffusion ODE in data prediction."""
from __future__ import annotations

import math

import torch

from .base import Sampler, SamplerStepOutput
from .schedule import GaussianDiffusion


class DPMSolverSampler(Sampler):
    """Deterministic DPM-Solver++ 2M with the x0 estimate clipped to [-1, 1] (thresholded data prediction).

    With lambda = log(alpha / sigma), alpha^2 = alpha_bar, and h = lambda' - lambda, a step is
        x' = (sigma' / sigma) x - alpha' (exp(-h) - 1) D,
    where D = x0 (first order: the first step; identical to DDIM eta=0) or
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h (second order, the later steps).
    The last grid point is t = 0, and the final step, from t = 0 to the data, returns the clipped x0
    estimate (first order by construction). With `lower_order_final` (default) and fewer than 15 steps the
    step into t = 0 is first order too, as in diffusers: the extrapolation of two x0 estimates is the
    least stable part with few steps.

    Timesteps: quadratic in time by default (t_k = (T-1) (k/(n-1))^2, denser at low noise). On the
    authors' cosine schedule an evenly-in-time grid leaves the low-noise end too coarse: sampling a
    N(0.3, 0.1^2) toy with its exact denoiser gave about half the true std with 10 steps (evenly) against
    ~1.0 (quadratic). A logSNR-uniform grid spends many steps in the pure-noise tail (the clipped
    schedule reaches lambda = -11 at t = T-1) unless truncated ad hoc; "linear" stays available.
    """

    name = "dpmpp"
    default_spacing = "quadratic"

    def __init__(self, diffusion: GaussianDiffusion, steps: int | None = None, clip_x0: bool = True,
                 spacing: str | None = None, lower_order_final: bool = True) -> None:
        self.lower_order_final = lower_order_final
        super().__init__(diffusion, steps, clip_x0, spacing)

    def reset(self) -> None:
        """Forget the previous step's x0 estimate (the history of the multistep solver)."""
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda = 0.0
        self._prev_index = -1

    def _coefficients(self, t: int) -> tuple[float, float, float]:
        """(alpha, sigma, lambda) at timestep t, in float64."""
        a = self.diffusion.alpha_bar(t)
        alpha, sigma = math.sqrt(a), math.sqrt(1.0 - a)
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerStepOutput:
        """One DPM-Solver++ step (second order once a previous estimate exists).

        Arguments, returns and errors as in `Sampler.step` (deterministic: ``generator`` is unused). Steps must
        run in order; a step at index 0 starts a new run.
        """
        i = self.index_for(t)
        if i == 0:
            self.reset()  # a new run: never mix in the history of the previous one
        t_now, t_next = int(self.timesteps[i]), self.prev_timestep(i)
        x0 = self._pred_x0(model_output, t_now, x)
        alpha, sigma, lam = self._coefficients(t_now)
        if t_next < 0:
            prev = x0
        else:
            alpha_n, sigma_n, lam_n = self._coefficients(t_next)
            h = lam_n - lam
            first_order_final = (self.lower_order_final and self.num_inference_steps < 15
                                 and i + 2 == self.num_inference_steps)
            if self._prev_x0 is not None and self._prev_index == i - 1 and not first_order_final:
                r = (lam - self._prev_lambda) / h
                d = x0 + (0.5 / r) * (x0 - self._prev_x0)
            else:
                d = x0
            prev = (sigma_n / sigma) * x - (alpha_n * math.expm1(-h)) * d
        self._prev_x0, self._prev_lambda, self._prev_index = x0, lam, i
        return SamplerStepOutput(prev, x0)
