"""The shared progress and job-status types (MedDiffusionLib.progress): the JSON form the server sends and the
client reads, and the status line every front end shows."""
from __future__ import annotations

import subprocess
import sys

import pytest

from MedDiffusionLib.progress import JobStatus, ProgressInfo
from MedDiffusionLib.results import GenerationResult, ReconstructionResult, result_from_info


def test_job_status_json_round_trip_keeps_every_field():
    st = JobStatus(state="running", kind="reconstruct", id="ab" * 16,
                   current=ProgressInfo(3, 7, 0.1 + 0.2, 1 / 3, "decoding"), progress=0.925, elapsed_s=12.5,
                   error=None, created=1_700_000_000.25, started=1_700_000_001.5, params={"task": "mri", "views": 30},
                   outputs=("result", "degraded"), info={"seed": 3})
    back = JobStatus.from_json(st.to_json())
    assert back == st and back.current == st.current


def test_from_json_ignores_new_fields_and_defaults_missing_ones():
    st = JobStatus.from_json({"id": "x", "kind": "generate", "state": "queued", "queue_position": 2,
                              "progress": 0, "some_future_field": [1, 2]})
    assert st.state == "queued" and st.current is None and st.queue_position == 2 and st.running and not st.ended
    assert st.describe().startswith("queued on the server (position 2), 0:00 elapsed")


@pytest.mark.parametrize("state, line", [
    (JobStatus(), "Ready."),
    (JobStatus(state="running", current=ProgressInfo(12, 50, 21.0, 34.0, "sampling"), elapsed_s=21.0),
     "sampling: step 12/50, 0:21 elapsed, about 0:34 left"),
    (JobStatus(state="running", current=ProgressInfo(0, 0, stage="uploading (3 MB sent)"), elapsed_s=3725),
     "uploading (3 MB sent), 1:02:05 elapsed"),
    (JobStatus(state="failed", error="the server ran out of memory"), "Failed: the server ran out of memory"),
    (JobStatus(state="cancelled"), "Cancelled."),
    (JobStatus(state="done", elapsed_s=61.4), "Done in 1:01."),
])
def test_describe(state, line):
    assert state.describe() == line


def test_results_info_round_trip_without_volumes():
    made = GenerationResult(object(), "ct-legs", "CT", 5, "ddim", 20, (64, 64, 32), 2.5, (1.0, 1.0, 2.0), "cpu",
                            ("trained at 128x128x64",))
    info = made.info()
    assert "image" not in info and info["size_xyz"] == [64, 64, 32]
    back = result_from_info("generate", info)
    assert isinstance(back, GenerationResult) and back.image is None and back.size_xyz == (64, 64, 32)
    assert back.info() == info
    recon = ReconstructionResult(None, None, "mri", "tv", True, True, psnr=float("nan"), metric_range=(0.0, 1.0))
    rinfo = recon.info()
    assert "degraded" not in rinfo and rinfo["psnr"] is None  # NaN has no JSON form
    assert result_from_info("reconstruct", rinfo).modality == "MR"


def test_shared_types_import_without_torch():
    code = ("import sys; import MedDiffusionLib.progress, MedDiffusionLib.results, MedDiffusionLib.client; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
