"""A minimal sampling loop for the sampler tests (the pipelines run their own: progress, cancel, consistency)."""
from __future__ import annotations

from typing import Callable

import torch

from MedDiffusionLib.diffusion import Sampler, SamplerStepOutput

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_loop(sampler: Sampler, model_fn: ModelFn, x: torch.Tensor,
                generator: torch.Generator | None = None,
                callback: Callable[[int, int, SamplerStepOutput], None] | None = None) -> torch.Tensor:
    """Run all steps: `model_fn(x, t_batch)` must return eps; `callback(i, t, out)` after each step."""
    sampler.reset()
    for i, t in enumerate(sampler.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = sampler.step(model_fn(x, t_batch), t, x, generator)
        x = out.prev_sample
        if callback is not None:
            callback(i, t, out)
    return x
