"""The Slicer module's local job server (MedDiffusionLogic/local_server.py) when it cannot serve: a real
`meddiffusion serve` child started by the logic, as the panel does, with real MRML (slicer-core). A failed start
must end the job with a message that says why (the end of the server's log), never loop on 'starting'."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "MedDiffusion"):  # the module folder holds the MedDiffusionLogic package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from MedDiffusionLogic import local_server  # noqa: E402
from MedDiffusionLogic.backends import LocalBackend  # noqa: E402
from MedDiffusionLogic.logic import MedDiffusionLogic  # noqa: E402
from MedDiffusionLogic.parameters import MedDiffusionParameters  # noqa: E402


@pytest.fixture()
def logic():
    logic = MedDiffusionLogic(slicer.vtkMRMLScene(), LocalBackend())
    logic.local.server.extra_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        yield logic
    finally:
        logic.stop_server()


def test_a_server_that_cannot_load_the_model_fails_the_job_with_its_log(logic, tmp_path):
    """The child exits at once (no model there): the job fails naming the problem; it is not restarted forever."""
    logic.start_generate(MedDiffusionParameters(use_demo_model=False, bundle_dir=str(tmp_path / "no-model-here"),
                                                device="cpu", random_seed=False, ct_hu_range="off"))
    state = logic.wait(120)
    assert state.state == "failed" and "Model bundle not found" in state.error, state.error
    # The child ends cleanly (exit code 2 of the CLI), not with an interpreter abort in place of its message.
    assert "Fatal Python error" not in state.error and "exit code 2" in state.error, state.error
    assert logic.local.server.state == "failed" and logic.finish() == []


def test_a_start_timeout_quotes_the_log(logic, monkeypatch):
    """A server that does not answer in time is stopped (its folder and log deleted): the error quotes the log."""
    monkeypatch.setattr(local_server, "START_TIMEOUT_S", 0.5)  # loading torch alone takes longer
    logic.start_generate(MedDiffusionParameters(random_seed=False, ct_hu_range="off"))
    state = logic.wait(60)
    assert state.state == "failed" and "did not answer within 0.5 s" in state.error, state.error
    assert "End of its log:\nmeddiffusion: loading PyTorch" in state.error, state.error
