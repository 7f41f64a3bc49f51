"""Time one BiFlowNet forward (random weights; speed does not depend on their values).

    python benchmarks/bench_biflownet.py --device cpu --repeats 5
    python benchmarks/bench_biflownet.py --device cuda --dtype bf16 --latent 32 32 32 --latent 64 64 64

GFLOP/s uses the model FLOPs counted by torch.utils.flop_counter.FlopCounterMode on the meta device (convolutions,
matmuls and attention, without this implementation's zero head padding): 343 GFLOP for the official 8x model on
a 32^3 latent, of which 25 are attention (the often quoted 318 GFLOP leaves attention out).
The machine may be shared: compare numbers from one run (--plain adds a baseline row measured alongside).
"""
from __future__ import annotations

import argparse
import contextlib
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
DEFAULT_LATENT = {"8x": [32, 32, 32], "4x": [64, 64, 64]}  # the same 256^3 volume


@contextlib.contextmanager
def plain_kernels(enabled: bool):
    """Switch off this implementation's CPU fast paths (channels-last, direct oneDNN, head padding, chunking)."""
    from MedDiffusionLib.models import biflownet, dit, unet_blocks

    saved = (biflownet.CPU_CHANNELS_LAST, unet_blocks.ONEDNN_DIRECT, dit.CPU_TOKEN_CHUNK, dit.DiTAttention.pad_heads_to)
    if enabled:
        biflownet.CPU_CHANNELS_LAST, unet_blocks.ONEDNN_DIRECT, dit.CPU_TOKEN_CHUNK = False, False, 0
        dit.DiTAttention.pad_heads_to = 1
    try:
        yield
    finally:
        (biflownet.CPU_CHANNELS_LAST, unet_blocks.ONEDNN_DIRECT, dit.CPU_TOKEN_CHUNK,
         dit.DiTAttention.pad_heads_to) = saved
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(config: dict, batch: int, size: Sequence[int]) -> float:
    """Model FLOPs of one forward, counted on the meta device (no compute) without the zero head padding."""
    from torch.utils.flop_counter import FlopCounterMode

    from MedDiffusionLib.models.dit import DiTAttention

    with torch.device("meta"):
        model = BiFlowNet(**config)
        x, t, y, res = make_inputs(batch, size, torch.device("meta"))
    pad, DiTAttention.pad_heads_to = DiTAttention.pad_heads_to, 1
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.decode(model.encoder(x, model.condition(t, y, res)), model.condition(t, y, res))
    finally:
        DiTAttention.pad_heads_to = pad
    return float(fc.get_total_flops())


def make_inputs(batch: int, size: Sequence[int], device: torch.device):
    x = torch.randn(batch, 8, *size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    y = torch.zeros(batch, device=device, dtype=torch.long)
    res = torch.tensor([s / 64 for s in size], device=device).expand(batch, 3)
    return x, t, y, res


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
                   help="latent size(s); default 32^3 for 8x, 64^3 for 4x")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--plain", action="store_true",
                   help="also time with the fast paths switched off (same machine, same moment: a fair baseline)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    words = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    print("command: python " + " ".join(shlex.quote(a) for a in words))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    header = (f"{'config':<7}{'kernels':<8}{'latent':<14}{'batch':>5}  {'device':<8}{'dtype':<6}{'median s':>10}"
              f"{'min s':>8}{'GFLOP':>8}{'GFLOP/s':>9}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for name in args.config or ["8x"]:
        model = BiFlowNet(**CONFIGS[name]).to(device).eval()
        for size in args.latent or [DEFAULT_LATENT[name]]:
            x, t, y, res = make_inputs(args.batch, size, device)
            flops = count_flops(model.config, args.batch, size) / 1e9
            lat = "x".join(map(str, size))
            for plain in [False, True] if args.plain else [False]:
                with plain_kernels(plain):
                    times = time_forward(model, x, t, y, res, args.repeats, dtype)
                med = statistics.median(times)
                print(f"{name:<7}{'plain' if plain else 'fast':<8}{lat:<14}{args.batch:>5}  {device.type:<8}"
                      f"{args.dtype:<6}{med:>10.3f}{min(times):>8.3f}{flops:>8.0f}{flops / med:>9.0f}")


if __name__ == "__main__":
    main()
