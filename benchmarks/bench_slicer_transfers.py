"""How long the Slicer panel's main thread is blocked while a big volume goes to the job server and comes back.

For each size (default 256^3 and 512^3 float32) it measures, with the real MRML library (slicer-core):

  read    volume_node_to_array: the input node -> the upload's source (a view, no copy)
  upload  the longest single UploadTransfer.step() of a reconstruction upload to a real local server
          (`meddiffusion serve` on 127.0.0.1, raw NRRD), and the whole upload's duration
  download the longest DownloadTransfer.step() of the server's gzip NRRD answer (served as a file by a
          plain HTTP server process, as the job server would send it), and the whole download's duration
  finish  the node creation from the downloaded array (display window/level + array_to_volume_node)

The GUI is frozen for at most max(read, longest step, finish). Usage (needs a few GB of memory at 512^3):

    python benchmarks/bench_slicer_transfers.py [--sizes 256 512]
"""
from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "MedDiffusion")]

import slicer  # noqa: E402
import vtk  # noqa: E402,F401  (loaded in Slicer already: keep its first import out of the timings)

from MedDiffusionLib.client import RemoteClient  # noqa: E402
from MedDiffusionLogic import mrml_volumes  # noqa: E402
from MedDiffusionLogic.jobs import TRANSFER_BUDGET_S  # noqa: E402
from MedDiffusionLogic.local_server import LocalServer, ServerSpec  # noqa: E402
from MedDiffusionLogic.logic import display_window_level  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drive(transfer) -> tuple[float, float, int]:
    """(longest step, total seconds, steps); the caller's 'timer' fires every 10 ms."""
    longest, began, steps = 0.0, time.monotonic(), 0
    while True:
        t = time.monotonic()
        try:
            done = transfer.step(TRANSFER_BUDGET_S)
        except Exception as exc:  # the upload's job is refused after the upload (see below): that is fine
            longest = max(longest, time.monotonic() - t)
            if "refused" not in str(exc) and "400" not in str(exc) and "unknown" not in str(exc):
                raise
            return longest, time.monotonic() - began, steps + 1
        longest = max(longest, time.monotonic() - t)
        steps += 1
        if done:
            return longest, time.monotonic() - began, steps
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = ap.parse_args()
    scene = slicer.vtkMRMLScene()
    server = LocalServer(env={"OMP_NUM_THREADS": "1"})
    server.ensure(ServerSpec((), "cpu"))
    while not server.poll_ready():
        time.sleep(0.2)
    rows = []
    try:
        for n in args.sizes:
            rng = np.random.default_rng(0)
            arr = (rng.standard_normal((n, n, n), dtype=np.float32) * 300.0 - 200.0)
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"input {n}")
            slicer.util.updateVolumeFromArray(node, arr)
            node.SetSpacing(0.8, 0.8, 1.0)
            del arr
            t = time.monotonic()
            volume = mrml_volumes.volume_node_to_array(node)
            read_s = time.monotonic() - t
            # An anatomy the demo model lacks: the server reads the whole upload, then refuses the job, so the
            # upload is measured without running a 512^3 reconstruction on the CPU.
            upload = server.client(30).start_reconstruct_upload(volume, task="sparse-ct", anatomy="no-such-anatomy")
            up_longest, up_total, up_steps = _drive(upload)

            with tempfile.TemporaryDirectory() as folder:
                job = Path(folder) / "v1" / "jobs" / "bench"
                job.mkdir(parents=True)
                sitk.WriteImage(volume.to_sitk(), str(job / "result.nrrd"), True)  # the server's format
                (job / "result.nrrd").rename(job / "result")
                port = _free_port()
                http_proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                              "--directory", folder], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
                try:
                    time.sleep(1.0)
                    download = RemoteClient(f"http://127.0.0.1:{port}", token="", timeout=30).start_download(
                        "bench", "result", max_voxels=n**3)
                    dl_longest, dl_total, dl_steps = _drive(download)
                finally:
                    http_proc.terminate()
                    http_proc.wait(10)
            t = time.monotonic()
            out = mrml_volumes.array_to_volume_node(download.volume, scene, f"result {n}", display_window_level(
                download.volume.array, "CT", "ct-head-neck"))
            finish_s = time.monotonic() - t
            assert np.array_equal(slicer.util.arrayFromVolume(out), slicer.util.arrayFromVolume(node))
            rows.append((n, read_s, up_longest, up_total, up_steps, dl_longest, dl_total, dl_steps, finish_s))
            scene.RemoveNode(node)
            scene.RemoveNode(out)
            del volume, download, out
    finally:
        server.stop()
    print(f"{'size':>6} {'read s':>7} {'upload: longest step s':>23} {'total s':>8} {'steps':>6} "
          f"{'download: longest step s':>25} {'total s':>8} {'steps':>6} {'node creation s':>16} {'max block s':>12}")
    for n, rd, ul, ut, us, dl, dt, ds, fs in rows:
        print(f"{n:>4}^3 {rd:7.3f} {ul:23.3f} {ut:8.1f} {us:6d} {dl:25.3f} {dt:8.1f} {ds:6d} {fs:16.3f} "
              f"{max(rd, ul, dl, fs):12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
