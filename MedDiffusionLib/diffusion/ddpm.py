"""Ancestral DDPM sampling: the authors' sampler (T steps) and its respaced form for fewer steps."""
from __future__ import annotations

import torch

from .base import Sampler, SamplerStepOutput
from .schedule import GaussianDiffusion, _randn


class DDPMSampler(Sampler):
    """x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) with x0_hat clipped to [-1, 1] and the clipped posterior log-variance.

    With steps == T this is exactly the authors' `p_sample` loop (no noise added at the last step). With
    fewer steps the chain runs on the improved-DDPM respaced process: the kept timesteps (evenly spaced
    by default, `spacing="quadratic"` optional) keep their alpha_bar and the betas between them are
    recomputed, so the model is still called at original timesteps. Noise is drawn from `generator` as
    `torch.randn(x.shape)` on the generator's device (no draw at the last step).
    """

    name = "ddpm"

    def __init__(self, diffusion: GaussianDiffusion, steps: int | None = None, clip_x0: bool = True,
                 spacing: str | None = None) -> None:
        super().__init__(diffusion, steps, clip_x0, spacing)

    def set_timesteps(self, steps: int) -> None:
        """Keep ``steps`` timesteps and respace the process over them (the exact DDPM when steps == T).

        Raises:
            InputError: as `Sampler.set_timesteps`.
        """
        super().set_timesteps(steps)
        # Index k of the respaced process is the k-th smallest kept timestep (identity when steps == T).
        self.process = self.diffusion.respace(self.timesteps)

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerStepOutput:
        """One ancestral step of the respaced DDPM: x_{t-1} sampled from the posterior given the predicted noise.

        Arguments, returns and errors as in `Sampler.step`; ``generator`` draws the noise (none at the last step).
        """
        i = self.index_for(t)
        k = self.num_inference_steps - 1 - i
        self._check_shape(model_output, x)
        # One timestep for the whole batch: the schedule values broadcast (a per-sample gather of the same value
        # costs more than the arithmetic on small latents and gives identical numbers).
        mean, _, log_var, x0 = self.process.p_mean_variance(model_output, x, k, clip=self.clip_x0)
        if k == 0:
            return SamplerStepOutput(mean, x0)  # last step: the posterior mean, no noise
        noise = _randn(x.shape, generator, x.device, x.dtype)
        return SamplerStepOutput(mean + (0.5 * log_var).exp() * noise, x0)
