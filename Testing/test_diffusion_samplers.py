"""Samplers: exactness against the authors' DDPM step, oracle recovery, clipping, determinism, statistics."""
from __future__ import annotations

import math

import pytest
import torch

from MedDiffusionLib.diffusion import (DDIMSampler, DDPMSampler, DPMSolverSampler, GaussianDiffusion, make_sampler,
                                       spaced_timesteps)
from MedDiffusionLib.errors import InputError
from MedDiffusionLib.options import DEFAULT_STEPS
from sampling_helpers import sample_loop


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion()


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def oracle_for(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A perfect model for a single known clean sample: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    ac = diffusion.buffers(torch.float64)["alphas_cumprod"]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(ac[t], x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return model


def gaussian_eps(diffusion: GaussianDiffusion, mu: float, std: float):
    """The optimal eps predictor E[eps | x_t] for data x0 ~ N(mu, std^2)."""
    ac = diffusion.buffers(torch.float64)["alphas_cumprod"]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(ac[t], x)
        return (1 - a).sqrt() / (a * std * std + 1 - a) * (x - a.sqrt() * mu)

    return model


# ---------------------------------------------------------------- construction and errors
@pytest.mark.parametrize("name,cls", [("ddpm", DDPMSampler), ("ddim", DDIMSampler), ("dpmpp", DPMSolverSampler),
                                      ("DPM++", DPMSolverSampler)])
def test_make_sampler_and_timesteps(diffusion, name, cls):
    s = make_sampler(name, diffusion, steps=10)
    assert isinstance(s, cls)
    ts = s.timesteps
    assert ts.dtype == torch.long and ts.shape == (10,)
    assert int(ts[0]) == 999 and int(ts[-1]) == 0 and bool((ts[:-1] > ts[1:]).all())
    s.set_timesteps(3)
    assert s.timesteps.shape == (3,) and s.num_inference_steps == 3
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]


def test_default_steps(diffusion):
    """Without steps a sampler takes the library's one table (options.DEFAULT_STEPS), capped at T."""
    assert make_sampler("ddpm", diffusion).num_inference_steps == 1000  # the authors' sampler: every timestep
    assert make_sampler("ddim", diffusion).num_inference_steps == DEFAULT_STEPS["ddim"] == 100
    assert make_sampler("dpmpp", diffusion).num_inference_steps == DEFAULT_STEPS["dpmpp"] == 50
    assert make_sampler("dpmpp", GaussianDiffusion(timesteps=20)).num_inference_steps == 20


@pytest.mark.parametrize("spacing", ["linear", "quadratic"])
def test_spacing_grids(spacing):
    for n in (2, 3, 7, 10, 33, 100, 250, 999, 1000):
        ts = spaced_timesteps(1000, n, spacing)
        assert ts.shape == (n,) and len(set(ts.tolist())) == n
        assert int(ts[0]) == 999 and int(ts[-1]) == 0 and bool((ts[:-1] > ts[1:]).all())
    assert torch.equal(spaced_timesteps(1000, 1000, spacing), torch.arange(999, -1, -1))


def test_errors(diffusion):
    with pytest.raises(InputError, match="unknown sampler"):
        make_sampler("euler", diffusion)
    for bad in (0, -3, 1001):
        with pytest.raises(InputError, match="between 1 and 1000"):
            make_sampler("ddim", diffusion, steps=bad)
    for bad in (2.5, True, "10"):
        with pytest.raises(InputError, match="integer"):
            make_sampler("ddpm", diffusion, steps=bad)
    with pytest.raises(InputError, match="eta"):
        make_sampler("ddim", diffusion, steps=5, eta=-0.1)
    with pytest.raises(InputError, match="spacing"):
        make_sampler("dpmpp", diffusion, steps=5, spacing="karras")
    s = make_sampler("ddim", diffusion, steps=5)
    x = torch.zeros(2, 1, 2, 2, 2)
    with pytest.raises(InputError, match="not one of"):
        s.step(torch.zeros_like(x), 500, x)
    with pytest.raises(InputError, match="shape"):
        s.step(torch.zeros(2, 1, 2, 2, 3), 999, x)
    with pytest.raises(InputError, match="one timestep"):
        s.step(torch.zeros_like(x), torch.tensor([999, 0]), x)
    # A batch tensor of equal timesteps is accepted.
    s.step(torch.zeros_like(x), torch.tensor([999, 999]), x)


# ---------------------------------------------------------------- DDPM
def test_ddpm_step_matches_posterior_formula(diffusion):
    b = diffusion.buffers()  # float32, as the authors store them
    s = DDPMSampler(diffusion)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    eps = torch.randn(x.shape, generator=g)
    for t in (999, 500, 1, 0):
        out = s.step(eps, t, x, torch.Generator().manual_seed(11))
        tb = torch.full((2,), t)
        x0 = (_bcast(b["sqrt_recip_alphas_cumprod"][tb], x) * x
              - _bcast(b["sqrt_recipm1_alphas_cumprod"][tb], x) * eps).clamp(-1, 1)
        mean = _bcast(b["posterior_mean_coef1"][tb], x) * x0 + _bcast(b["posterior_mean_coef2"][tb], x) * x
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
        std = (0.5 * _bcast(b["posterior_log_variance_clipped"][tb], x)).exp()
        expected = mean + std * noise if t > 0 else mean
        torch.testing.assert_close(out.pred_x0, x0, rtol=0, atol=0)
        torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-7)


def test_ddpm_full_chain_is_authors_loop(diffusion):
    """steps == T runs exactly the authors' p_sample loop (same noise stream)."""
    model = gaussian_eps(diffusion, 0.3, 0.1)
    shape = (3, 1, 2, 2, 2)
    s = make_sampler("ddpm", diffusion, steps=1000)
    assert s.process is diffusion
    gen = torch.Generator().manual_seed(5)
    ours = sample_loop(s, model, s.init_noise(shape, gen), gen)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen)
    for t in range(999, -1, -1):
        tb = torch.full((shape[0],), t)
        mean, _, log_var, _ = diffusion.p_mean_variance(model(x, tb), x, tb, clip=True)
        x = mean + (0.5 * log_var).exp() * torch.randn(shape, generator=gen) if t > 0 else mean
    torch.testing.assert_close(ours, x, rtol=0, atol=0)


def test_respaced_ddpm(diffusion):
    s = DDPMSampler(diffusion, steps=10)
    kept = s.timesteps.flip(0)
    ac = diffusion.buffers(torch.float64)["alphas_cumprod"]
    torch.testing.assert_close(s.process.buffers(torch.float64)["alphas_cumprod"], ac[kept], rtol=1e-7, atol=0)
    # Each step uses the posterior between consecutive kept timesteps (not T's one-step posterior).
    for k in range(1, 10):
        a, a_prev = ac[kept[k]], ac[kept[k - 1]]
        expected = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        torch.testing.assert_close(s.process.posterior_variance[k].double(), expected, rtol=1e-5, atol=0)
    assert float(s.process.posterior_variance[5]) > 10 * float(diffusion.posterior_variance[int(kept[5])])
    x0 = torch.rand(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    gen = torch.Generator().manual_seed(0)
    out = sample_loop(s, oracle_for(diffusion, x0), s.init_noise(x0.shape, gen), gen)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- DDIM
@pytest.mark.parametrize("spacing", ["quadratic", "linear"])
def test_ddim_oracle_recovers_x0(diffusion, spacing):
    x0 = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 1.8 - 0.9
    s = DDIMSampler(diffusion, steps=10, spacing=spacing)
    gen = torch.Generator().manual_seed(1)
    preds: list = []
    out = sample_loop(s, oracle_for(diffusion, x0), s.init_noise(x0.shape, gen), gen,
                      callback=lambda i, t, o: preds.append(o.pred_x0))
    assert len(preds) == 10
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(preds[5], x0, rtol=0, atol=1e-4)


def test_ddim_clipping_recomputes_eps(diffusion):
    """An oracle whose implied x0 (+-3) is out of range: with the recomputed noise the trajectory is
    exactly the noised clipped data (+-1) along one fixed noise, and the output is in range."""
    target = torch.full((2, 1, 4, 4, 4), 3.0)
    target[:, :, :2] = -3.0
    clipped = target.clamp(-1, 1)
    s = DDIMSampler(diffusion, steps=10)
    gen = torch.Generator().manual_seed(3)
    x = s.init_noise(target.shape, gen)
    model = oracle_for(diffusion, target)
    noise = None
    for i, t in enumerate(s.timesteps.tolist()):
        out = s.step(model(x, torch.full((2,), t)), t, x)
        assert float(out.pred_x0.abs().max()) <= 1.0
        torch.testing.assert_close(out.pred_x0, clipped)
        a = diffusion.alpha_bar(t)
        eps_clipped = (x - math.sqrt(a) * clipped) / math.sqrt(1 - a)
        noise = eps_clipped if noise is None else noise
        torch.testing.assert_close(eps_clipped, noise, rtol=0, atol=1e-4)  # one noise throughout
        t_next = s.prev_timestep(i)
        a_next = diffusion.alpha_bar(t_next)
        expected = math.sqrt(a_next) * clipped + math.sqrt(1 - a_next) * noise
        torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-4)
        x = out.prev_sample
    assert float(x.abs().max()) <= 1.0
    torch.testing.assert_close(x, clipped)


def test_ddim_eta_uses_generator(diffusion):
    model = gaussian_eps(diffusion, 0.0, 0.5)
    s = DDIMSampler(diffusion, steps=8, eta=1.0)
    runs = []
    for seed in (0, 0, 1):
        gen = torch.Generator().manual_seed(seed)
        runs.append(sample_loop(s, model, s.init_noise((2, 1, 3, 3, 3), gen), gen))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # eta = 0 is deterministic given x_T, whatever the generator.
    s0 = DDIMSampler(diffusion, steps=8)
    xT = torch.randn(2, 1, 3, 3, 3)
    a = sample_loop(s0, model, xT, torch.Generator().manual_seed(0))
    b = sample_loop(s0, model, xT, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- DPM-Solver++
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_oracle_recovers_x0(diffusion, steps):
    x0 = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(8)) * 1.8 - 0.9
    s = DPMSolverSampler(diffusion, steps=steps)
    gen = torch.Generator().manual_seed(2)
    out = sample_loop(s, oracle_for(diffusion, x0), s.init_noise(x0.shape, gen), gen)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_dpmpp_first_order_equals_ddim(diffusion):
    """The first step of DPM-Solver++ is DDIM (eta 0); with 2 steps the whole run is first order."""
    model = gaussian_eps(diffusion, 0.3, 0.1)
    xT = torch.randn(4, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (2, 12):
        dpm, ddim = DPMSolverSampler(diffusion, steps=steps), DDIMSampler(diffusion, steps=steps)
        t = int(dpm.timesteps[0])
        eps = model(xT, torch.full((4,), t))
        torch.testing.assert_close(dpm.step(eps, t, xT).prev_sample, ddim.step(eps, t, xT).prev_sample,
                                   rtol=1e-10, atol=1e-10)
    dpm, ddim = DPMSolverSampler(diffusion, steps=2), DDIMSampler(diffusion, steps=2)
    torch.testing.assert_close(sample_loop(dpm, model, xT), sample_loop(ddim, model, xT), rtol=1e-10, atol=1e-10)


def test_dpmpp_second_order_step_formula(diffusion):
    model = gaussian_eps(diffusion, 0.3, 0.1)
    s = DPMSolverSampler(diffusion, steps=20)
    x = torch.randn(3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = s.timesteps.tolist()
    first = s.step(model(x, torch.full((3,), ts[0])), ts[0], x)
    x1 = first.prev_sample
    second = s.step(model(x1, torch.full((3,), ts[1])), ts[1], x1)

    def lam(t: int) -> float:
        a = diffusion.alpha_bar(t)
        return 0.5 * math.log(a / (1 - a))

    h, h_prev = lam(ts[2]) - lam(ts[1]), lam(ts[1]) - lam(ts[0])
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * second.pred_x0 - 1 / (2 * r) * first.pred_x0
    a1, a2 = diffusion.alpha_bar(ts[1]), diffusion.alpha_bar(ts[2])
    expected = math.sqrt((1 - a2) / (1 - a1)) * x1 - math.sqrt(a2) * math.expm1(-h) * d
    torch.testing.assert_close(second.prev_sample, expected, rtol=1e-10, atol=1e-10)


def test_dpmpp_reuse_is_deterministic(diffusion):
    model = gaussian_eps(diffusion, 0.2, 0.3)
    s = DPMSolverSampler(diffusion, steps=6)
    xT = torch.randn(2, 1, 3, 3, 3)
    assert torch.equal(sample_loop(s, model, xT), sample_loop(s, model, xT))


# ---------------------------------------------------------------- determinism and statistics
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp"])
def test_same_seed_same_output_and_no_global_rng(diffusion, name):
    model = gaussian_eps(diffusion, 0.1, 0.4)
    kwargs = {"eta": 0.5} if name == "ddim" else {}
    s = make_sampler(name, diffusion, steps=12, **kwargs)
    state = torch.get_rng_state()
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(42)
        x = s.init_noise((2, 1, 3, 3, 3), gen, device="cpu", dtype=torch.float32)
        outs.append(sample_loop(s, model, x, gen))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(outs[0], outs[1]) and outs[0].dtype == torch.float32


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddim", 50), ("dpmpp", 20)])
def test_gaussian_toy_statistics(diffusion, name, steps):
    """Sampling N(0.3, 0.1^2) with its exact denoiser gives the right mean and std."""
    mu, std = 0.3, 0.1
    s = make_sampler(name, diffusion, steps=steps)
    gen = torch.Generator().manual_seed(0)
    y = sample_loop(s, gaussian_eps(diffusion, mu, std), s.init_noise((8000, 1), gen), gen)
    assert abs(y.mean().item() - mu) < 0.006
    assert abs(y.std().item() - std) < 0.008
