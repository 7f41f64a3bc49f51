"""Gaussian diffusion (DDPM) schedule: the noise schedule buffers, forward noising, posterior and training loss.

The buffers reproduce the authors' `GaussianDiffusion`: everything is computed in float64 and stored as
float32 (the authors' `register_buffer(..., val.to(torch.float32))`). A float64 copy is kept as well, used
when the caller works in float64 and when respacing the schedule, where float32 round-off would accumulate.
The object is a plain Python object (not an `nn.Module`) so it never ends up inside a model's state dict.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

BUFFER_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule in float64: alpha_bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2)."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = 1.0 - f[1:] / f[:-1]
    # The last betas approach 1 (alpha_bar -> 0); clipping keeps 1/sqrt(alpha_bar) finite.
    return betas.clamp(0.0, max_beta)


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. linear schedule, scaled so that any T spans the same noise range as T=1000."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def _as_timestep_tensor(t: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor([int(t)], dtype=torch.long, device=device)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn from `generator` only (never the global RNG when one is given).

    The draw happens on the generator's own device and is then moved, so a CPU generator also works for
    CUDA tensors (and gives the same numbers on every device)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class GaussianDiffusion:
    """Discrete-time DDPM with epsilon prediction (T steps, index 0 = least noisy).

    Per-sample buffers are indexed with `t` (a LongTensor of shape (B,) or an int) and broadcast to the
    shape (B, 1, ..., 1) of the tensor they multiply, on its device and in its dtype.

    Args:
        timesteps: T, >= 1 (ignored with ``betas``).
        schedule: 'cosine' (the authors') or 'linear' (ignored with ``betas``).
        s: the cosine schedule's offset.
        betas: an explicit schedule: a vector of T values in (0, 1].

    Raises:
        InputError: T < 1, an unknown schedule, or betas that are empty or outside (0, 1].
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine", s: float = 0.008,
                 betas: torch.Tensor | None = None) -> None:
        if betas is None:
            if int(timesteps) < 1:
                raise InputError(f"timesteps must be >= 1, got {timesteps}")
            if schedule == "cosine":
                betas = cosine_betas(int(timesteps), s)
            elif schedule == "linear":
                betas = linear_betas(int(timesteps))
            else:
                raise InputError(f"unknown noise schedule '{schedule}' (valid: cosine, linear)")
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        if betas.numel() < 1 or bool((betas <= 0).any()) or bool((betas > 1).any()):
            raise InputError("betas must be a non-empty vector with values in (0, 1]")
        self.schedule = schedule
        self.num_timesteps = int(betas.numel())
        self._f64 = self._compute_buffers(betas)
        for name, value in self._f64.items():
            setattr(self, name, value.to(torch.float32))
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def timesteps(self) -> int:
        """T, the number of training timesteps (same as `num_timesteps`; the constructor's name)."""
        return self.num_timesteps

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "GaussianDiffusion":
        """A diffusion with explicit betas (used for respaced schedules)."""
        return cls(betas=betas, schedule="custom")

    @staticmethod
    def _compute_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            # posterior_variance[0] is 0: clamp before the log like the authors (log(1e-20) = -46.05).
            "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }

    # ------------------------------------------------------------------ buffer access
    def buffers(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All schedule buffers (float32 like the authors', or float64)."""
        if dtype == torch.float64:
            return {k: v.clone() for k, v in self._f64.items()}
        return {k: getattr(self, k).to(dtype) for k in BUFFER_NAMES}

    def _buffer(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        buf = self._cache.get(key)
        if buf is None:
            # float32/16 math uses the float32 buffers (bit-compatible with the authors); float64 keeps f64.
            src = self._f64[name] if dtype == torch.float64 else getattr(self, name)
            buf = src.to(device=device, dtype=dtype)
            self._cache[key] = buf
        return buf

    def extract(self, name: str, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Buffer `name` at timesteps `t`, shaped (B, 1, ..., 1) to broadcast against `x`."""
        tt = _as_timestep_tensor(t, x.device)
        if bool(((tt < 0) | (tt >= self.num_timesteps)).any()):
            raise InputError(f"timestep out of range [0, {self.num_timesteps - 1}]: {tt.tolist()}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        vals = self._buffer(name, x.device, dtype)[tt]
        return vals.reshape((tt.shape[0],) + (1,) * (x.dim() - 1))

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a float64 Python number; t = -1 means the clean data (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self._f64["alphas_cumprod"][t])

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        return (self.extract("sqrt_alphas_cumprod", t, x0) * x0
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def predict_x0_from_eps(self, xt: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), from the predicted noise."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt
                - self.extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps)

    def predict_eps_from_x0(self, xt: torch.Tensor, t: int | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise eps that takes x0 to x_t at timestep ``t``."""
        return ((self.extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, xt))

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0); the latter two are (B,1,..,1)."""
        mean = (self.extract("posterior_mean_coef1", t, xt) * x0
                + self.extract("posterior_mean_coef2", t, xt) * xt)
        var = self.extract("posterior_variance", t, xt)
        log_var = self.extract("posterior_log_variance_clipped", t, xt)
        return mean, var, log_var

    def p_mean_variance(self, eps: torch.Tensor, xt: torch.Tensor, t: int | torch.Tensor, clip: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reverse-step Gaussian from a predicted eps: (mean, variance, log_variance, x0 prediction)."""
        x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip:
            # Latents and images live in [-1, 1]; the authors clip the x0 estimate while sampling.
            x0 = x0.clamp(-1.0, 1.0)
        mean, var, log_var = self.q_posterior(x0, xt, t)
        return mean, var, log_var, x0

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform timesteps in [0, T) as a LongTensor (B,), drawn from `generator`."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (int(batch),), generator=generator, device=gen_device)
        return t.to(device)

    def training_loss(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None, loss: str = "l1",
                      generator: torch.Generator | None = None,
                      model_kwargs: dict | None = None) -> torch.Tensor:
        """Epsilon-prediction loss: mean |eps - model_fn(x_t, t, **model_kwargs)| (l1, the authors') or squared (l2)."""
        if loss not in ("l1", "l2"):
            raise InputError(f"unknown loss '{loss}' (valid: l1, l2)")
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        t = _as_timestep_tensor(t, x0.device)
        if t.shape[0] == 1 and x0.shape[0] != 1:
            t = t.expand(x0.shape[0])
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        pred = model_fn(xt, t, **(model_kwargs or {}))
        if pred.shape != noise.shape:
            raise InputError(f"model output shape {tuple(pred.shape)} != input shape {tuple(noise.shape)}")
        if loss == "l1":
            return F.l1_loss(pred, noise)
        return F.mse_loss(pred, noise)

    # ------------------------------------------------------------------ respacing
    def respace(self, use_timesteps: Sequence[int] | torch.Tensor) -> "GaussianDiffusion":
        """The DDPM restricted to a subset of timesteps (improved-DDPM respacing).

        Index k of the result corresponds to original timestep sorted(use_timesteps)[k]; its betas are
        recomputed from alpha_bar so the marginals q(x_t | x0) of the kept timesteps are unchanged."""
        steps = sorted({int(v) for v in torch.as_tensor(use_timesteps).reshape(-1).tolist()})
        if not steps or steps[0] < 0 or steps[-1] >= self.num_timesteps:
            raise InputError(f"respacing timesteps must lie in [0, {self.num_timesteps - 1}]")
        if len(steps) == self.num_timesteps:
            return self  # identity respacing: keep the exact buffers
        ac = self._f64["alphas_cumprod"][steps]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return GaussianDiffusion.from_betas(1.0 - ac / prev)
