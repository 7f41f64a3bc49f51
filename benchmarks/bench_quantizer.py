"""Benchmark: time and peak extra memory of the chunked nearest-code search of VectorQuantizer.

Each case runs in a fresh subprocess so the process peak RSS (ru_maxrss) belongs to that case alone; the
extra memory is that peak minus the resident size just before quantizing (latent and codebook already
allocated). On CUDA the peak comes from torch.cuda.max_memory_allocated. Prints a table, asserts nothing.

    python benchmarks/bench_quantizer.py [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [(16, 8192), (32, 8192), (64, 8192), (64, 512)]  # (latent edge, codebook size)
EMBEDDING_DIM = 8


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc); elsewhere the peak so far (a conservative baseline)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def worker(edge: int, n_codes: int, device: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from MedDiffusionLib.models.quantizer import VectorQuantizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = VectorQuantizer(n_codes, EMBEDDING_DIM).to(device).eval()
    z = torch.randn(1, EMBEDDING_DIM, edge, edge, edge, device=device)
    q.lookup(z[:, :, :1, :1, :4])  # load kernels / BLAS with a negligible allocation
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    z_q, idx = q.lookup(z)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return dict(edge=edge, codes=n_codes, seconds=seconds, extra_mib=(peak - base) / 2 ** 20,
                rows_per_block=q._block_rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, type=int, metavar=("EDGE", "CODES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device, args.threads)))
        return

    print(f"VectorQuantizer.lookup, embedding_dim {EMBEDDING_DIM}, device {args.device}, threads {args.threads}")
    header = f"{'latent':>16} {'vectors':>9} {'codes':>6} {'time s':>8} {'peak extra MiB':>15} " \
             f"{'full NxK matrix MiB':>20}"
    print(header)
    print("-" * len(header))
    for edge, n_codes in CASES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--threads",
               str(args.threads), "--worker", str(edge), str(n_codes)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, encoding="utf-8", errors="replace").stdout.splitlines()[-1])
        n = edge ** 3
        naive_mib = n * n_codes * 4 / 2 ** 20  # what a one-shot distance matrix (or one-hot) would need
        latent = f"1x{EMBEDDING_DIM}x{edge}x{edge}x{edge}"
        print(f"{latent:>16} {n:>9} {n_codes:>6} {res['seconds']:>8.2f} {res['extra_mib']:>15.1f} "
              f"{naive_mib:>20.0f}")
    print("peak extra = process peak minus resident size before the call (CPU) / CUDA allocator peak (GPU)")


if __name__ == "__main__":
    main()
