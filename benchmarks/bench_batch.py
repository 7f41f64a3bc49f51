"""Dataset generation throughput: volumes per hour per device, batching, and scaling from 1 to N processes.

Runs `meddiffusion generate --count` as real subprocesses (torchrun with gloo for several processes, every
process with the same number of CPU threads) on the demo model and prints a table. The rate counts generation
time only (each rank prints its own; the job's time is its slowest rank), not Python start-up and model loading.

    python benchmarks/bench_batch.py                                # demo model, CPU: 1 vs 2 processes, batch 1 vs 4
    python benchmarks/bench_batch.py --count 16 --steps 25 --procs 1 2 --batch-sizes 1
    # GPUs (one process per GPU): the same command the README shows, e.g.
    #   torchrun --nproc_per_node=8 -m MedDiffusionLib generate --anatomy ct-legs --count 800 --batch-size 4 \
    #       --steps 50 --seed 1 --out-dir synth/
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK_LINE = re.compile(r"generated (\d+) volume\(s\) on (\S+?)(?: \(rank \d+ of \d+\))? in ([\d.]+) s")


def run(procs: int, batch: int, args: argparse.Namespace, out: Path) -> dict:
    cli = ["-m", "MedDiffusionLib", "generate", "--anatomy", *args.anatomy, "--count", str(args.count),
           "--steps", str(args.steps), "--sampler", args.sampler, "--seed", "1", "--batch-size", str(batch),
           "--device", args.device, "--quiet", "--out-dir", str(out)]
    if args.model:
        cli += ["--model", args.model]
    cmd = [sys.executable, *cli] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cli]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    ranks = [(int(n), dev, float(s)) for n, dev, s in RANK_LINE.findall(proc.stdout + proc.stderr)]
    if len(ranks) != procs or sum(n for n, _, _ in ranks) != args.count:
        sys.exit(f"could not read the per-rank lines:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    gen_s = max(s for _, _, s in ranks)
    return {"procs": procs, "batch": batch, "device": ranks[0][1], "gen_s": gen_s, "wall_s": wall,
            "vph": args.count / gen_s * 3600, "vph_dev": args.count / gen_s * 3600 / procs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="bundle folder (default: the demo model)")
    ap.add_argument("--anatomy", nargs="+", default=["ct-legs"])
    ap.add_argument("--count", type=int, default=8, help="volumes per run (a multiple of procs x batch is fairest)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampler", default="dpmpp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        for batch in args.batch_sizes:
            for procs in args.procs:
                out = Path(tmp) / f"p{procs}_b{batch}"
                rows.append(run(procs, batch, args, out))
                shutil.rmtree(out, ignore_errors=True)
                r = rows[-1]
                print(f"  {procs} proc x batch {batch}: {r['gen_s']:.1f} s generating, {r['wall_s']:.1f} s wall",
                      file=sys.stderr, flush=True)
    base = {r["batch"]: r["vph"] for r in rows if r["procs"] == min(args.procs)}
    print(f"\n{args.count} x {' '.join(args.anatomy)}, {args.sampler} {args.steps} steps, {args.threads} CPU "
          f"thread(s) per process, load average before: {os.getloadavg()[0]:.1f}")
    print("| processes | batch | device | generating (s) | volumes/hour | per device | scaling |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['batch']} | {r['device']} | {r['gen_s']:.1f} | {r['vph']:.0f} | "
              f"{r['vph_dev']:.0f} | {r['vph'] / base[r['batch']]:.2f}x |")


if __name__ == "__main__":
    main()
