"""Parallel-beam CT in pure torch: a differentiable projector, its exact adjoint, FBP and Poisson noise.

Why pure torch: projector libraries such as ASTRA need CUDA libraries and crash on CPU-only 3D calls, and
torch-radon style packages need compiled CUDA kernels. Everything here is plain torch, so it runs and is
differentiable on CPU and on any CUDA device, with no numpy inside the forward path.

Geometry (all lengths in pixels, pixel spacing 1):
  * a slice is the last two dims (..., H, W); every leading dim is a batch of slices, so a (Z, X, Y) volume
    is Z axial slices (X = rows, Y = columns);
  * pixel (i, j) has its centre at x = j - (W - 1) / 2 (columns), y = i - (H - 1) / 2 (rows);
  * view angle theta in [0, pi) (default: n_views evenly spaced), detector coordinate
    t = x cos(theta) + y sin(theta), detector d at t = d - (n_det - 1) / 2 (spacing 1);
  * sinogram values are line integrals in "intensity x pixel" units: a centred disk of radius r pixels and
    intensity 1 projects to 2 * sqrt(r^2 - t^2).

Discretisation: Joseph's method (the image is linearly interpolated along the axis closest to
perpendicular to each ray and sampled once per row or column). Written pixel-wise, pixel p contributes to
detector d with weight tri((t_d - t_p) / m) / m, where m = max(|cos|, |sin|) and tri(u) = max(0, 1 - |u|).
The operator is stored as two sparse CSR matrices (A for the forward and its transpose for the adjoint):
one CSR x dense product handles all slices at once. On 2 CPU cores, 64 slices of 256^2 at 180 views take
~0.2 s, against ~10 s for rotating the image with grid_sample per view; on GPU it maps to cuSPARSE.
Memory: ~8 bytes per non-zero (int32 indices), ~0.9 * n_views * H * W non-zeros per matrix
(256^2 with 180 views: ~170 MB each). Built once per projector in ~1 s, then copied per device/dtype.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError

__all__ = ["ParallelBeamProjector", "add_poisson_noise", "ramp_filter", "FBP_WINDOWS"]

FBP_WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hann", "hamming")
# Float dtypes the sparse kernels support; others (half, bfloat16) are computed in float32 and cast back.
_SPARSE_DTYPES = (torch.float32, torch.float64)


# Pixels per column block of the CPU forward projector (see _ColumnBlocks): with 64 slices in a batch a block's
# input rows are 2 MB, which stay in a core's L2 cache while every view's rays cross them.
_BLOCK_PIXELS = 8192


class _ColumnBlocks:
    """A = [A_1 ... A_K] split by column (pixel) ranges, each a CSR matrix: A x = sum_k A_k x_k.

    On CPU the forward product A x reads the input rows (pixels) in ray order, once per view: for a 512^2 x 64
    batch that streams 64 MB from memory 30 times at 30 views, ~3x slower than the adjoint, whose input (the
    sinograms) fits in cache. Summed over pixel blocks that fit in cache the forward ran ~3x faster there
    (0.45 s instead of 1.4 s on 2 cores); the summation order differs, so results agree to float rounding."""

    def __init__(self, adjoint: torch.Tensor) -> None:
        n_in, self.n_out = adjoint.shape
        crow, col, val = adjoint.crow_indices(), adjoint.col_indices(), adjoint.values()
        self.blocks: list[tuple[int, int, torch.Tensor]] = []
        for a in range(0, n_in, _BLOCK_PIXELS):
            b = min(a + _BLOCK_PIXELS, n_in)
            c0, c1 = int(crow[a]), int(crow[b])
            rows = torch.sparse_csr_tensor(crow[a:b + 1] - crow[a], col[c0:c1], val[c0:c1], (b - a, self.n_out),
                                           check_invariants=False)  # rows a..b of A^T = columns a..b of A
            self.blocks.append((a, b, _transpose_csr(rows)))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((self.n_out, x.shape[1]), dtype=x.dtype, device=x.device)
        for a, b, block in self.blocks:
            out.addmm_(block, x[a:b])
        return out


_Matrix = Union[torch.Tensor, _ColumnBlocks]


def _mm(mat: _Matrix, x: torch.Tensor) -> torch.Tensor:
    return mat.mm(x) if isinstance(mat, _ColumnBlocks) else torch.sparse.mm(mat, x)


class _SparseLinear(torch.autograd.Function):
    """y = M @ x with dL/dx = M^T @ dL/dy; the backward reuses this Function so higher-order grads work."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mat: _Matrix, mat_t: _Matrix) -> torch.Tensor:
        ctx.mats = (mat, mat_t)
        return _mm(mat, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        mat, mat_t = ctx.mats
        return _SparseLinear.apply(grad.contiguous(), mat_t, mat), None, None


def _build_adjoint_csr(
    image_size: Tuple[int, int], angles: torch.Tensor, n_det: int
) -> torch.Tensor:
    """A^T as a (H*W, n_views*n_det) float32 CSR matrix; rows = pixels, generated already sorted.

    Each (pixel, view) pair touches at most the two detectors floor(u) and floor(u)+1 around its projected
    position u, because the footprint half-width m is <= 1. Positions are computed in float64 (exact
    geometry), weights in float32; zero weights and detectors off the array are dropped.
    """
    h, w = image_size
    n_views = int(angles.numel())
    ang = angles.detach().to("cpu", torch.float64)
    cos, sin = torch.cos(ang), torch.sin(ang)
    inv_half = (1.0 / torch.maximum(cos.abs(), sin.abs())).to(torch.float32)  # 1/m, m in [1/sqrt(2), 1]
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    itype = torch.int32 if n_views * n_det < 2**31 - 2 else torch.int64
    view_offset = torch.arange(n_views, dtype=itype) * n_det

    counts, cols, vals = [], [], []
    rows_per_chunk = max(1, (1 << 22) // max(1, w * n_views))  # bounds the float64 temporaries (~100 MB)
    for r0 in range(0, h, rows_per_chunk):
        yc = ys[r0 : r0 + rows_per_chunk]
        # detector index coordinate of every (row, col, view): shape (rows, W, V)
        u = xs[None, :, None] * cos + yc[:, None, None] * sin + (n_det - 1) / 2
        d0f = torch.floor(u)
        frac = (u - d0f).to(torch.float32)
        d0 = d0f.to(itype)
        w0 = torch.clamp(1.0 - frac * inv_half, min=0.0) * inv_half
        w1 = torch.clamp(1.0 - (1.0 - frac) * inv_half, min=0.0) * inv_half
        wgt = torch.stack((w0, w1), dim=-1).reshape(-1)
        det = torch.stack((d0, d0 + 1), dim=-1).reshape(-1)
        keep = (wgt > 0) & (det >= 0) & (det < n_det)
        idx = keep.nonzero().squeeze(1)
        det = (det.view(-1, n_views, 2) + view_offset[:, None]).reshape(-1)
        cols.append(det[idx])
        vals.append(wgt[idx])
        counts.append(keep.view(-1, 2 * n_views).sum(dim=1))
    crow = torch.zeros(h * w + 1, dtype=torch.int64)
    crow[1:] = torch.cat(counts).cumsum(0)
    if crow[-1] >= 2**31 - 1:
        itype = torch.int64
    # int32 indices halve the index memory; the CSR kernels (MKL, cuSPARSE) accept them.
    return torch.sparse_csr_tensor(
        crow.to(itype), torch.cat(cols).to(itype), torch.cat(vals), (h * w, n_views * n_det),
        check_invariants=False,
    )


def _transpose_csr(mat: torch.Tensor) -> torch.Tensor:
    """CSR of mat^T by a stable sort of the column indices (columns come out sorted within each row).

    About 5x faster than to_sparse_csc() on CPU for these matrices.
    """
    n_rows, n_cols = mat.shape
    crow, col = mat.crow_indices(), mat.col_indices()
    rows = torch.repeat_interleave(torch.arange(n_rows, dtype=col.dtype, device=col.device), crow.diff().long())
    # int32 keys sort faster when large, but torch's int32 path costs ~0.1 s even for small arrays.
    key = col if col.numel() > (1 << 22) else col.long()
    order = torch.sort(key, stable=True).indices
    new_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    new_crow[1:] = torch.bincount(col.long(), minlength=n_cols).cumsum(0)
    return torch.sparse_csr_tensor(
        new_crow.to(col.dtype), rows[order], mat.values()[order], (n_cols, n_rows), check_invariants=False
    )


def ramp_filter(n_det: int, window: str = "ram-lak", dtype: torch.dtype = torch.float64,
                device: Union[str, torch.device, None] = None) -> Tuple[torch.Tensor, int]:
    """Frequency response of the windowed ramp filter on a zero-padded grid -> (response (P,), P).

    The response is the DFT of the band-limited spatial ramp kernel (h[0] = 1/4, h[n odd] = -1/(pi n)^2),
    not a sampled |f|: that keeps the correct DC term and avoids a cupping offset. P is the next power of two
    >= 2 * n_det so the circular convolution does not wrap.

    Args:
        n_det: detector bins per projection.
        window: apodisation, one of `FBP_WINDOWS` ('ram-lak' = none).
        dtype: dtype of the returned response.
        device: device of the returned response.

    Raises:
        InputError: an unknown window.
    """
    if window not in FBP_WINDOWS:
        raise InputError(f"unknown FBP window {window!r}; choose one of {', '.join(FBP_WINDOWS)}")
    size = 1 << math.ceil(math.log2(max(2, 2 * n_det)))
    n = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)  # integer lags 0..P/2-1, -P/2..-1
    kernel = torch.zeros(size, dtype=torch.float64)
    odd = (n.abs() % 2) == 1
    kernel[0] = 0.25
    kernel[odd] = -1.0 / (math.pi * n[odd]) ** 2
    resp = torch.fft.fft(kernel).real
    f = torch.fft.fftfreq(size, dtype=torch.float64)  # cycles per detector, |f| <= 0.5
    if window == "shepp-logan":
        resp = resp * torch.sinc(f)
    elif window == "cosine":
        resp = resp * torch.cos(math.pi * f)
    elif window == "hann":
        resp = resp * (0.5 + 0.5 * torch.cos(2 * math.pi * f))
    elif window == "hamming":
        resp = resp * (0.54 + 0.46 * torch.cos(2 * math.pi * f))
    return resp.to(device=device, dtype=dtype), size


def add_poisson_noise(
    sino: torch.Tensor,
    photons: float = 1e5,
    mu_scale: float = 0.02,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Low-dose noise by Beer-Lambert: counts ~ Poisson(photons * exp(-sino * mu_scale)), then -log.

    `sino` holds line integrals in intensity x pixel units (see module docstring); `mu_scale` converts them to
    optical depth. The default 0.02 reads intensity 1 as water (0.02 / mm) with 1 mm pixels, so a 256-pixel
    water path keeps ~0.6 % of the photons. Zero counts are clamped to 0.5 before the log (finite output).
    Returns a noisy sinogram in the input units; not differentiable (the input is detached). Pass a
    `generator` on the sinogram's device for reproducible noise.

    Args:
        sino: line integrals (..., n_views, n_det), intensity x pixel units.
        photons: incident photons per ray, > 0 (fewer: noisier).
        mu_scale: optical depth per intensity x pixel, > 0.
        generator: torch generator on the sinogram's device, or None for the global one.

    Raises:
        InputError: photons or mu_scale <= 0.
    """
    if photons <= 0 or mu_scale <= 0:
        raise InputError(f"photons and mu_scale must be > 0 (got {photons}, {mu_scale})")
    clean = sino.detach()
    work = clean if clean.dtype in _SPARSE_DTYPES else clean.float()
    rate = photons * torch.exp(-work * mu_scale)
    counts = torch.poisson(rate, generator=generator).clamp_min(0.5)
    return (-torch.log(counts / photons) / mu_scale).to(sino.dtype)


class ParallelBeamProjector(torch.nn.Module):
    """2D parallel-beam Radon transform applied slice by slice: (..., H, W) -> (..., n_views, n_det).

    `forward` is linear and differentiable; `adjoint` is its exact transpose (same sparse weights), so
    <A x, y> = <x, A^T y> to float rounding; `fbp` = ramp filter + pi / n_views * adjoint. Matrices are built
    lazily per (device, dtype) and cached, so one instance serves CPU and CUDA inputs.

    Args:
        image_size: (H, W) pixels of one slice.
        n_views: number of angles; without ``angles`` they are evenly spaced over [0, pi).
        angles: n_views angles in radians (any order), or None.
        n_detectors: detector bins (pixel-sized); None: ceil(hypot(H, W)) + 2, which covers every rotation.
        device: where matrices go when a call names no device (default: the input's device).

    Raises:
        InputError: a size that is not two positive ints, n_views < 1, an angle count other than n_views, or
            n_detectors < 1.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        n_views: int,
        angles: Optional[torch.Tensor] = None,
        n_detectors: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        super().__init__()
        if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
            raise InputError(f"image_size must be (H, W) with positive ints, got {tuple(image_size)}")
        self.image_size: Tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        if angles is None:
            if int(n_views) < 1:
                raise InputError(f"n_views must be >= 1, got {n_views}")
            angles = torch.arange(int(n_views), dtype=torch.float64) * (math.pi / int(n_views))
        else:
            angles = torch.as_tensor(angles, dtype=torch.float64).flatten().cpu()
            if angles.numel() != int(n_views):
                raise InputError(f"{angles.numel()} angles given for n_views={n_views}")
        self.n_views = int(n_views)
        self.angles = angles  # float64 on CPU: geometry only, never part of the autograd graph
        h, w = self.image_size
        # Covers the rotated image: pixel squares reach sqrt(H^2+W^2)/2 and the footprint adds one bin.
        self.n_detectors = int(n_detectors) if n_detectors is not None else math.ceil(math.hypot(h, w)) + 2
        if self.n_detectors < 1:
            raise InputError(f"n_detectors must be >= 1, got {n_detectors}")
        self.default_device = torch.device(device) if device is not None else None
        self._adjoint_cpu: Optional[torch.Tensor] = None  # A^T, float32 CSR, built once
        self._adjoints: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}
        self._cache: Dict[Tuple[str, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._blocks: Dict[torch.dtype, _ColumnBlocks] = {}  # CPU forward operators (see _ColumnBlocks)

    def extra_repr(self) -> str:
        """Geometry, for print(projector)."""
        return f"image_size={self.image_size}, n_views={self.n_views}, n_detectors={self.n_detectors}"

    @property
    def sinogram_shape(self) -> Tuple[int, int]:
        """(views, detectors) of one slice's sinogram."""
        return (self.n_views, self.n_detectors)

    def _device(self, device: Union[str, torch.device, None]) -> torch.device:
        dev = torch.device(device) if device is not None else (self.default_device or torch.device("cpu"))
        if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" must share one cache entry
            # torch's stub types device.index as int, but it is None for a bare "cuda".
            dev = torch.device("cuda", torch.cuda.current_device())  # type: ignore[unreachable]
        return dev

    def adjoint_matrix(self, device: Union[str, torch.device, None] = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A^T as a CSR matrix on `device` in `dtype`; built on CPU once, then copied and cached."""
        dev = self._device(device)
        key = (str(dev), dtype)
        if key not in self._adjoints:
            with warnings.catch_warnings():
                # torch warns once that sparse CSR is "beta"; the ops used here are stable since torch 2.0.
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
                if self._adjoint_cpu is None:
                    self._adjoint_cpu = _build_adjoint_csr(self.image_size, self.angles, self.n_detectors)
                self._adjoints[key] = self._adjoint_cpu.to(device=dev, dtype=dtype)
        return self._adjoints[key]

    def matrices(self, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A, A^T) as CSR matrices on `device` in `dtype`; built on CPU once, then copied and cached. (On CPU the
        projector itself uses A^T and the column blocks of A, so A is only built when asked for here.)"""
        dev = self._device(device)
        key = (str(dev), dtype)
        if key not in self._cache:
            adj = self.adjoint_matrix(dev, dtype)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
                self._cache[key] = (_transpose_csr(adj), adj)
        return self._cache[key]

    def _check_last(self, t: torch.Tensor, shape: Tuple[int, int], what: str) -> None:
        if t.dim() < 2 or tuple(t.shape[-2:]) != shape:
            raise InputError(f"{what} must have shape (..., {shape[0]}, {shape[1]}), got {tuple(t.shape)}")

    def _linear(self, x: torch.Tensor, in_shape: Tuple[int, int], out_shape: Tuple[int, int],
                transpose: bool) -> torch.Tensor:
        if x.is_complex():
            # Real operator: apply to real and imaginary parts (k-space style inputs, rarely needed).
            return torch.complex(self._linear(x.real, in_shape, out_shape, transpose),
                                 self._linear(x.imag, in_shape, out_shape, transpose))
        if x.device.type not in ("cpu", "cuda"):
            # e.g. Apple MPS has no sparse CSR matmul: run on CPU (the copies are differentiable).
            return self._linear(x.cpu(), in_shape, out_shape, transpose).to(x.device)
        lead = x.shape[:-2]
        work_dtype = x.dtype if x.dtype in _SPARSE_DTYPES else torch.float32
        forward: _Matrix
        if x.device.type == "cpu" and self.image_size[0] * self.image_size[1] > _BLOCK_PIXELS:
            adj = self.adjoint_matrix(x.device, work_dtype)
            if work_dtype not in self._blocks:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
                    self._blocks[work_dtype] = _ColumnBlocks(adj)
            forward = self._blocks[work_dtype]
        else:
            forward, adj = self.matrices(x.device, work_dtype)
        mat, mat_t = (adj, forward) if transpose else (forward, adj)
        # (B, n_in) -> (n_in, B): one sparse x dense product handles every slice of the batch.
        cols = x.to(work_dtype).reshape(-1, in_shape[0] * in_shape[1]).t().contiguous()
        out = _SparseLinear.apply(cols, mat, mat_t)
        return out.t().reshape(*lead, *out_shape).to(x.dtype if x.is_floating_point() else work_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project slices (..., H, W) to sinograms (..., n_views, n_det)."""
        self._check_last(x, self.image_size, "image")
        return self._linear(x, self.image_size, self.sinogram_shape, transpose=False)

    def adjoint(self, sino: torch.Tensor) -> torch.Tensor:
        """Exact adjoint (unfiltered backprojection): (..., n_views, n_det) -> (..., H, W)."""
        self._check_last(sino, self.sinogram_shape, "sinogram")
        return self._linear(sino, self.sinogram_shape, self.image_size, transpose=True)

    def filter_sinogram(self, sino: torch.Tensor, window: str = "ram-lak") -> torch.Tensor:
        """Ramp-filter every projection along the detector axis (zero-padded FFT convolution).

        Args:
            sino: sinograms (..., n_views, n_det).
            window: one of `FBP_WINDOWS`.

        Raises:
            InputError: a sinogram of another shape, or an unknown window.
        """
        self._check_last(sino, self.sinogram_shape, "sinogram")
        work = sino if sino.dtype in _SPARSE_DTYPES else sino.float()
        resp, size = ramp_filter(self.n_detectors, window, dtype=work.dtype, device=work.device)
        spec = torch.fft.rfft(work, n=size, dim=-1) * resp[: size // 2 + 1]
        return torch.fft.irfft(spec, n=size, dim=-1)[..., : self.n_detectors].to(sino.dtype)

    def fbp(self, sino: torch.Tensor, filter: Optional[str] = "ramp", window: str = "ram-lak") -> torch.Tensor:
        """Filtered backprojection -> (..., H, W) on the intensity scale of the projected image.

        pi / n_views is the angular step of views evenly covering [0, pi); with the ramp filter in cycles per
        detector this makes FBP(forward(x)) ~= x. The same weight is used for custom `angles`, which is right
        for any evenly spaced set over [0, pi) (limited-angle sets come out scaled by their coverage).
        The backprojector is the exact adjoint, so FBP is differentiable. `filter=None`: plain backprojection.

        Args:
            sino: sinograms (..., n_views, n_det).
            filter: 'ramp', or None for unfiltered backprojection (scaled by pi / n_views).
            window: the ramp filter's apodisation, one of `FBP_WINDOWS`.

        Raises:
            InputError: an unknown filter or window, or a sinogram of another shape.
        """
        if filter not in ("ramp", None):
            raise InputError(f"unknown FBP filter {filter!r}; only 'ramp' (or None) is supported")
        q = self.filter_sinogram(sino, window) if filter == "ramp" else sino
        return self.adjoint(q) * (math.pi / self.n_views)

    def add_poisson_noise(self, sino: torch.Tensor, photons: float = 1e5, mu_scale: float = 0.02,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """See the module-level `add_poisson_noise`."""
        return add_poisson_noise(sino, photons=photons, mu_scale=mu_scale, generator=generator)
