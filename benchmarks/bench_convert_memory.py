"""Benchmark: peak extra memory of converting the authors' checkpoint files to a safetensors bundle.

The target (issue: "models pull" converts right after download) is a peak under twice the checkpoint's size.
Files are written in the authors' formats (Testing/official_files.py): a BiFlowNet of the official structure at a
reduced width (model + EMA + Adam moments, as the authors save it) and the official 8x autoencoder (Lightning
checkpoint). Each conversion runs in a fresh subprocess, after a tiny warm-up conversion (imports, kernels), so
its peak RSS (VmHWM) minus the resident size just before it is the conversion's own. Prints a table.

    python benchmarks/bench_convert_memory.py [--dim 48] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "Testing")]

# The official BiFlowNet structure (OFFICIAL.md, 24 GroupNorm groups) at width `dim` (a multiple of 24).
OFFICIAL_BIFLOWNET = dict(channels=8, num_classes=7, patch_size=1, dim_mults=(1, 1, 2, 4, 8), use_attn=(0, 0, 0, 1, 1),
                          dit_num_heads=8, attn_heads=8, attn_dim_head=32, sub_volume_size=8, num_mid_dit=1, vq_size=64)
OFFICIAL_AE_8X = dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24, image_channels=1)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec, and the parent
    # holds the freshly written files; VmHWM belongs to this process image alone.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(case: str, folder: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from official_files import write_official_autoencoder, write_official_biflownet

    from MedDiffusionLib.registry.convert import ExpectedConfig, _convert_one, convert_to_bundle

    warm = folder / f"warm-{case}"
    warm.mkdir()
    convert_to_bundle(write_official_autoencoder(warm / "ae.ckpt", downsample=8),
                      write_official_biflownet(warm / "dn.pt", patch_size=1), warm / "bundle", "warm")
    ae, dn = folder / "ae8x.ckpt", folder / "biflownet.pt"
    if case == "biflownet":
        base, t = _rss(), time.perf_counter()
        _convert_one(dn, folder / f"out-{case}.safetensors", "denoiser", ExpectedConfig(), dn.name, {})
        size = dn.stat().st_size
    elif case == "autoencoder":
        base, t = _rss(), time.perf_counter()
        _convert_one(ae, folder / f"out-{case}.safetensors", "autoencoder", ExpectedConfig(), ae.name, {})
        size = ae.stat().st_size
    else:  # the whole bundle, as `models pull` runs it (both networks, then a load check)
        base, t = _rss(), time.perf_counter()
        convert_to_bundle(ae, dn, folder / f"bundle-{case}", "bench")
        size = max(ae.stat().st_size, dn.stat().st_size)
    return {"case": case, "size": size, "extra": _peak() - base, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=48, help="BiFlowNet width, a multiple of 24 (official: 72)")
    ap.add_argument("--keep", metavar="DIR", help="write the files here instead of a temporary folder")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return
    import torch

    from official_files import write_official_autoencoder, write_official_biflownet

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = {**OFFICIAL_BIFLOWNET, "dim": args.dim, "resnet_groups": 24}
    write_official_biflownet(folder / "biflownet.pt", config=cfg)
    write_official_autoencoder(folder / "ae8x.ckpt", downsample=8, config=OFFICIAL_AE_8X)
    print(f"files in {folder}: BiFlowNet dim {args.dim} (model + ema + Adam moments), official 8x autoencoder")
    print(f"{'case':<12} {'file MB':>8} {'peak extra MB':>14} {'peak / file':>12} {'seconds':>8}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for case in ("autoencoder", "biflownet", "bundle"):
        out = subprocess.run([sys.executable, __file__, "--worker", case, str(folder)], env=env, check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{case:<12} {r['size'] / 1e6:>8.1f} {r['extra'] / 1e6:>14.1f} {r['extra'] / r['size']:>12.2f} "
              f"{r['seconds']:>8.1f}")
    print("bundle: both networks and the final load check; its ratio is to the larger file")


if __name__ == "__main__":
    main()
