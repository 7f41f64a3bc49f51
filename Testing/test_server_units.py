"""In-process checks of the server's building blocks (no HTTP): tokens, uploads, the store and the job queue."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from server_fixture import volume





# Two equal axes: SimpleITK refuses to create such an image, but a file can say so.
SINGULAR_NRRD = (b"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
                 b"space directions: (1,0,0) (1,0,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
                 b"encoding: raw\nspace origin: (0,0,0)\n\n" + bytes(32))


def test_upload_checks_in_process(tmp_path):
    """The validation behind POST /v1/reconstruct, without a server (runs before reconstruction exists)."""
    from MedDiffusionLib.server.uploads import UploadError, check_volume, detect_suffix

    def check(img_or_bytes, name="v.nrrd", max_voxels=10**6):
        p = tmp_path / name
        if isinstance(img_or_bytes, bytes):
            p.write_bytes(img_or_bytes)
        else:
            sitk.WriteImage(img_or_bytes, str(p))
        return check_volume(p, detect_suffix(p, name), max_voxels)

    assert check(volume()).GetSize() == (16, 16, 16)
    assert check(volume(), "v.nii.gz").GetSpacing() == pytest.approx((1, 1, 2))
    assert check(volume(dtype=np.int16), "v.nii").GetSize() == (16, 16, 16)
    cases = [(b"\x00garbage" * 100, "v.bin", "neither NRRD nor NIfTI"),
             (b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\ndata file: /etc/passwd\nencoding: raw\n\n",
              "v.nrrd", "detached"),
             (b"NRRD0004\nthis is not a header\n\n", "v.nrrd", "malformed NRRD header line"),
             (sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), "v.nrrd", "2D"),
             (volume(nan=True), "v.nrrd", "NaN"),
             (volume(spacing=(1.0, 1.0, 250.0)), "v.nrrd", "spacing"),
             (sitk.Compose(volume(), volume()), "v.nrrd", "components"),
             (volume(size=(128, 128, 128)), "v.nrrd", "voxels"),
             (SINGULAR_NRRD, "v.nrrd", "direction")]
    for data, name, message in cases:
        with pytest.raises(UploadError, match=message) as err:
            check(data, name)
        assert err.value.status == 400


def test_security_helpers():
    from MedDiffusionLib.server.security import TokenVerifier, is_loopback, is_valid_job_id, new_job_id

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.0.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "gpu-host", ""))
    token = "s" * 24
    v = TokenVerifier(token)
    assert v.check(f"Bearer {token}") and v.check(f"bearer {token}")
    assert not any(v.check(h) for h in (None, "", token, f"Basic {token}", f"Bearer {token[:-1]}", "Bearer "))
    assert TokenVerifier(None).check(None)
    job = new_job_id()
    assert is_valid_job_id(job) and not is_valid_job_id("../" + job[3:]) and not is_valid_job_id(job + "x")


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_job_manager_queue_cancel_and_store(tmp_path):
    from MedDiffusionLib.progress import ProgressTracker
    from MedDiffusionLib.server.jobs import JobManager, QueueFull, RunOutput
    from MedDiffusionLib.server.store import RESTART_REASON, JobStore

    gate = threading.Event()

    def runner(rec, _input, progress, cancel):
        tracker = ProgressTracker(1000, progress, cancel)
        tracker.begin()
        while rec.params.get("slow"):
            time.sleep(0.005)
            tracker.advance()  # raises Cancelled once cancel is set
        gate.wait(5)
        if rec.params.get("fail"):
            raise MemoryError()
        return RunOutput({"result": volume(size=(4, 4, 4))}, {"n": 1})

    store = JobStore(tmp_path, ttl_s=3600)
    mgr = JobManager(store, {"generate": runner}, max_queue=1)
    mgr.start()
    try:
        slow = mgr.submit("generate", {"slow": True})
        _wait(lambda: store.get(slow.id).state == "running" and store.get(slow.id).current.step)
        waiting = mgr.submit("generate", {})
        with pytest.raises(QueueFull):
            mgr.submit("generate", {})
        assert mgr.queue_position(waiting.id) == 1
        mgr.cancel(slow.id)
        _wait(lambda: store.get(slow.id).state == "cancelled")
        gate.set()
        _wait(lambda: store.get(waiting.id).state == "done")
        rec = store.get(waiting.id)
        assert rec.outputs == ["result"] and rec.progress == 1.0 and store.output_path(rec, "result").is_file()
        failing = mgr.submit("generate", {"fail": True})
        _wait(lambda: store.get(failing.id).state == "failed")
        assert "out of memory" in store.get(failing.id).error
        stuck = mgr.submit("generate", {"slow": True})
        _wait(lambda: store.get(stuck.id).state == "running")
    finally:
        mgr.shutdown(timeout=10)
    # A new store on the same folder: results kept, the interrupted job failed with the reason, TTL applies.
    again = JobStore(tmp_path, ttl_s=3600)
    again.recover()
    assert again.get(waiting.id).state == "done" and again.get(stuck.id).error == RESTART_REASON
    expired = JobStore(tmp_path, ttl_s=0.0)
    expired.recover()
    assert expired.get(waiting.id) is None and not (tmp_path / "jobs" / waiting.id).exists()
