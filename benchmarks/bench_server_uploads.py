#!/usr/bin/env python
"""Memory of the job server while it checks uploads: peak growth and memory still held afterwards.

Starts `python -m MedDiffusionLib serve` (tiny random model, CPU, loopback) and sends, one after another, hostile
and legitimate uploads, reading the server process's VmHWM (reset through /proc/PID/clear_refs) and VmRSS::

    python benchmarks/bench_server_uploads.py [--side 256]     # about 2 GB of memory at its peak

Prints one table row per upload: HTTP status, peak growth, memory held 2 s later (all in MB).
"""
from __future__ import annotations

import argparse
import gzip
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))
MB = 2**20


def status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def nrrd(sizes: tuple[int, int, int], type_: str, encoding: str, data: bytes) -> bytes:
    head = (f"NRRD0004\ntype: {type_}\ndimension: 3\nsizes: {sizes[0]} {sizes[1]} {sizes[2]}\nendian: little\n"
            f"encoding: {encoding}\nspace: left-posterior-superior\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\n\n")
    return head.encode() + data


def post(url: str, token: str, data: bytes) -> int:
    from MedDiffusionLib.client import _multipart

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.nrrd"
        p.write_bytes(data)
        body, boundary, _ = _multipart({"task": "sparse-ct", "views": 4, "steps": 1}, p)
        req = urllib.request.Request(url + "/v1/reconstruct", data=b"".join(body), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=256, help="side of the legitimate float32 volumes (default 256)")
    args = ap.parse_args()
    from helpers import make_tiny_bundle

    tmp = Path(tempfile.mkdtemp(prefix="bench-uploads-"))
    model = make_tiny_bundle(tmp / "model", controlnets=True)
    token = secrets.token_urlsafe(32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MEDDIFFUSION_TOKEN=token, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "MedDiffusionLib", "serve", "--port", str(port), "--device",
                             "cpu", "--model", str(model), "--store", str(tmp / "store"), "--max-upload-mb", "2048",
                             "--max-queue", "64", "--log-level", "warning"], cwd=REPO, env=env,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        n = args.side
        import numpy as np

        # Decoded in full, then refused for its one NaN voxel (the last check): the whole validation path runs
        # and no job starts, so the memory held afterwards is the validation's alone.
        noisy = np.random.default_rng(0).normal(size=n**3).astype("<f4")
        noisy[-1] = np.nan
        zeros = np.zeros(n**3, "<f4")
        zeros[-1] = np.nan
        cases = [
            ("1.2 KB declaring 512^3 doubles", nrrd((512, 512, 512), "double", "raw", bytes(1024))),
            ("gzip bomb: 1 MB -> 1 GiB, declared 512^3 float", nrrd((512, 512, 512), "float", "gzip",
                                                                   gzip.compress(bytes(1024 * MB), 9))),
            (f"{n}^3 float32 raw, decoded, refused (NaN)", nrrd((n, n, n), "float", "raw", noisy.tobytes())),
            (f"{n}^3 float32 gzip, decoded, refused (NaN)", nrrd((n, n, n), "float", "gzip",
                                                                gzip.compress(zeros.tobytes(), 6))),
        ]
        print(f"| upload | bytes sent | HTTP | peak growth MB | held after 2 s MB |")
        print("|---|---|---|---|---|")
        for name, data in cases:
            with open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
                fh.write("5")
            before = status_bytes(proc.pid, "VmRSS")
            code = post(url, token, data)
            peak = status_bytes(proc.pid, "VmHWM") - before
            time.sleep(2)
            held = status_bytes(proc.pid, "VmRSS") - before
            print(f"| {name} | {len(data) / MB:.1f} MB | {code} | {peak / MB:.0f} | {held / MB:.0f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
