"""Timing of the physics operators on a (Z, X, Y) volume: CT forward/adjoint/FBP and MRI data consistency.

Repeat with:
    python benchmarks/bench_physics.py                       # (64, 256, 256), 30 and 180 views, CPU (+ CUDA)
    python benchmarks/bench_physics.py --slices 16 --size 128 --views 30 90 --devices cpu
Times are the median of --repeats runs after one warm-up run; "build" is the one-time sparse matrix
construction (and copy to the device) that the first call of a projector pays.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from MedDiffusionLib.physics import (  # noqa: E402
    ParallelBeamProjector,
    data_consistency,
    gaussian_mask_1d,
    undersample,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in seconds after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="in-plane size (square slices)")
    parser.add_argument("--views", type=int, nargs="+", default=[30, 180])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    shape = (args.slices, args.size, args.size)
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, volume (Z, X, Y) = {shape}")
    row = "{:<8} {:<22} {:>5} {:>8} {:>10} {:>10} {:>8}"
    header = row.format("device", "op", "views", "build s", "forward s", "adjoint s", "fbp s")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    vol_cpu = torch.rand(shape, generator=gen)
    for name in devices:
        device = torch.device(name)
        vol = vol_cpu.to(device)
        for views in args.views:
            proj = ParallelBeamProjector(shape[1:], n_views=views)
            t0 = time.perf_counter()
            proj.matrices(device, torch.float32)
            _sync(device)
            build = time.perf_counter() - t0
            sino = proj(vol)
            t_fwd = timeit(lambda: proj(vol), device, args.repeats)
            t_adj = timeit(lambda: proj.adjoint(sino), device, args.repeats)
            t_fbp = timeit(lambda: proj.fbp(sino), device, args.repeats)
            print(row.format(name, "ct parallel-beam", views, *(f"{t:.3f}" for t in (build, t_fwd, t_adj, t_fbp))))
            del proj, sino
        mask = gaussian_mask_1d(shape[1:], acceleration=8, seed=0, device=device)
        kspace = undersample(vol, mask)
        t_us = timeit(lambda: undersample(vol, mask), device, args.repeats)
        t_dc = timeit(lambda: data_consistency(vol, kspace, mask, output="real"), device, args.repeats)
        # forward column = undersample (fft2c * mask), fbp column = hard data consistency
        print(row.format(name, "mri undersample / DC", "-", "-", f"{t_us:.3f}", "-", f"{t_dc:.3f}"))


if __name__ == "__main__":
    main()
