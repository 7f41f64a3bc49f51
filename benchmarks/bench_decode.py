"""Decode benchmark: time, peak memory and where the time goes, against this machine's FLOP time measured in the
same run.

The official 8x decoder with random weights (time and memory do not depend on the values). Each decode runs in a
fresh subprocess so its peak RSS is its own. Right before each decode the child times a pure conv3d of known FLOPs
(the decoder's most common shape: 48 -> 48 channels, 3x3x3, on a 256^2 slab, channels-last as the CPU decode runs
it), again right after it, and reports the decode's arithmetic divided by the mean of the two rates ("FLOP time"),
so the ratio decode / FLOP time stays meaningful on a shared machine whose load drifts; both rates and the load
average are printed with it. `--peak-gflops` adds the ratio to the FLOP time at a nominal peak. The breakdown
splits the time by operator (torch.profiler, which itself adds ~8 %: `--no-profile` for the time alone) and counts
the convolution work recomputed in halos or for tensors not kept whole.

    python benchmarks/bench_decode.py --sizes 16 --budget-gb 2          # 128^3 at a 2 GB budget
    python benchmarks/bench_decode.py --sizes 32                        # 256^3 at the default budget (7 GB)
    python benchmarks/bench_decode.py --sizes 64 --probe                # 512^3 peak memory only, in minutes
    python benchmarks/bench_decode.py --device cuda --sizes 8 16 32 64  # a GPU: time and max_memory_allocated
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..")]

OFFICIAL_AE = dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24)
CATEGORIES = (  # first match wins; self time of profiler events
    # oneDNN's transposed convolution has no aten op below aten::_convolution; regular ones do (mkldnn_convolution)
    ("transposed conv", ("aten::_convolution", "slow_conv_transpose")),
    ("convolution", ("convolution", "conv3d", "mkldnn_conv")),
    ("statistics", ("var_mean", "var", "std", "batch_norm_update_stats")),
    ("norm + SiLU", ("addcmul", "silu", "group_norm", "native_group_norm")),
    ("residual add", ("aten::add",)),
    ("copies", ("cat", "copy_", "pad", "constant_pad", "clone", "zero_", "fill_", "contiguous", "to")),
)


def conv_flops(conv: nn.Module, out_spatial: tuple[int, ...], batch: int) -> float:
    """Multiply-adds x 2 of one convolution producing `out_spatial` (a transposed one: from its input)."""
    k = conv.weight.shape[2] * conv.weight.shape[3] * conv.weight.shape[4]
    voxels = batch
    for n in out_spatial:
        voxels *= n
    if isinstance(conv, nn.ConvTranspose3d):
        voxels //= conv.stride[0] ** 3
    return 2.0 * k * conv.in_channels * conv.out_channels * voxels


def decode_flops(ae: nn.Module, latent: int, batch: int = 1) -> tuple[float, list[float]]:
    """The decode's arithmetic (convolutions and the attention), and the convolution FLOPs per output row of every
    tail tensor (for counting recomputation)."""
    dec = ae.decoder
    s = (latent,) * 3
    total = conv_flops(ae.post_vq_conv, s, batch) + conv_flops(dec.conv_first, s, batch)
    for m in dec.mid_block.modules():
        if isinstance(m, nn.Conv3d):
            total += conv_flops(m, s, batch)
    n = latent ** 3
    attn = dec.head_attention
    inner = attn.heads * attn.dim_head
    total += batch * (2 * n * attn.norm.num_channels * 3 * inner + 4 * n * n * inner)  # qkv and the two matmuls
    per_row = [0.0]
    spatial = s
    for layer in dec.tail():
        spatial = tuple(x * layer.upsampling for x in spatial)
        f = conv_flops(layer.conv, spatial, batch)
        if layer.skip is not None:
            f += conv_flops(layer.skip, spatial, batch)
        total += f
        per_row.append(f / spatial[0])
    return total, per_row


def reference_rate(seconds: float = 3.0) -> float:
    """GFLOP/s of a pure conv3d (48 -> 48, 3x3x3, 16 x 256 x 256 output) in the layout the CPU decode runs it
    (channels-last), best of repeats within `seconds`."""
    x = torch.randn(1, 48, 18, 256, 256).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(48, 48, 3, 3, 3)
    flops = 2 * 27 * 48 * 48 * 16 * 256 * 256
    best, start = float("inf"), time.perf_counter()
    with torch.no_grad():
        torch.nn.functional.conv3d(x, w, padding=(0, 1, 1))
        while time.perf_counter() - start < seconds or best == float("inf"):
            t0 = time.perf_counter()
            torch.nn.functional.conv3d(x, w, padding=(0, 1, 1))
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _child(latent: int, budget: float, device: str, probe: bool, profile: bool, precision: str) -> None:
    from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
    from MedDiffusionLib.pipelines.decode import DecodeReport, decode_latent

    dev = torch.device(device)
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**OFFICIAL_AE).to(dev).eval()
    flops, per_row = decode_flops(ae, latent)
    load_before = _loadavg()
    rate = reference_rate() if dev.type == "cpu" else float("nan")
    z = torch.randn(1, 8, latent, latent, latent, device=dev)
    report = DecodeReport()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    categories: dict[str, float] = defaultdict(float)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        z_q, _ = ae.quantize(z)
        if prof is not None:
            prof.__enter__()
        decode_latent(ae, z_q, budget_gb=budget, device=dev, report=report, probe_slabs=3 if probe else None)
        if prof is not None:
            prof.__exit__(None, None, None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rate_after = reference_rate() if dev.type == "cpu" else float("nan")
    rate_before, rate = rate, (rate + rate_after) / 2
    error = None
    if precision != "fp32":  # the same latent in the non-exact precision, against the exact volume
        with torch.inference_mode():
            exact = decode_latent(ae, z_q, budget_gb=budget, device=dev)
            t1 = time.perf_counter()
            approx = decode_latent(ae, z_q, budget_gb=budget, device=dev, precision=precision)
            approx_seconds = time.perf_counter() - t1
            diff = (approx - exact).float()
            error = dict(seconds=approx_seconds, max_abs=float(diff.abs().max()),
                         rmse=float(diff.pow(2).mean().sqrt()), exact_std=float(exact.std()),
                         exact_range=float(exact.max() - exact.min()))
    if prof is not None:
        for event in prof.key_averages():
            name = event.key
            for category, keys in CATEGORIES:
                if any(k in name for k in keys):
                    categories[category] += event.self_cpu_time_total / 1e6
                    break
            else:
                categories["other"] += event.self_cpu_time_total / 1e6
    executed = report.pass_flops if report.plan is not None and report.plan.halo is None else \
        sum(per_row[k] * rows for k, rows in report.rows_computed.items())
    minimal = sum(per_row[k] * report.plan.tensors[k].spatial[0] for k in range(1, len(per_row))) \
        if report.plan is not None else 0.0
    passes = []  # (label, seconds) per pass: what each pass over the slabs cost
    if report.plan is not None:
        for p, sec in zip(report.plan.passes, report.pass_seconds):
            t = report.plan.tensors[p.tensor]
            passes.append((f"T{p.tensor}{'' if t.materialized else ' (statistics only)'}", sec))
        if report.plan.halo is not None and len(report.pass_seconds) > len(report.plan.passes):
            passes.append(("3-D halo tiles", report.pass_seconds[-1]))
    out = dict(seconds=seconds, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               tflop=flops / 1e12, ref_gflops=rate, ref_before_after=(rate_before, rate_after),
               flop_seconds=flops / rate / 1e9 if rate == rate else None,
               recomputed_tflop=(executed - minimal) / 1e12, head_seconds=report.head_seconds,
               passes=len(report.pass_seconds), pass_seconds=passes, load=f"{load_before} -> {_loadavg()}",
               categories=dict(categories),
               plan=report.plan.describe() if report.plan is not None else "whole volume", error=error)
    if dev.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="latent edges (volume = 8x)")
    ap.add_argument("--budget-gb", type=float, default=None, help="decode budget (default: the device's)")
    ap.add_argument("--whole", action="store_true", help="also decode the whole volume at once (budget inf)")
    ap.add_argument("--probe", action="store_true", help="peak memory only: three slabs per pass (not a time)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-operator breakdown")
    ap.add_argument("--show-plan", action="store_true")
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="also print the ratio to the FLOP time at this nominal fp32 peak (e.g. 237 for 2 Zen 4 "
                         "cores at 3.7 GHz: 2 x 3.7 GHz x 32 FLOP/cycle)")
    ap.add_argument("--bf16", action="store_true",
                    help="also decode with precision='bf16' (not exact) and print its time and error against fp32")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args.child, args.budget_gb if args.budget_gb is not None else float("nan"), args.device,
               args.probe, not args.no_profile, "bf16" if args.bf16 else "fp32")
        return
    from MedDiffusionLib.pipelines.decode import default_budget_gb

    budget = args.budget_gb if args.budget_gb is not None else default_budget_gb(torch.device(args.device))
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"# device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for latent in args.sizes:
        for b in ([float("inf")] if args.whole else []) + [budget]:
            cmd = [sys.executable, __file__, "--child", str(latent), "--budget-gb", str(b), "--device", args.device]
            cmd += (["--probe"] if args.probe else []) + (["--no-profile"] if args.no_profile else []) + \
                (["--bf16"] if args.bf16 and not args.probe else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
            if proc.returncode:
                print(f"{latent * 8}^3 budget {b}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ratio = r["seconds"] / r["flop_seconds"] if r.get("flop_seconds") else None
            rows.append(r)
            print(f"\n{latent * 8}^3 (latent {latent}^3), budget {b} GB{' (probe: memory only)' if args.probe else ''}: "
                  f"{r['seconds']:.1f} s, peak {'GPU %.2f' % r['peak_gpu_gb'] if 'peak_gpu_gb' in r else 'RSS %.2f' % r['peak_rss_gb']} GB; "
                  f"{r['tflop']:.1f} TFLOP at the reference {r['ref_gflops']:.0f} GFLOP/s (before %.0f, after %.0f) " % tuple(r['ref_before_after']) +
                  f"= {r['flop_seconds'] or 0:.1f} s FLOP time"
                  + (f" -> ratio {ratio:.2f}" if ratio else "")
                  + (f"; at the {args.peak_gflops:.0f} GFLOP/s peak {r['tflop'] * 1e3 / args.peak_gflops:.1f} s -> "
                     f"ratio {r['seconds'] / (r['tflop'] * 1e3 / args.peak_gflops):.2f}" if args.peak_gflops else "")
                  + f"; load {r['load']}")
            stats_only = sum(sec for label, sec in r["pass_seconds"] if "statistics" in label)
            recompute = r["recomputed_tflop"] * 1e3 / r["ref_gflops"] if r["ref_gflops"] == r["ref_gflops"] else 0.0
            print(f"  head (attention at the latent) {r['head_seconds']:.1f} s; {r['passes']} passes, of which "
                  f"statistics-only {stats_only:.1f} s; recomputed convolution work (halo rows and tensors not "
                  f"kept) {r['recomputed_tflop']:.2f} TFLOP = {recompute:.1f} s at the reference rate")
            print("  per pass: " + ", ".join(f"{label} {sec:.1f} s" for label, sec in r["pass_seconds"]))
            if r["categories"]:
                total = sum(r["categories"].values())
                print("  " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)"
                                       for k, v in sorted(r["categories"].items(), key=lambda kv: -kv[1])))
            if r.get("error"):
                e = r["error"]
                print(f"  bf16 (not exact): {e['seconds']:.1f} s; error vs fp32: max {e['max_abs']:.2e}, "
                      f"RMSE {e['rmse']:.2e} (volume std {e['exact_std']:.2e}, range {e['exact_range']:.2e})")
            if args.show_plan:
                print("  " + r["plan"].replace("\n", "\n  "))


if __name__ == "__main__":
    main()
