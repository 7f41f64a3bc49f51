"""`generate --count` under torchrun (2 processes, gloo on CPU): the same files, bit for bit, as one process;
a run killed midway resumes to the same files."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_tiny_bundle

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun + gloo on CPU: Linux/macOS")

# One intra-op thread everywhere: CPU kernels split reductions by thread count, which changes float rounding.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def args(bundle: Path, out: Path, count: int, steps: int) -> list[str]:
    return ["-m", "MedDiffusionLib", "generate", "--anatomy", "ct-legs:2", "mr-knee:1", "ct-chest-abdomen:1",
            "--count", str(count), "--out-dir", str(out), "--steps", str(steps), "--sampler", "ddpm", "--seed", "5",
            "--batch-size", "2", "--device", "cpu", "--quiet", "--model", str(bundle)]


def single(bundle: Path, out: Path, count: int, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args(bundle, out, count, steps)], env=ENV, capture_output=True,
                          text=True, timeout=300)


def torchrun_cmd(bundle: Path, out: Path, count: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *args(bundle, out, count, steps)]


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# One dataset for both tests: 3 rounds of 2 ranks x batch 2, so a kill after the first round leaves two to
# resume. Each round is ~20 denoiser calls, far longer than the 20 ms poll, so the kill lands mid-run.
COUNT, STEPS = 12, 20


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory) -> dict[str, str]:
    """File hashes of the dataset written by one process (shared: each process start costs seconds)."""
    out = tmp_path_factory.mktemp("one") / "out"
    ref = single(bundle, out, COUNT, STEPS)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return hashes(out)


def test_two_processes_write_the_same_files_as_one(bundle, reference, tmp_path):
    proc = subprocess.run(torchrun_cmd(bundle, tmp_path / "two", COUNT, STEPS), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Both ranks worked (each prints its own count) and rank 0 wrote the manifest.
    assert "(rank 0 of 2)" in proc.stdout + proc.stderr and "(rank 1 of 2)" in proc.stdout + proc.stderr
    assert len(reference) == COUNT + 2 and "manifest.csv" in reference and "run.json" in reference
    assert hashes(tmp_path / "two") == reference


def test_killed_distributed_run_resumes_to_the_same_files(bundle, reference, tmp_path):
    count, steps = COUNT, STEPS
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(bundle, out, count, steps), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / ".entries").glob("*.json")) if (out / ".entries").is_dir() else []
            if len(done) >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: torchrun and both ranks, mid-write or not
        proc.wait()
    finished = len(list((out / ".entries").glob("*.json")))
    assert 3 <= finished < count, f"the kill should land mid-run ({finished} of {count} done)"
    assert not (out / "manifest.csv").exists()
    resumed = subprocess.run(torchrun_cmd(bundle, out, count, steps), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "were already complete" in resumed.stdout
    assert hashes(out) == reference
    assert not list(out.glob(".*.tmp*"))
