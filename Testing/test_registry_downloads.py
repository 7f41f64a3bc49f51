"""The Slicer panel's download path (MedDiffusionLogic/model_downloads.py): `models pull` children against the
loopback Hub, read through their progress file: plan with sizes, download to done, cancel mid-file."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub
from official_files import write_official_autoencoder, write_official_biflownet

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "MedDiffusion") not in sys.path:
    sys.path.insert(0, str(REPO / "MedDiffusion"))

from MedDiffusionLogic.model_downloads import CommandStatus, ModelCommand  # noqa: E402

HUB_REPO = "MMorss/3D-MedDiffusion"
AE8, DN8 = "PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("files")
    # huggingface_hub reports progress per 10 MiB chunk: a denoiser file of 2+ chunks shows progress mid-file.
    return {AE8: write_official_autoencoder(d / AE8, downsample=8).read_bytes(),
            DN8: write_official_biflownet(d / DN8, patch_size=1, pad_bytes=16 << 20).read_bytes()}


@pytest.fixture()
def env(tmp_path: Path, files: dict[str, bytes]):
    fake = FakeHub()
    fake.add_repo(HUB_REPO, files)
    url = fake.start()
    import os

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    child_env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), MEDDIFFUSION_MODELS_DIR=str(tmp_path / "models"),
                     OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    yield fake, child_env, tmp_path
    fake.stop()


def _wait(cmd: ModelCommand, until, timeout: float = 120.0) -> CommandStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cmd.poll()
        if until(status):
            return status
        time.sleep(0.1)  # the panel's timer
    raise AssertionError(f"timed out; last status {cmd.poll()}; log: {cmd.log_tail()}")


def test_plan_then_pull_reports_progress_to_done(env) -> None:
    fake, child_env, tmp = env
    plan = ModelCommand.plan("official-8x", sys.executable, child_env, str(REPO))
    status = _wait(plan, lambda s: s.finished)
    plan.close()
    assert status.state == "planned", status
    assert status.plan["download_bytes"] == sum(len(b) for b in fake.repos[HUB_REPO].files.values())
    assert {f["path"] for f in status.plan["files"]} == {AE8, DN8}
    pull = ModelCommand.pull("official-8x", sys.executable, child_env, str(REPO))
    status = _wait(pull, lambda s: s.finished)
    pull.close()
    assert status.state == "done", (status, pull.log_tail())
    assert Path(status.path) == tmp / "models" / "official-8x" and (Path(status.path) / "model.yaml").is_file()


def test_cancel_mid_download_leaves_nothing_half_done(env) -> None:
    fake, child_env, tmp = env
    fake.slow[DN8] = 0.01  # ~6 MB/s: a download long enough to cancel
    pull = ModelCommand.pull("official-8x", sys.executable, child_env, str(REPO))
    seen = _wait(pull, lambda s: s.stage == "download" and s.done_bytes > len(fake.repos[HUB_REPO].files[AE8]))
    assert 0 < seen.fraction < 1 and seen.total_bytes == sum(map(len, fake.repos[HUB_REPO].files.values()))
    pull.cancel()
    status = pull.poll()
    assert status.state == "cancelled" and pull.proc.returncode is not None
    pull.close()
    assert not (tmp / "models" / "official-8x").exists()
    leftovers = [p.name for p in (tmp / "hf" / "hub").rglob("*.incomplete")]
    assert leftovers == []  # the child unwound on SIGTERM and removed its partial download
