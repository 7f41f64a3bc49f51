"""Time one BiFlowNet forward (random weights; speed does not depend on their values).

    python benchmarks/bench_biflownet.py --device cpu --repeats 5
    python benchmarks/bench_biflownet.py --device cuda --dtype bf16 --latent 32 32 32 --latent 64 64 64

GFLOP/s uses the measured FLOP count of torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and
attention; about 318 GFLOP for the official 8x model on a 32^3 latent).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MedDiffusionLib.models.biflownet import BiFlowNet  # noqa: E402

CONFIGS = {"8x": dict(patch_size=1), "4x": dict(patch_size=2)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(model: BiFlowNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, res: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x, t, y, res)
    return float(fc.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: BiFlowNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, res: torch.Tensor,
                 repeats: int, dtype: torch.dtype | None, warmup: int = 1) -> List[float]:
    device = x.device
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            model(x, t, y, res)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--config", choices=sorted(CONFIGS), action="append", help="official config(s); default 8x")
    p.add_argument("--latent", type=int, nargs=3, action="append", metavar=("D", "H", "W"),
                   help="latent size(s); default 32 32 32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    header = f"{'config':<7}{'latent':<14}{'batch':>5}  {'device':<8}{'dtype':<6}{'median s':>10}{'min s':>8}{'GFLOP':>8}{'GFLOP/s':>9}"
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for name in args.config or ["8x"]:
        model = BiFlowNet(**CONFIGS[name]).to(device).eval()
        for size in args.latent or [[32, 32, 32]]:
            x = torch.randn(args.batch, 8, *size, device=device)
            t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
            y = torch.zeros(args.batch, device=device, dtype=torch.long)
            res = torch.tensor([s / 64 for s in size], device=device).expand(args.batch, 3)
            flops = count_flops(model, x, t, y, res) / 1e9
            times = time_forward(model, x, t, y, res, args.repeats, dtype)
            med = statistics.median(times)
            lat = "x".join(map(str, size))
            print(f"{name:<7}{lat:<14}{args.batch:>5}  {device.type:<8}{args.dtype:<6}{med:>10.3f}{min(times):>8.3f}"
                  f"{flops:>8.0f}{flops / med:>9.0f}")


if __name__ == "__main__":
    main()
