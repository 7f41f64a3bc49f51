"""The Slicer panel's download path (MedDiffusionLogic/model_downloads.py): `models pull` children against the
loopback Hub, read through their progress file: the size asked before anything is downloaded, the download to
done, a declined download, Cancel mid-file."""
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

from MedDiffusionLogic.local_server import CHILD, LIB_ROOT  # noqa: E402
from MedDiffusionLogic.model_downloads import (  # noqa: E402
    CommandStatus, DownloadFlow, FlowEvent, ModelCommand, model_choices, model_folder)

LAUNCHER = [sys.executable, str(CHILD), str(LIB_ROOT)]  # as the panel runs it (local_server.py)

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
                     OMP_NUM_THREADS="1")
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


def _run(flow: DownloadFlow, answer: bool, timeout: float = 120.0) -> tuple[FlowEvent, list[FlowEvent]]:
    """Tick the flow like the panel's timer; answer the consent question with ``answer``."""
    events: list[FlowEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = flow.step()
        events.append(ev)
        if ev.kind == "confirm":
            flow.consent(answer)
            if not answer:
                return ev, events
        elif ev.kind != "working":
            return ev, events
        time.sleep(0.1)
    raise AssertionError(f"timed out: {events[-3:]}")


def test_flow_asks_with_sizes_then_downloads(env, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, child_env, tmp = env
    flow = DownloadFlow("official-8x", LAUNCHER, child_env)
    last, events = _run(flow, answer=True)
    assert last.kind == "done", (last, events[-3:])
    question = next(e.text for e in events if e.kind == "confirm")
    from MedDiffusionLib.registry import human_bytes

    total = sum(len(b) for b in fake.repos[HUB_REPO].files.values())
    assert AE8 in question and DN8 in question and human_bytes(total) in question and HUB_REPO in question
    assert any(e.kind == "working" and "Downloading official-8x" in e.text for e in events)
    assert Path(last.path) == tmp / "models" / "official-8x" and (Path(last.path) / "model.yaml").is_file()
    assert not flow.active
    # The panel's list now offers it as ready, and its anatomy lists come from model.yaml without torch.
    monkeypatch.setenv("MEDDIFFUSION_MODELS_DIR", child_env["MEDDIFFUSION_MODELS_DIR"])
    choice = next(c for c in model_choices() if c.name == "official-8x")
    assert choice.available and not choice.downloadable
    assert model_folder("official-8x") == Path(last.path)


def test_flow_declined_downloads_nothing(env, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, child_env, tmp = env
    last, _ = _run(DownloadFlow("official-8x", LAUNCHER, child_env), answer=False)
    assert last.kind == "confirm"
    assert not any(m == "GET" and "/resolve/" in path for m, path, _ in fake.requests)
    assert not (tmp / "models" / "official-8x").exists()
    monkeypatch.setenv("MEDDIFFUSION_MODELS_DIR", child_env["MEDDIFFUSION_MODELS_DIR"])
    choice = next(c for c in model_choices() if c.name == "official-8x")
    assert choice.downloadable and "not downloaded" in choice.label
    with pytest.raises(Exception, match="click Download"):
        model_folder("official-8x")


def test_cancel_mid_download_leaves_nothing_half_done(env) -> None:
    fake, child_env, tmp = env
    fake.slow[DN8] = 0.01  # ~6 MB/s: a download long enough to cancel
    pull = ModelCommand.pull("official-8x", LAUNCHER, child_env)
    seen = _wait(pull, lambda s: s.stage == "download" and s.done_bytes > len(fake.repos[HUB_REPO].files[AE8]))
    assert 0 < seen.fraction < 1 and seen.total_bytes == sum(map(len, fake.repos[HUB_REPO].files.values()))
    pull.cancel()
    status = pull.poll()
    assert status.state == "cancelled" and pull.proc.returncode is not None
    pull.close()
    assert not (tmp / "models" / "official-8x").exists()
    leftovers = [p.name for p in (tmp / "hf" / "hub").rglob("*.incomplete")]
    assert leftovers == []  # the child unwound on SIGTERM and removed its partial download


def test_panel_model_selection_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import make_tiny_bundle
    from MedDiffusionLogic.backends import LocalBackend, model_args
    from MedDiffusionLogic.parameters import MedDiffusionParameters

    from MedDiffusionLib.cli import main

    monkeypatch.setenv("MEDDIFFUSION_MODELS_DIR", str(tmp_path / "models"))
    folder = make_tiny_bundle(tmp_path / "mine", name="tiny-mine")
    assert main(["models", "add", "mine", str(folder)]) == 0
    params = MedDiffusionParameters(use_demo_model=False, model_name="mine")
    assert model_args(params) == ("--model", "mine")  # the server child resolves the name itself
    summary = LocalBackend().model_summary(params)
    assert summary.name == "tiny-mine" and any(a.name == "ct-head-neck" for a in summary.anatomies)
    assert [c.name for c in model_choices()] == ["demo", "official-8x", "official-4x", "mine"]
    with pytest.raises(Exception, match="click Download"):
        LocalBackend().model_summary(MedDiffusionParameters(use_demo_model=False, model_name="official-4x"))
    # The demo switch still wins, as before: the model list's 'demo' entry sets it.
    assert model_args(MedDiffusionParameters(use_demo_model=True, model_name="mine")) == ()
