"""Common machinery of the samplers: timestep grids, validation, noise, and a plain sampling loop.

Samplers are diffusers-style scheduler objects, kept apart from the networks: the caller owns the loop,
calls the model at `sampler.timesteps[i]` (original training timesteps, 0..T-1) and hands the predicted
noise to `sampler.step`. That keeps progress reporting, cancellation and data consistency in the
pipelines, and lets any epsilon-prediction model be used.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Sequence

import torch

from ..errors import InputError
from ..options import default_steps
from .schedule import GaussianDiffusion, _randn


class SamplerStepOutput(NamedTuple):
    """Result of one sampler step: the less noisy sample and the (clipped) clean-data estimate."""

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


SPACINGS: tuple[str, ...] = ("linear", "quadratic")


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "linear") -> torch.Tensor:
    """`steps` distinct timesteps over [0, T-1], descending, both ends included (T-1 alone for one step).

    Args:
        num_train_timesteps: T, the schedule's length.
        steps: how many to keep, 1 .. T (not checked here: `Sampler.set_timesteps` checks it).
        spacing: one of `SPACINGS`.

    Raises:
        InputError: an unknown spacing.

    "linear": evenly spaced in time (improved-DDPM respacing; the spacing is >= 1, so rounding never
    merges two timesteps). "quadratic": t_k = (T-1) (k/(n-1))^2 as in the DDIM paper, denser at low
    noise; consecutive equal values are pushed up by one, which keeps them distinct and <= T-1 (the
    parabola lies under the line of slope 1 through (n-1, T-1)). Both give all T timesteps for n = T.
    """
    t_max = num_train_timesteps - 1
    if steps == 1:
        return torch.tensor([t_max], dtype=torch.long)
    frac = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if spacing == "linear":
        return (frac * t_max).round().long().flip(0)
    if spacing != "quadratic":
        raise InputError(f"unknown timestep spacing '{spacing}' (valid: {', '.join(SPACINGS)})")
    grid: list[int] = []
    for v in (frac.square() * t_max).round().long().tolist():
        grid.append(max(v, grid[-1] + 1) if grid else v)
    return torch.tensor(grid[::-1], dtype=torch.long)


class Sampler:
    """Base class. Subclasses implement `step` and may keep multistep state (cleared by `reset`).

    Args:
        diffusion: the noise schedule the model was trained with.
        steps: denoising steps (model evaluations), 1 .. T; None: `default_steps`.
        clip_x0: clip each clean-data estimate to [-1, 1] (the authors do; latents and images live there).
        spacing: timestep grid, one of `SPACINGS`; None: the class's ``default_spacing``.

    Raises:
        InputError: an unknown spacing, or steps refused by `set_timesteps`.
    """

    name: str = "base"

    default_spacing: str = "linear"

    def __init__(self, diffusion: GaussianDiffusion, steps: int | None = None, clip_x0: bool = True,
                 spacing: str | None = None) -> None:
        self.diffusion = diffusion
        self.num_train_timesteps = diffusion.num_timesteps
        self.spacing = self.default_spacing if spacing is None else spacing
        if self.spacing not in SPACINGS:
            raise InputError(f"unknown timestep spacing '{self.spacing}' (valid: {', '.join(SPACINGS)})")
        # Latents/images live in [-1, 1]; clipping the x0 estimate (as the authors do) keeps samples in range.
        self.clip_x0 = clip_x0
        self.set_timesteps(self.default_steps if steps is None else steps)

    @property
    def default_steps(self) -> int:
        """Steps used when none are given: the library's one table (options.DEFAULT_STEPS), at most T."""
        return default_steps(self.name, self.num_train_timesteps)

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(self, steps: int) -> None:
        """Choose the number of denoising steps (model evaluations) for the next run.

        Sets ``timesteps`` (descending original timesteps, 0 .. T-1) and clears multistep state.

        Raises:
            InputError: steps not an integer (booleans included) or outside 1 .. T.
        """
        try:
            if isinstance(steps, bool):
                raise TypeError
            n = operator.index(steps)
        except TypeError:
            raise InputError(f"steps must be an integer, got {steps!r}") from None
        if n < 1 or n > self.num_train_timesteps:
            raise InputError(f"steps must be between 1 and {self.num_train_timesteps} for the '{self.name}' "
                             f"sampler, got {n}")
        self.num_inference_steps = n
        self.timesteps = self._make_timesteps(n)
        self._index = {int(v): i for i, v in enumerate(self.timesteps.tolist())}
        self.reset()

    def _make_timesteps(self, steps: int) -> torch.Tensor:
        return spaced_timesteps(self.num_train_timesteps, steps, self.spacing)

    def reset(self) -> None:
        """Forget multistep state (called by `set_timesteps` and at the first timestep of a run)."""

    def index_for(self, t: int | torch.Tensor) -> int:
        """Position of timestep `t` in `self.timesteps` (InputError if it is not one of them)."""
        if isinstance(t, torch.Tensor):
            flat = t.reshape(-1)
            if flat.numel() == 0 or bool((flat != flat[0]).any()):
                raise InputError("a sampler step takes one timestep for the whole batch")
            t = int(flat[0].item())
        i = self._index.get(int(t))
        if i is None:
            raise InputError(f"timestep {int(t)} is not one of this sampler's timesteps "
                             f"(call set_timesteps and iterate over .timesteps)")
        return i

    def prev_timestep(self, index: int) -> int:
        """The timestep after step `index`; -1 stands for the clean data (alpha_bar = 1)."""
        return int(self.timesteps[index + 1]) if index + 1 < self.num_inference_steps else -1

    # ------------------------------------------------------------------ sampling
    def init_noise(self, shape: Sequence[int], generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Starting sample x_T ~ N(0, I), drawn from `generator` (on its device, then moved)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return _randn(shape, generator, dev, dtype)

    @staticmethod
    def _check_shape(model_output: torch.Tensor, x: torch.Tensor) -> None:
        if model_output.shape != x.shape:
            raise InputError(f"model output shape {tuple(model_output.shape)} does not match the sample "
                             f"shape {tuple(x.shape)}")

    def _pred_x0(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(model_output, x)
        x0 = self.diffusion.predict_x0_from_eps(x, t, model_output)
        return x0.clamp(-1.0, 1.0) if self.clip_x0 else x0

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerStepOutput:
        """One denoising step from x_t given the model's noise prediction at t.

        Args:
            model_output: the model's noise prediction eps at ``t``, same shape as ``x``.
            t: the current timestep, one of ``self.timesteps`` (an int, or a tensor holding one value for the
                whole batch).
            x: the current sample x_t, e.g. latents (B, C, D, H, W).
            generator: source of the step's noise (on its own device); unused by deterministic steps.

        Returns:
            ``prev_sample`` (x at the next kept timestep; the clean estimate after the last one) and ``pred_x0``
            (clipped to [-1, 1] when ``clip_x0``).

        Raises:
            InputError: ``t`` is not one of ``self.timesteps`` or differs across the batch, or the shapes differ.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_inference_steps}, T={self.num_train_timesteps})"
