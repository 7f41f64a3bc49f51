"""Model-free reconstruction on the measurement operators of ``physics.operators``, on the scan's own grid.

  * ``cg_regularised``: conjugate gradients on (A^T A + lam I) x = A^T y + lam p, i.e. the minimiser of
    ||A x - y||^2 + lam ||x - p||^2 (p: a prior image, 0 for plain Tikhonov), one independent CG per slice (the
    operators act slice by slice, so the normal equations decouple and each slice keeps its own step sizes).
  * ``os_sart``: ordered-subsets SART for CT (one view per subset, views visited in a spread-out order), the
    classical model-free iterative method; each iteration is one pass over the views.
  * ``tv_pdhg``: min 1/2 ||A x - y||^2 / ||A||^2 + beta TV(x) + lam / 2 ||x - p||^2 subject to x >= 0, by the
    primal-dual hybrid gradient method (Chambolle & Pock 2011). TV is isotropic 3D with the through-plane
    difference weighted by in-plane / slice spacing (a gradient per millimetre). The data term is divided by
    ||A||^2 (estimated by power iteration) so that beta and lam mean the same for any grid size or view count.

Inputs are volumes (Z, H, W) in the operators' physics units (empty space 0); everything stays in torch on the
measurements' device, so the same code runs on CPU and GPU.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from .ct import ParallelBeamProjector
from .operators import AcceleratedMRI, Operator, SparseViewCT

__all__ = ["cg_regularised", "data_rhs", "os_sart", "tv_pdhg", "operator_norm_sq", "gradient3", "divergence3"]

_TINY = 1e-30
_PRIMAL_DUAL_RATIO = 10.0
StopCheck = Optional[Callable[[int], None]]  # called once per iteration (progress; may raise Cancelled)


def _slice_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-slice inner product over the last two dims (real part for complex tensors), kept for broadcasting."""
    prod = a * b.conj() if a.is_complex() else a * b
    return prod.real.sum(dim=(-2, -1), keepdim=True) if prod.is_complex() else prod.sum(dim=(-2, -1), keepdim=True)


class Whitened:
    """x -> R^(1/2) A x with its adjoint: the data term every solver here fits is ||R^(1/2) (A x - y)||^2."""

    def __init__(self, op: Operator) -> None:
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.weight_sqrt(self.op.forward(x))

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        return self.op.adjoint(self.op.weight_sqrt(r))

    def data(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.weight_sqrt(y)


def operator_norm_sq(op: Operator, device: torch.device | str = "cpu", iters: int = 20) -> float:
    """||R^(1/2) A||^2 (largest eigenvalue of the whitened normal operator) of one slice by power iteration;
    cached on a CT operator (MRI's is known: its normal operator is a projection).

    Args:
        op: the measurement operator.
        device: where the power iteration runs.
        iters: power iterations.

    Returns:
        The squared norm; 1 for an MRI mask with any sample, 0 for an empty one.
    """
    if isinstance(op, AcceleratedMRI):
        return 1.0 if float(op.mask.max()) > 0 else 0.0  # orthonormal FFT times a 0/1 mask
    if op.whitened_norm_sq is not None:
        return op.whitened_norm_sq
    white = Whitened(op)
    v = torch.rand((1, *op.slice_shape), generator=torch.Generator().manual_seed(0)).to(device)
    value = 0.0
    for _ in range(iters):
        w = white.adjoint(white.forward(v))
        value = float(w.norm() / v.norm().clamp_min(_TINY))
        v = w / w.norm().clamp_min(_TINY)
    op.whitened_norm_sq = value
    return value


def slice_shape(op: Operator) -> tuple[int, int]:
    ny, nx = op.slice_shape if isinstance(op, SparseViewCT) else op.mask.shape
    return int(ny), int(nx)


def data_rhs(op: Operator, y: torch.Tensor) -> torch.Tensor:
    """A^T R y, the measurements' part of the normal equations: fixed for a problem, so callers that solve it
    several times (the guidance during sampling) compute it once and pass it to ``cg_regularised``."""
    white = Whitened(op)
    return white.adjoint(white.data(y))


@torch.no_grad()
def cg_regularised(op: Operator, y: torch.Tensor, prior: torch.Tensor, lam: float, iters: int,
                   x0: Optional[torch.Tensor] = None, step: StopCheck = None,
                   rhs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Minimise ||R^(1/2) (A x - y)||^2 / ||R^(1/2) A||^2 + lam ||x - prior||^2 per slice with ``iters`` CG
    iterations from ``x0`` (default: the prior). ``lam`` is relative to the normalised data term; ``rhs`` is
    ``data_rhs(op, y)`` when the caller has it already.

    Updates are in place: on a 512 x 512 x 64 volume every temporary is 64 MB, and fresh allocations cost
    page faults (system time) on top of the arithmetic.

    Args:
        op: the measurement operator.
        y: measurements of a (Z, H, W) volume (CT sinograms (Z, views, detectors); MRI k-space (Z, H, W)).
        prior: (Z, H, W) image the solution is pulled towards, physics units.
        lam: weight of ``||x - prior||^2``, >= 0.
        iters: CG iterations.
        x0: starting estimate (Z, H, W); None: ``prior``.
        step: called with the iteration index after each iteration (may raise `Cancelled`).
        rhs: ``data_rhs(op, y)``, or None to compute it.

    Returns:
        The estimate (Z, H, W), not clamped.
    """
    white = Whitened(op)
    scale = 1.0 / max(operator_norm_sq(op, y.device), _TINY)
    x = (prior if x0 is None else x0).clone()

    def normal(v: torch.Tensor) -> torch.Tensor:
        return white.adjoint(white.forward(v)).mul_(scale).add_(v, alpha=lam)

    r = (data_rhs(op, y) if rhs is None else rhs).mul(scale).add_(prior, alpha=lam).sub_(normal(x))  # b - N x
    p = r.clone()
    rs = _slice_dot(r, r)
    for i in range(int(iters)):
        ap = normal(p)
        alpha = rs / _slice_dot(p, ap).clamp_min(_TINY)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        rs_new = _slice_dot(r, r)
        p.mul_(rs_new / rs.clamp_min(_TINY)).add_(r)
        rs = rs_new
        if step is not None:
            step(i)
    return x


def _view_order(n: int) -> list[int]:
    """Views in a spread-out order (each next view far from the recent ones), as ordered-subsets methods want."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    return sorted(range(n), key=lambda i: (i * golden) % 1.0)


@functools.lru_cache(maxsize=4)
def _view_projectors(h: int, w: int, views: int, n_det: int) -> tuple[ParallelBeamProjector, ...]:
    angles = torch.arange(views, dtype=torch.float64) * (math.pi / views)
    return tuple(ParallelBeamProjector((h, w), 1, angles=angles[i:i + 1], n_detectors=n_det) for i in range(views))


def os_sart(op: SparseViewCT, y: torch.Tensor, iters: int = 10, relax: float = 0.5,
            x0: Optional[torch.Tensor] = None, nonneg: bool = True, step: StopCheck = None) -> torch.Tensor:
    """Ordered-subsets SART (one view per subset): x += relax * A_v^T((y_v - A_v x) / A_v 1) / A_v^T 1.

    Args:
        op: the sparse-view CT operator.
        y: sinograms (Z, views, detectors).
        iters: passes over all views.
        relax: relaxation factor (SART converges for 0 < relax < 2; not checked).
        x0: starting estimate (Z, H, W); None: zeros.
        nonneg: clamp to >= 0 after every view.
        step: called with the pass index after each pass (may raise `Cancelled`).

    Returns:
        The estimate (Z, H, W) in physics units.
    """
    h, w = op.projector.image_size
    n_det = op.projector.n_detectors
    singles = _view_projectors(h, w, op.views, n_det)
    x = torch.zeros((*y.shape[:-2], h, w), dtype=y.dtype, device=y.device) if x0 is None else x0.clone()
    ones = torch.ones((1, h, w), dtype=y.dtype, device=y.device)
    weights = []
    for proj in singles:
        ray = proj(ones)                                      # (1, 1, det): path length of every ray
        pix = proj.adjoint(torch.ones_like(ray))              # (1, h, w): how many rays touch a pixel
        weights.append((torch.where(ray > 1e-6, 1.0 / ray, torch.zeros_like(ray)),
                        torch.where(pix > 1e-6, 1.0 / pix, torch.zeros_like(pix))))
    order = _view_order(op.views)
    for i in range(int(iters)):
        for v in order:
            proj, (inv_ray, inv_pix) = singles[v], weights[v]
            r = (y[..., v:v + 1, :] - proj(x)) * inv_ray
            x = x + relax * inv_pix * proj.adjoint(r)
            if nonneg:
                x = x.clamp_min(0.0)
        if step is not None:
            step(i)
    return x


def gradient3(x: torch.Tensor, z_weight: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward differences (3, Z, H, W) with zero flux at the far borders; the Z difference is scaled.
    ``out`` (3, Z, H, W) is reused when given (no allocation per iteration in the solvers).

    Args:
        x: volume (Z, H, W).
        z_weight: factor on the Z difference (in-plane / slice spacing).
        out: buffer (3, Z, H, W) of x's dtype and device, or None.

    Returns:
        (3, Z, H, W): the Z, H and W differences.
    """
    g = torch.empty((3, *x.shape), dtype=x.dtype, device=x.device) if out is None else out
    torch.sub(x[1:], x[:-1], out=g[0, :-1]).mul_(z_weight)
    g[0, -1:].zero_()
    torch.sub(x[:, 1:], x[:, :-1], out=g[1, :, :-1])
    g[1, :, -1:].zero_()
    torch.sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, :-1])
    g[2, :, :, -1:].zero_()
    return g


def divergence3(g: torch.Tensor, z_weight: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The negative adjoint of ``gradient3``: <gradient3(x), g> = -<x, divergence3(g)>. ``out`` is reused when
    given. The last difference along each axis is not read (gradient3 leaves it 0)."""
    d = torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) if out is None else out.zero_()
    d[:-1].add_(g[0, :-1], alpha=z_weight)
    d[1:].sub_(g[0, :-1], alpha=z_weight)
    d[:, :-1].add_(g[1, :, :-1])
    d[:, 1:].sub_(g[1, :, :-1])
    d[:, :, :-1].add_(g[2, :, :, :-1])
    d[:, :, 1:].sub_(g[2, :, :, :-1])
    return d


@torch.no_grad()
def tv_pdhg(op: Operator, y: torch.Tensor, beta: float, iters: int, z_weight: float = 1.0,
            prior: Optional[torch.Tensor] = None, lam: float = 0.0, x0: Optional[torch.Tensor] = None,
            nonneg: bool = True, step: StopCheck = None) -> torch.Tensor:
    """Minimise 1/2 ||R^(1/2) (A x - y)||^2 / ||R^(1/2) A||^2 + beta TV(x) + lam / 2 ||x - prior||^2 (x >= 0).

    ``beta`` and ``lam`` are relative to the normalised data term (see the module docstring); ``x0`` (default
    zeros) warm-starts the primal variable; ``z_weight`` scales the through-plane difference.

    Args:
        op: the measurement operator.
        y: measurements of a (Z, H, W) volume, as in `cg_regularised`.
        beta: TV weight, >= 0.
        iters: PDHG iterations.
        z_weight: factor on the through-plane difference (in-plane / slice spacing).
        prior: (Z, H, W) image to pull towards when ``lam`` > 0.
        lam: weight of the prior term, >= 0.
        x0: starting estimate (Z, H, W) or (H, W); None: zeros.
        nonneg: keep x >= 0.
        step: called with the iteration index after each iteration (may raise `Cancelled`).

    Returns:
        The estimate (Z, H, W) in physics units.

    Every update is in place on buffers allocated once, and the dual's pointwise norm is summed from the three
    components: a (3, Z, H, W) ``norm(dim=0)`` reduces across the slowest axis and cost more than the projector
    on 512 x 512 x 64 volumes."""
    shape = slice_shape(op)
    white = Whitened(op)
    scale = 1.0 / math.sqrt(max(operator_norm_sq(op, y.device), _TINY))  # A' = R^(1/2) A / ||R^(1/2) A||
    y_n = white.data(y) * scale
    depth = y.shape[0] if y.dim() >= 3 else 1
    x = (torch.zeros((depth, *shape), dtype=torch.float32, device=y.device) if x0 is None else x0.clone())
    if x.dim() == 2:
        x = x[None]
    pull = prior if lam > 0 else None  # the prior term, when it has weight
    norm_k = math.sqrt(1.0 + 4.0 * (2.0 + z_weight ** 2))  # ||A'|| = 1, ||grad||^2 <= 4 (1 + 1 + wz^2)
    # tau * sigma * ||K||^2 < 1 guarantees convergence; the split between the two matters for speed: a larger
    # primal step suits this problem (whitened data term, small beta); 10x gave the fastest descent on CT phantoms.
    tau, sigma = 0.99 * _PRIMAL_DUAL_RATIO / norm_k, 0.99 / (_PRIMAL_DUAL_RATIO * norm_k)
    q = torch.zeros_like(y_n)
    g = torch.zeros((3, *x.shape), dtype=x.dtype, device=x.device)
    grad = torch.empty_like(g)
    div = torch.empty_like(x)
    mag = torch.empty_like(x)
    x_bar = x.clone()
    for i in range(int(iters)):
        # q = (q + sigma (A' x_bar - y')) / (1 + sigma)
        q.add_(white.forward(x_bar), alpha=sigma * scale).sub_(y_n, alpha=sigma).div_(1.0 + sigma)
        # g = proj_{|g| <= beta}(g + sigma grad x_bar), pointwise over the three components
        g.add_(gradient3(x_bar, z_weight, out=grad), alpha=sigma)
        torch.mul(g[0], g[0], out=mag).addcmul_(g[1], g[1]).addcmul_(g[2], g[2])
        g.div_(mag.sqrt_().div_(max(beta, _TINY)).clamp_min_(1.0))
        # x_new = x - tau (A'^T q - div g), then the prior's proximal step and x >= 0
        x_new = white.adjoint(q).mul_(-tau * scale).add_(divergence3(g, z_weight, out=div), alpha=tau).add_(x)
        if pull is not None:
            x_new.add_(pull, alpha=tau * lam).div_(1.0 + tau * lam)
        if nonneg:
            x_new.clamp_min_(0.0)
        x_bar = x.mul_(-1.0).add_(x_new, alpha=2.0)  # 2 x_new - x, in x's buffer (x is not needed any more)
        x = x_new
        if step is not None:
            step(i)
    return x

