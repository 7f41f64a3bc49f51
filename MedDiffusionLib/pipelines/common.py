"""Pieces shared by the generation and reconstruction pipelines: devices, seeds, latent scaling, denoising loop."""
from __future__ import annotations

import contextlib
import secrets
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..diffusion import GaussianDiffusion, make_sampler
from ..errors import InputError
from ..options import GenerateOptions
from ..checkpoints.bundle import ModelBundle
from ..progress import CancelFlag, ProgressCallback, ProgressTracker


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a clear error, not a deep torch one.

    Args:
        device: 'auto' (or None), 'cpu', 'cuda', 'cuda:N', or a torch.device.

    Raises:
        InputError: CUDA asked for but not available, or a name torch does not know.
    """
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device '{device}': use auto, cpu or cuda") from exc


def resolve_seed(seed: Optional[int]) -> int:
    """The given seed (checked against the options' seed range), else a random one to report."""
    seed = GenerateOptions.check_field("seed", seed)
    return secrets.randbelow(2**31 - 1) if seed is None else int(seed)


def normalize_latent(z: torch.Tensor, latent_range: tuple[float, float]) -> torch.Tensor:
    """Continuous encoder output -> [-1, 1] using the codebook's global min and max (the authors' scaling)."""
    lo, hi = latent_range
    return (z - lo) / (hi - lo) * 2.0 - 1.0


def denormalize_latent(z: torch.Tensor, latent_range: tuple[float, float]) -> torch.Tensor:
    """Latents in [-1, 1] back to the codebook's range ``latent_range`` (inverse of normalize_latent)."""
    lo, hi = latent_range
    return (z + 1.0) / 2.0 * (hi - lo) + lo


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs (the networks are written for it); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_latents(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], item_shape: tuple[int, ...],
                   seeds: Sequence[int], sampler_name: str, steps: int, device: torch.device,
                   diffusion: Optional[GaussianDiffusion] = None, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelFlag] = None,
                   guide: Optional[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = None) -> torch.Tensor:
    """Sample len(seeds) latents of `item_shape` (C, D, H, W) from pure noise, with one denoiser call per step for
    all of them: `denoise(x, t_batch) -> eps`. The one sampling loop of the library (generation, reconstruction,
    datasets). `guide(prev, pred_x0, t)` may project the batch after each step (data consistency).

    Each item owns its generator (initial noise and any sampler noise) and its sampler state, and every sampler
    step runs on that item's slice alone, so an item's random numbers never depend on its batch mates; the same
    seed on the same device gives the same latent.

    Args:
        denoise: ``denoise(x, t_batch) -> eps``, x of shape (B, C, D, H, W), t_batch (B,) long.
        item_shape: one latent's (C, D, H, W).
        seeds: one per item, each in [0, 2^63).
        sampler_name: see `make_sampler`.
        steps: 1 .. the schedule's T.
        device: where the noise is drawn and the denoiser runs (bf16 autocast on CUDA).
        diffusion: the model's schedule; None: the default cosine schedule with T = 1000.
        progress: called with ``"sampling"`` `ProgressInfo` updates, one per step.
        cancel: checked after each step.
        guide: ``guide(prev, pred_x0, t) -> prev`` applied to the whole batch after each step.

    Returns:
        The final latents (B, C, D, H, W), float32, B = len(seeds).

    Raises:
        InputError: an unknown sampler, or steps outside 1 .. T.
        Cancelled: when ``cancel`` was set.
    """
    diffusion = diffusion or GaussianDiffusion()
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    samplers = [make_sampler(sampler_name, diffusion) for _ in seeds]
    for s in samplers:
        s.set_timesteps(steps)
    x = torch.cat([torch.randn((1,) + tuple(item_shape), generator=g, device=device, dtype=torch.float32)
                   for g in generators])
    timesteps = samplers[0].timesteps
    tracker = ProgressTracker(len(timesteps), progress, cancel, "sampling")
    tracker.begin()
    for t in timesteps:
        t_int = int(t)
        t_batch = torch.full((len(seeds),), t_int, device=device, dtype=torch.long)
        with autocast_for(device):
            eps = denoise(x, t_batch).float()
        outs = [s.step(eps[i:i + 1], t_int, x[i:i + 1], generator=g) for i, (s, g) in enumerate(zip(samplers, generators))]
        x = torch.cat([o.prev_sample for o in outs])
        if guide is not None:
            x = guide(x, torch.cat([o.pred_x0 for o in outs]), t_int)
        tracker.advance()
    return x


class BundlePipeline:
    """What every pipeline holds: the bundle's networks on one device, the diffusion schedule, the decode budget.

    Args:
        bundle: from `checkpoints.load_bundle`; its networks are moved to ``device``.
        device: see `resolve_device` ('auto': CUDA when present).
        decode_budget_gb: activation budget of the tiled decode in GiB; None: `decode.default_budget_gb`.

    Raises:
        InputError: a device that is unknown or unavailable.
    """

    def __init__(self, bundle: ModelBundle, device: str | torch.device | None = "auto",
                 decode_budget_gb: Optional[float] = None) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.autoencoder = bundle.autoencoder.to(self.device).eval()
        self.denoiser = bundle.denoiser.to(self.device).eval()
        # The bundle's schedule (model.yaml `diffusion:`), not an assumed cosine one.
        self.diffusion = GaussianDiffusion(timesteps=bundle.timesteps, schedule=bundle.schedule)
        self.decode_budget_gb = decode_budget_gb  # None: decode.default_budget_gb for the device


@contextlib.contextmanager
def inference_mode() -> Iterator[None]:
    """torch.inference_mode as a plain context manager (no autograd bookkeeping while sampling and decoding)."""
    with torch.inference_mode():
        yield
