"""Peak memory of generation at every official resolution (GPU) and of CPU decoding, estimated without a GPU.

Runs the project's own code — one BiFlowNet step (optionally with a ControlNet), quantization and
`decode_latent` with the GPU budget (`default_budget_gb("cuda")`) — on fake tensors (no data, no compute) and
tracks the bytes of every live tensor, the quantity `torch.cuda.max_memory_allocated` reports. The output volume
stays on the host, as on a real GPU. Attention is modelled as the memory-efficient CUDA kernel (output plus a
log-sum-exp row per query; the N x N matrix is never built). Not counted: the CUDA context (~0.5 GB), cuDNN
workspaces and allocator fragmentation — hence the 1.5 GB allowance in the `fits` column. The denoiser step
plays CUDA's bf16 autocast (matmul/conv inputs cast to bf16, weights once per step; norms and softmax in fp32) as
the pipelines use it on GPUs; `--fp32` gives the upper bound without it. Decoding is fp32, as in the pipelines.

    python benchmarks/estimate_memory.py                 # 8x and 4x official models
    python benchmarks/estimate_memory.py --controlnet    # ControlNet-guided reconstruction step

A measurement on a real GPU is `python benchmarks/bench_generate.py --device cuda` (peak_gpu_gb).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import weakref
from unittest import mock
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), _HERE]

from MedDiffusionLib.catalog import OFFICIAL_ANATOMIES  # noqa: E402
from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder  # noqa: E402
from MedDiffusionLib.models.biflownet import BiFlowNet  # noqa: E402
from MedDiffusionLib.models.controlnet import ControlNet  # noqa: E402
from MedDiffusionLib.pipelines.decode import decode_latent, default_budget_gb  # noqa: E402

# The accelerator stand-in: fake tensors on "meta" are the GPU's, fake tensors on "cpu" are the host's.
GPU = torch.device("meta")
ALLOWANCE_GB = 1.5
PROBE_SLABS = 3
OFFICIAL = {  # downsample -> (autoencoder config, BiFlowNet config); OFFICIAL.md
    8: (dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24),
        dict(dim=72, channels=8, num_classes=7, patch_size=1)),
    4: (dict(n_hiddens=48, downsample=4, embedding_dim=8, n_codes=8192, num_groups=24),
        dict(dim=72, channels=8, num_classes=7, patch_size=2)),
}


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live storages on one device and remembers the peak (like the CUDA caching allocator's
    allocated-bytes statistic, rounded up to its 512-byte blocks)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()  # a fake tensor's storage is always on meta: ask the tensor for its device
        key = storage._cdata
        if t.device.type != self.device.type or key in self.live:
            return
        size = math.ceil(storage.nbytes() / 512) * 512
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None,
                         dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
                         enable_gqa: bool = False) -> torch.Tensor:
    """Memory footprint of CUDA's memory-efficient attention: the output and one fp32 log-sum-exp per query."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    del lse
    return out


@contextlib.contextmanager
def _bf16_autocast(weights: set[int]) -> Iterator[None]:
    """Plays CUDA bf16 autocast (unavailable without CUDA) where our networks need it: convolutions and linear
    layers take bf16 inputs, weights cast once per step (autocast's cast cache), norms and softmax in fp32."""
    cache: dict[tuple, torch.Tensor] = {}

    def cast(t: Any, dtype: torch.dtype) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if t.untyped_storage()._cdata not in weights:
            return t.to(dtype)
        key = (t.untyped_storage()._cdata, tuple(t.shape), t.stride(), t.storage_offset(), dtype)
        if key not in cache:
            cache[key] = t.to(dtype)
        return cache[key]

    def wrap(fn: Any, dtype: torch.dtype) -> Any:
        return lambda *a, **k: fn(*(cast(v, dtype) for v in a), **{n: cast(v, dtype) for n, v in k.items()})

    low = {name: wrap(getattr(F, name), torch.bfloat16) for name in ("conv3d", "conv_transpose3d", "linear")}
    full = {name: wrap(getattr(F, name), torch.float32) for name in ("group_norm", "layer_norm", "softmax")}
    with mock.patch.multiple(F, **low, **full):
        yield
    cache.clear()


@contextlib.contextmanager
def _fake_gpu() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_attention
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            yield
    finally:
        F.scaled_dot_product_attention = original


def _on_gpu(module: nn.Module) -> nn.Module:
    """Built on meta (no init cost), then given fake GPU storage."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=GPU))


def _weights_bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def estimate(downsample: int, latent: tuple[int, int, int], controlnet: bool, autocast: bool = True,
             budget_gb: Optional[float] = None) -> dict[str, float]:
    """Peak bytes (GB) of the weights, one denoiser step (bf16 autocast as on GPUs, or fp32) and the decode
    (with the GPU's default budget unless `budget_gb` is given)."""
    ae_cfg, bfn_cfg = OFFICIAL[downsample]
    with torch.device("meta"):
        ae, net = PatchVolumeAutoencoder(**ae_cfg), BiFlowNet(**bfn_cfg)
        cn = ControlNet(bfn_cfg, image_downsample=downsample) if controlnet else None
    ae, net = ae.eval(), net.eval()
    weights = _weights_bytes(ae, net, *([cn] if cn else []))
    # The condition vector (B, 8*dim) is tiny, but its input checks read values that fake tensors do not have.
    condition = lambda *a, **k: torch.zeros(1, 8 * bfn_cfg["dim"], device=GPU)  # noqa: E731
    with _fake_gpu(), mock.patch.object(BiFlowNet, "embed_condition", condition):
        _on_gpu(ae), _on_gpu(net)
        if cn is not None:
            _on_gpu(cn.eval())
        shape = (1, 8) + latent
        denoisers = [net] + ([cn] if cn is not None else [])
        weight_keys = {p.untyped_storage()._cdata for m in denoisers for p in m.parameters()}
        tracker = LiveTensorBytes(GPU)
        with tracker, (_bf16_autocast(weight_keys) if autocast else contextlib.nullcontext()):
            x = torch.randn(shape, device=GPU)
            t = torch.full((1,), 500, device=GPU, dtype=torch.long)
            y = torch.ones(1, device=GPU, dtype=torch.long)
            res = torch.tensor([[n / 64.0 for n in latent]], device=GPU)
            control = None
            if cn is not None:
                image = torch.randn((1, 1) + tuple(n * downsample for n in latent), device=GPU)
                control = cn(x, t, y, res, condition=image)
            eps = net(x, t, y, res, control=control)
            del eps, control
        step_peak = tracker.peak
        tracker = LiveTensorBytes(GPU)
        with tracker:
            z = torch.randn(shape, device=GPU)
            z_q, _ = ae.quantize(z)
            del z
            budget = default_budget_gb(torch.device("cuda")) if budget_gb is None else budget_gb
            # every slab of a pass has the same working set: the first (border) and second (interior) suffice
            decode_latent(ae, z_q, budget_gb=budget, device=GPU, probe_slabs=PROBE_SLABS)
        decode_peak = tracker.peak
    gb = 2**30
    total = (weights + max(step_peak, decode_peak)) / gb
    return dict(weights_gb=weights / gb, ae_weights_gb=_weights_bytes(ae) / gb, step_gb=step_peak / gb, decode_gb=decode_peak / gb, total_gb=total)


def cpu_decode_rows(latents: list[int]) -> None:
    """Decoding on the CPU (official 8x, default CPU budget): host RSS = interpreter and libraries (measured now)
    + autoencoder weights + decoder tensors + the output volume."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    budget = default_budget_gb(torch.device("cpu"))
    print(f"\n# CPU decode, official 8x, budget {budget} GB; runtime baseline {baseline:.2f} GB RSS")
    widths = (8, 12, 9, 9, 13)
    print("  ".join(h.ljust(w) for h, w in zip(("latent", "volume", "decode_gb", "output_gb", "est_rss_gb"),
                                                widths)), flush=True)
    for n in latents:
        r = estimate(8, (n, n, n), controlnet=False, budget_gb=budget)
        output = 4 * (8 * n) ** 3 / 2**30
        row = (f"{n}^3", f"{8 * n}^3", f"{r['decode_gb']:.2f}", f"{output:.2f}",
               f"{baseline + r['ae_weights_gb'] + r['decode_gb'] + output:.2f}")
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--downsample", type=int, nargs="+", default=[8, 4], choices=(8, 4))
    ap.add_argument("--controlnet", action="store_true", help="add a ControlNet to the denoiser step")
    ap.add_argument("--limit-gb", type=float, default=12.0)
    ap.add_argument("--fp32", action="store_true", help="denoiser step without bf16 autocast")
    ap.add_argument("--cpu-decode", type=int, nargs="*", metavar="LATENT",
                    help="instead: CPU decode RSS for these cubic 8x latent edges (e.g. 16 32 64)")
    args = ap.parse_args()
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    if args.cpu_decode:
        cpu_decode_rows(args.cpu_decode)
        return
    print(f"# torch {torch.__version__}; fake tensors; denoiser step {'fp32' if args.fp32 else 'bf16 autocast'}"
          f"{' + ControlNet' if args.controlnet else ''}; GPU decode budget "
          f"{default_budget_gb(torch.device('cuda'))} GB; fits = total + {ALLOWANCE_GB} GB <= {args.limit_gb} GB")
    header = ("model", "anatomy", "latent", "volume", "weights_gb", "step_gb", "decode_gb", "total_gb", "fits")
    widths = (5, 18, 10, 12, 10, 8, 9, 8, 4)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), flush=True)
    for f in args.downsample:
        for anatomy in OFFICIAL_ANATOMIES:
            for latent8 in anatomy.latent_sizes:
                latent = tuple(n * 8 // f for n in latent8)
                r = estimate(f, latent, args.controlnet, autocast=not args.fp32)
                row = (f"{f}x", anatomy.name, "x".join(map(str, latent)), "x".join(str(n * f) for n in latent),
                       *(f"{r[k]:.2f}" for k in ("weights_gb", "step_gb", "decode_gb", "total_gb")),
                       "yes" if r["total_gb"] + ALLOWANCE_GB <= args.limit_gb else "NO")
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


if __name__ == "__main__":
    main()
