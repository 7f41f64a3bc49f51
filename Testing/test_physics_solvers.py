"""Model-free solvers on the measurement operators: adjoints, monotone descent, and that they beat FBP."""
from __future__ import annotations

import pytest
import torch

from MedDiffusionLib.physics.operators import make_operator
from MedDiffusionLib.physics.solvers import (Whitened, cg_regularised, divergence3, gradient3, operator_norm_sq,
                                             os_sart, tv_pdhg)


def disc_phantom(n: int = 48, depth: int = 3) -> torch.Tensor:
    """Piecewise-constant slices: a water disc with a bone-like and an air-like insert (physics units)."""
    yy, xx = torch.meshgrid(torch.arange(n) - n / 2, torch.arange(n) - n / 2, indexing="ij")
    u = torch.zeros(depth, n, n)
    u[:, yy ** 2 + xx ** 2 < (0.4 * n) ** 2] = 1.0
    u[:, (yy - 5) ** 2 + (xx + 6) ** 2 < 25] = 2.5
    u[:, (yy + 8) ** 2 + (xx - 4) ** 2 < 16] = 0.2
    return u


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b.conj()).real.sum()) if a.is_complex() else float((a * b).sum())


@pytest.mark.parametrize("task", ["sparse-ct", "mri"])
def test_whitened_operator_has_an_exact_adjoint(task):
    g = torch.Generator().manual_seed(0)
    op = make_operator(task, (20, 24), views=7, acceleration=3, seed=1)
    w = Whitened(op)
    u = torch.rand((2, 20, 24), generator=g, dtype=torch.float64)
    r = w.forward(torch.rand((2, 20, 24), generator=g, dtype=torch.float64))
    assert _dot(w.forward(u), r) == pytest.approx(_dot(u, w.adjoint(r)), rel=1e-6)


def test_gradient_and_divergence_are_negative_adjoints():
    g = torch.Generator().manual_seed(1)
    x, p = torch.rand((4, 9, 7), generator=g, dtype=torch.float64), torch.rand((3, 4, 9, 7), generator=g,
                                                                                dtype=torch.float64)
    assert _dot(gradient3(x, 0.3), p) == pytest.approx(-_dot(x, divergence3(p, 0.3)), rel=1e-10)


def test_cg_descends_and_the_prior_weight_pulls_towards_the_prior():
    u = disc_phantom()
    op = make_operator("sparse-ct", (48, 48), views=12)
    y = op.measure(u)
    zero = torch.zeros_like(u)
    residuals = [op.residual(cg_regularised(op, y, zero, 1e-4, n), y) for n in (0, 2, 8)]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 0.2 * residuals[0]
    prior = torch.full_like(u, 0.5)
    strong = cg_regularised(op, y, prior, 1e4, 8)
    assert torch.allclose(strong, prior, atol=1e-3)


def test_sart_and_tv_beat_fbp_on_sparse_views():
    u = disc_phantom()
    op = make_operator("sparse-ct", (48, 48), views=12)
    y = op.measure(u)
    err = {"fbp": (op.degrade(y) - u).norm(), "sart": (os_sart(op, y, 5) - u).norm(),
           "tv": (tv_pdhg(op, y, 3e-3, 80, x0=op.degrade(y).clamp_min(0)) - u).norm()}
    assert err["sart"] < 0.7 * err["fbp"] and err["tv"] < 0.5 * err["fbp"], err
    assert operator_norm_sq(op) == op.whitened_norm_sq  # computed once, then cached


def test_tv_beats_zero_filling_on_undersampled_k_space():
    u = disc_phantom()
    op = make_operator("mri", (48, 48), acceleration=4, seed=2)
    k = op.measure(u)
    zf = op.degrade(k)
    tv = tv_pdhg(op, k, 3e-3, 80, x0=zf.clamp_min(0))
    assert (tv - u).norm() < 0.6 * (zf - u).norm()
    assert op.residual(tv, k) < 0.1  # still consistent with the samples
