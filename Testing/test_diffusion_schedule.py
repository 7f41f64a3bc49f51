"""The diffusion schedule against the authors' fixture, plus forward process, respacing and training loss."""
from __future__ import annotations

import pytest
import torch

from MedDiffusionLib.diffusion import BUFFER_NAMES, GaussianDiffusion
from MedDiffusionLib.errors import InputError


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion()


@pytest.fixture(scope="module")
def reference(reference_dir) -> dict:
    return torch.load(reference_dir / "fixtures" / "diffusion_cosine.pt", weights_only=True)


def test_fixture_buffers_reproduced(diffusion, reference):
    assert set(reference["buffers"]) == set(BUFFER_NAMES)
    for name, expected in reference["buffers"].items():
        ours = getattr(diffusion, name)
        assert ours.dtype == torch.float32 and ours.shape == (1000,), name
        # float64 math stored as float32 reproduces the authors' buffers to the last bit or so.
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9, msg=name)


def test_fixture_worked_example(diffusion, reference):
    ref = reference["tensors"]
    x0, noise, t, eps = ref["x0"], ref["noise"], ref["t"], ref["eps_pred"]
    xt = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(xt, ref["xt"], rtol=1e-6, atol=1e-6)
    mean, var, log_var, x0_hat = diffusion.p_mean_variance(eps, ref["xt"], t, clip=True)
    torch.testing.assert_close(x0_hat, ref["x0_pred_clipped"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, ref["posterior_mean"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_var, ref["posterior_log_variance"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, log_var.exp(), rtol=1e-5, atol=1e-12)
    # The same through q_posterior directly, from the clipped x0.
    mean2, _, log_var2 = diffusion.q_posterior(ref["x0_pred_clipped"], ref["xt"], t)
    torch.testing.assert_close(mean2, ref["posterior_mean"], rtol=1e-6, atol=1e-6)
    assert log_var2.shape == (2, 1, 1, 1, 1)


def test_eps_x0_round_trip_and_float64(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 998])
    xt = diffusion.q_sample(x0, t, eps)
    assert xt.dtype == torch.float64
    torch.testing.assert_close(diffusion.predict_x0_from_eps(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(xt, t, x0), eps, rtol=0, atol=1e-8)
    f64 = diffusion.buffers(torch.float64)
    for name in BUFFER_NAMES:
        torch.testing.assert_close(f64[name].float(), getattr(diffusion, name), rtol=0, atol=0)


def test_extract_broadcast_int_and_dtype(diffusion):
    x = torch.zeros(2, 3, 4, dtype=torch.float16)
    out = diffusion.extract("sqrt_alphas_cumprod", torch.tensor([5, 7]), x)
    assert out.shape == (2, 1, 1) and out.dtype == torch.float16
    one = diffusion.extract("betas", 10, torch.zeros(4, 2, dtype=torch.float32))
    assert one.shape == (1, 1) and one.item() == diffusion.betas[10].item()
    with pytest.raises(InputError):
        diffusion.extract("betas", 1000, x)
    with pytest.raises(InputError):
        diffusion.extract("betas", torch.tensor([-1]), x)


def test_schedule_options_and_errors():
    assert GaussianDiffusion(timesteps=50).num_timesteps == 50 == GaussianDiffusion(timesteps=50).timesteps
    lin = GaussianDiffusion(timesteps=100, schedule="linear")
    assert bool((lin.betas[1:] > lin.betas[:-1]).all())
    cos = GaussianDiffusion(timesteps=100)
    assert float(cos.betas.max()) <= 0.9999 + 1e-7  # clipped
    assert bool((cos.alphas_cumprod[1:] < cos.alphas_cumprod[:-1]).all())
    with pytest.raises(InputError, match="schedule"):
        GaussianDiffusion(schedule="sigmoid")
    with pytest.raises(InputError):
        GaussianDiffusion(timesteps=0)


def test_respace_keeps_marginals(diffusion):
    keep = [0, 10, 250, 600, 999]
    sub = diffusion.respace(keep)
    assert sub.num_timesteps == 5
    f64 = diffusion.buffers(torch.float64)["alphas_cumprod"]
    torch.testing.assert_close(sub.buffers(torch.float64)["alphas_cumprod"], f64[keep], rtol=1e-7, atol=0)
    assert diffusion.respace(range(1000)) is diffusion  # identity respacing keeps the exact buffers
    # The general formula with every timestep kept gives back the original schedule.
    ac = f64
    full = GaussianDiffusion.from_betas(1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]]))
    for name in BUFFER_NAMES:
        torch.testing.assert_close(getattr(full, name), getattr(diffusion, name), rtol=1e-6, atol=1e-9, msg=name)
    with pytest.raises(InputError):
        diffusion.respace([5, 1000])


def test_training_loss_l1_l2_toy(diffusion):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 1, 4, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    seen: dict = {}

    def zero_model(xt: torch.Tensor, tt: torch.Tensor, **kw) -> torch.Tensor:
        seen.update(t=tt, kw=kw, xt=xt)
        return torch.zeros_like(xt)

    l1 = diffusion.training_loss(zero_model, x0, t, noise, loss="l1", model_kwargs={"y": 3})
    torch.testing.assert_close(l1, noise.abs().mean())
    assert l1.dim() == 0 and seen["kw"] == {"y": 3} and torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["xt"], diffusion.q_sample(x0, t, noise))
    l2 = diffusion.training_loss(zero_model, x0, t, noise, loss="l2")
    torch.testing.assert_close(l2, noise.square().mean())

    def oracle(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return diffusion.predict_eps_from_x0(xt, tt, x0)

    assert diffusion.training_loss(oracle, x0, t, noise, loss="l1").item() < 1e-3
    # Gradients reach the model's parameters.
    w = torch.zeros(1, requires_grad=True)
    diffusion.training_loss(lambda xt, tt: xt * w, x0, t, noise).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(InputError, match="loss"):
        diffusion.training_loss(zero_model, x0, t, noise, loss="huber")


def test_training_loss_random_draws_use_generator(diffusion):
    x0 = torch.zeros(6, 1, 2, 2, 2)
    record: list = []

    def model(xt: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        record.append((xt.clone(), tt.clone()))
        return torch.zeros_like(xt)

    state = torch.get_rng_state()
    a = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(7))
    b = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(a, b) and torch.equal(record[0][0], record[1][0]) and torch.equal(record[0][1], record[1][1])
    t = diffusion.sample_timesteps(10000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 999
    assert abs(t.float().mean().item() - 499.5) < 15
