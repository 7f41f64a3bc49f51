"""Generation benchmark: denoiser time per step and total per sampler, decode time and peak memory per size.

Prints tables for the machine it runs on. The official-size networks are built with random weights (timing and
memory do not depend on the values). Each decode runs in a fresh subprocess so its peak RSS is its own.

    python benchmarks/bench_generate.py                       # everything that fits this machine
    python benchmarks/bench_generate.py --part decode --sizes 8 16 32 --device cpu
    python benchmarks/bench_generate.py --part decode --sizes 64 --memory-only     # 512^3 peak RSS in minutes
    python benchmarks/bench_decode.py --sizes 16 32     # decode time vs FLOP time, with a per-operator breakdown
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

OFFICIAL_AE = dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24)
OFFICIAL_BFN = dict(dim=72, channels=8, num_classes=7, patch_size=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_denoiser(device: torch.device, latent: int, repeats: int) -> list[dict]:
    from MedDiffusionLib.diffusion import GaussianDiffusion, make_sampler
    from MedDiffusionLib.models.biflownet import BiFlowNet
    from MedDiffusionLib.pipelines.common import autocast_for

    net = BiFlowNet(**OFFICIAL_BFN).to(device).eval()
    x = torch.randn(1, 8, latent, latent, latent, device=device)
    t = torch.tensor([500], device=device)
    y = torch.tensor([1], device=device)
    res = torch.full((1, 3), latent / 64.0, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            with autocast_for(device):
                net(x, t, y, res)
            _sync(device)
            if i:  # the first call warms up kernels and allocators
                times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2]
    rows = []
    diffusion = GaussianDiffusion()
    for name, steps in (("ddpm", 1000), ("ddim", 50), ("ddim", 100), ("dpmpp", 20), ("dpmpp", 50)):
        sampler = make_sampler(name, diffusion)
        sampler.set_timesteps(steps)
        eps = torch.randn_like(x)
        xs = torch.randn_like(x)
        t0 = time.perf_counter()
        for tt in sampler.timesteps:
            xs = sampler.step(eps, int(tt), xs).prev_sample
        overhead = time.perf_counter() - t0
        rows.append(dict(sampler=name, steps=steps, latent=f"{latent}^3", per_step_s=per_step,
                         total_s=per_step * steps + overhead))
    return rows


def _decode_child(latent: int, budget: float, device: str, memory_only: bool) -> None:
    """Runs in a subprocess: decode one latent, print time and peak memory as JSON."""
    from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
    from MedDiffusionLib.pipelines.decode import decode_latent

    dev = torch.device(device)
    ae = PatchVolumeAutoencoder(**OFFICIAL_AE).to(dev).eval()
    z = torch.randn(1, 8, latent, latent, latent, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        z_q, _ = ae.quantize(z)
        decode_latent(ae, z_q, budget_gb=budget, device=dev, probe_slabs=3 if memory_only else None)
    _sync(dev)
    out = dict(seconds=time.perf_counter() - t0,
               peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if dev.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


def bench_decode(device: str, sizes: list[int], budget: float, max_plain_gb: float,
                 memory_only: bool = False) -> list[dict]:
    rows = []
    for latent in sizes:
        for mode in ("plain", "tiled"):
            vol = latent * 8
            # The plain decode holds ~36 GB of activations at 256^3 (scales with the voxel count).
            est_plain = 36.0 * (vol / 256) ** 3
            if mode == "plain" and est_plain > max_plain_gb:
                rows.append(dict(latent=f"{latent}^3", volume=f"{vol}^3", mode=mode, seconds=None,
                                 peak_gb=None, note=f"skipped: needs ~{est_plain:.0f} GB"))
                continue
            cmd = [sys.executable, __file__, "--decode-child", str(latent), "--budget-gb",
                   "inf" if mode == "plain" else str(budget), "--device", device] + \
                (["--memory-only"] if memory_only else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
            if proc.returncode:
                rows.append(dict(latent=f"{latent}^3", volume=f"{vol}^3", mode=mode, seconds=None, peak_gb=None,
                                 note=f"failed: {proc.stderr.strip().splitlines()[-1:]}"))
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(dict(latent=f"{latent}^3", volume=f"{vol}^3", mode=mode, seconds=r["seconds"],
                             peak_gb=r.get("peak_gpu_gb", r["peak_rss_gb"]),
                             note="memory-only: not a decode time" if memory_only and mode == "tiled" else ""))
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "denoiser", "decode"), default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--latent", type=int, default=32, help="denoiser latent edge (official 8x: 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="decode latent edges")
    ap.add_argument("--budget-gb", type=float, default=None,
                    help="tiled decode budget (default: the device's, pipelines/decode.py default_budget_gb)")
    ap.add_argument("--max-plain-gb", type=float,
                    default=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 * 0.8)
    ap.add_argument("--memory-only", action="store_true",
                    help="decode: peak memory only, three slabs per pass (decode_latent's probe_slabs; the third "
                         "slab is the first whose reused buffers have their full size); times are then not decode "
                         "times")
    ap.add_argument("--decode-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.budget_gb is None:
        from MedDiffusionLib.pipelines.decode import default_budget_gb
        args.budget_gb = default_budget_gb(torch.device(args.device))
    if args.decode_child is not None:
        _decode_child(args.decode_child, args.budget_gb, args.device, args.memory_only)
        return
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"# device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("all", "denoiser"):
        _print_table("BiFlowNet official 8x (random weights): time per step and per sampling run",
                     bench_denoiser(torch.device(args.device), args.latent, args.repeats))
    if args.part in ("all", "decode"):
        _print_table(f"Official 8x decoder: plain vs tiled (budget {args.budget_gb} GB per stage/tile)",
                     bench_decode(args.device, args.sizes, args.budget_gb, args.max_plain_gb, args.memory_only))


if __name__ == "__main__":
    main()
