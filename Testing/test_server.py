"""The job server end to end: real `meddiffusion serve` subprocesses on 127.0.0.1, a tiny random model, and
the standard-library RemoteClient / urllib as clients. Servers are module-scoped to keep the file fast."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.client import (AuthenticationError, JobCancelled, JobNotFound, QueueFullError, RemoteClient,
                                    RemoteError, ServerUnreachable, _multipart)
from MedDiffusionLib.errors import InputError
from MedDiffusionLib.progress import JobStatus, ProgressInfo
from MedDiffusionLib.results import GenerationResult, ReconstructionResult
from server_fixture import REPO, InProcessServer, ServerProcess, free_port
from server_fixture import volume as _volume
from server_fixture import server_env as _server_env

TOKEN = secrets.token_urlsafe(24)
SLOW = dict(anatomy="ct-head-neck", sampler="ddpm", steps=1000)  # ~a minute on a CPU: always cancelled


def server_env(token: Optional[str] = TOKEN) -> dict[str, str]:
    return _server_env(token)


class Server(ServerProcess):
    """A `python -m MedDiffusionLib serve` subprocess with this file's token; always stopped by its fixture."""

    def __init__(self, model: Path, store: Path, log: Path, *extra: str, token_mode: str = "env") -> None:
        super().__init__(model, store, log, *extra, token=TOKEN, token_mode=token_mode)


def http(url: str, method: str = "GET", token: Optional[str] = TOKEN, body: Optional[bytes] = None,
         headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    """Raw urllib exchange returning (status, headers, body) for any status."""
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_state(client: RemoteClient, job: str, states: tuple[str, ...], timeout: float = 60) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status(job)
        if st.state in states:
            return st
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not reach {states}: {st}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from helpers import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("model"), controlnets=True)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("main")
    srv = Server(model_dir, d / "store", d / "server.log", "--max-queue", "1", "--max-upload-mb", "1")
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> RemoteClient:
    return server.client()


def volume(size=(16, 16, 16), spacing=(1.0, 1.0, 2.0), dtype=np.float32, nan=False) -> sitk.Image:
    return _volume(size, spacing, dtype, nan, origin=(10.0, -5.0, 3.0))


def upload(server: Server, data: bytes, filename: str = "volume.nrrd", fields: Optional[dict] = None,
           tmp: Optional[Path] = None) -> tuple[int, dict]:
    path = tmp / filename
    path.write_bytes(data)
    body, boundary, length = _multipart(fields or {"task": "sparse-ct", "steps": 2}, path)
    status, _, raw = http(server.url + "/v1/reconstruct", "POST", body=b"".join(body),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(raw or b"{}")


def nrrd_bytes(img: sitk.Image, tmp: Path) -> bytes:
    p = tmp / f"v{secrets.token_hex(3)}.nrrd"
    sitk.WriteImage(img, str(p))
    return p.read_bytes()


# ---- basics and security ---------------------------------------------------------------------------------
def test_health_and_models(server, client):
    assert client.health()["status"] == "ok"
    status, _, _ = http(server.url + "/health", token=None)
    assert status == 200  # no token needed for health
    m = client.models()
    assert m["model"] == "tiny" and m["device"] == "cpu" and set(m["samplers"]) == {"ddpm", "ddim", "dpmpp"}
    chest = next(a for a in m["anatomies"] if a["name"] == "ct-chest-abdomen")
    assert chest["modality"] == "CT" and chest["spacing_xyz"] == [1.25, 1.25, 1.25]
    assert [32, 32, 16] in chest["sizes_xyz"]
    assert m["limits"]["max_queue"] == 1 and m["limits"]["max_upload_mb"] == 1


def test_token_required(server):
    for token in (None, "wrong-" + TOKEN):
        status, headers, body = http(server.url + "/v1/models", token=token)
        assert status == 401, body
        assert headers["www-authenticate"] == "Bearer"
    status, _, _ = http(server.url + "/v1/generate", "POST", token=None, body=b"{}",
                        headers={"Content-Type": "application/json"})
    assert status == 401
    with pytest.raises(AuthenticationError, match="rejected"):
        server.client("x" * 32).models()
    with pytest.raises(AuthenticationError, match="no access token"):
        RemoteClient(server.url, token="").models()


def test_unknown_jobs_are_404(server, client):
    fake = secrets.token_urlsafe(24)
    for path in (fake, f"{fake}/result", "..%2F..%2Fetc%2Fpasswd", "x" * 32 + "/result"):
        assert http(f"{server.url}/v1/jobs/{path}")[0] == 404
    assert http(f"{server.url}/v1/jobs/{fake}/cancel", "POST")[0] == 404
    with pytest.raises(JobNotFound):
        client.status(fake)


def test_client_unreachable_and_bad_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match=url.replace(".", r"\.")):
        RemoteClient(url, token=TOKEN, timeout=5).health()
    with pytest.raises(ValueError):
        RemoteClient("ftp://example.org")


@pytest.mark.parametrize("extra, token, message", [
    (["--host", "0.0.0.0", "--insecure"], None, "only allowed on a loopback"),
    (["--host", "0.0.0.0", "--insecure"], TOKEN, "only allowed on a loopback"),
    ([], None, "without an access token"),
    ([], "short", "too short"),
])
def test_refuses_unsafe_configurations(extra, token, message, tmp_path):
    cmd = [sys.executable, "-m", "MedDiffusionLib", "serve", "--port", str(free_port()), "--store",
           str(tmp_path / "s"), *extra]
    env = server_env(token)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "refus" in r.stderr or "short" in r.stderr


# ---- generation --------------------------------------------------------------------------------------------
def test_generate_end_to_end(server, client):
    seen = []
    job = client.generate("ct-chest-abdomen", "32x32x16", sampler="dpmpp", steps=3, seed=7)
    final = client.wait(job, poll_s=0.1, timeout=60, progress=seen.append)
    assert final.state == "done" and final.progress == 1.0 and final.outputs == ("result",)
    assert final.info["seed"] == 7 and final.info["steps"] == 3
    assert final.started and final.finished and final.expires and final.elapsed_s > 0
    assert seen and all(0.0 <= s.progress <= 1.0 for s in seen)
    img = client.result(job)
    assert img.GetSize() == (32, 32, 16)
    assert img.GetSpacing() == pytest.approx((1.25, 1.25, 1.25))
    assert np.isfinite(sitk.GetArrayViewFromImage(img)).all()
    status, headers, body = http(f"{server.url}/v1/jobs/{job}/result")
    assert status == 200 and body[:4] == b"NRRD" and headers["content-type"] == "application/octet-stream"
    assert ".nrrd" in headers["content-disposition"]
    with pytest.raises(RemoteError) as err:  # generation jobs have no degraded input
        client.degraded(job)
    assert err.value.status == 404


@pytest.mark.parametrize("body, message", [
    ({"anatomy": "ct-brain"}, "unknown anatomy"),
    ({"anatomy": "ct-head-neck", "size_xyz": [20, 16, 16]}, "multiple of"),
    ({"anatomy": "ct-head-neck", "steps": 0}, "steps"),
    ({"anatomy": "ct-head-neck", "sampler": "euler"}, "sampler"),
    ({"anatomy": "mr-knee", "hu_range": [-1000, 1000]}, "only applies to CT"),
    ({"anatomy": "ct-head-neck", "size": [16, 16, 16]}, "size"),
    ({"anatomy": "ct-head-neck", "size_xyz": [4096, 4096, 4096]}, "voxels"),
])
def test_generate_rejects_bad_requests(server, body, message):
    status, _, raw = http(server.url + "/v1/generate", "POST", body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
    assert status == 400 and message in json.loads(raw)["detail"], raw


# ---- queue, cancel, load -----------------------------------------------------------------------------------
def test_queue_full_then_cancel(server, client):
    running = client.generate(**SLOW)
    wait_state(client, running, ("running",))
    queued = client.generate(**SLOW)
    assert client.status(queued).queue_position == 1
    with pytest.raises(QueueFullError) as err:
        client.generate("ct-head-neck", steps=2)
    assert err.value.status == 429
    status, headers, _ = http(server.url + "/v1/generate", "POST", body=b'{"anatomy": "ct-head-neck"}',
                              headers={"Content-Type": "application/json"})
    assert status == 429 and "retry-after" in headers
    assert http(f"{server.url}/v1/jobs/{running}/result")[0] == 409  # not finished yet
    assert client.cancel(queued).state == "cancelled"  # a queued job ends at once
    client.cancel(running)
    st = wait_state(client, running, ("cancelled", "done", "failed"), timeout=30)
    assert st.state == "cancelled" and "cancel" in st.error
    with pytest.raises(JobCancelled):
        client.wait(running, timeout=5)
    assert client.cancel(running).state == "cancelled"  # idempotent


def test_concurrent_status_polls(server, client):
    job = client.generate(**SLOW)
    wait_state(client, job, ("running",))
    deadline = time.monotonic() + 30
    while (client.status(job).step or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # a first sampler step, so progress is visibly moving
    codes: list[int] = []
    lock = threading.Lock()

    def poll() -> None:
        for _ in range(3):
            code = http(f"{server.url}/v1/jobs/{job}")[0]
            with lock:
                codes.append(code)

    start = time.monotonic()
    threads = [threading.Thread(target=poll, daemon=True) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads)
    assert codes == [200] * 150 and elapsed < 30
    st = client.status(job)
    assert st.state == "running" and st.total == 1000 and 0 < st.progress < 0.9
    client.cancel(job)
    assert wait_state(client, job, ("cancelled",), timeout=30).state == "cancelled"


def test_progress_and_result_round_trip_through_the_server(model_dir, tmp_path):
    """What the pipeline emits (a ProgressInfo) and returns (a GenerationResult) is what the client reads back from
    the real server over HTTP: the same types, equal field by field (floats included), not a re-encoded copy."""
    srv = InProcessServer(tmp_path / "store", model_dir, TOKEN)
    try:
        worker = srv.svc.manager.workers[0]
        real = worker.runners["generate"]
        emitted: list[ProgressInfo] = []
        returned: list = []
        reached, release = threading.Event(), threading.Event()

        def runner(rec, input_path, progress, cancel):
            def tee(info: ProgressInfo) -> None:
                progress(info)
                if info.stage == "sampling" and info.step == 2 and not emitted:
                    emitted.append(info)  # hold the pipeline here until the client has seen this exact report
                    reached.set()
                    release.wait(30)
            out = real(rec, input_path, tee, cancel)
            returned.append(out)
            return out

        worker.runners["generate"] = runner
        client = RemoteClient(srv.url, token=TOKEN, timeout=20)
        job = client.generate("ct-chest-abdomen", "32x32x16", sampler="ddim", steps=4, seed=11)
        assert reached.wait(60), "the pipeline never reached its second sampling step"
        st = client.status(job)
        assert st.state == "running" and st.current == emitted[0]  # eta_s and elapsed_s bit for bit
        assert isinstance(st.current, ProgressInfo) and st.describe().startswith("sampling: step 2/4")
        release.set()
        final = client.wait(job, poll_s=0.05, timeout=60)
        fetched = client.fetch(job)
        out = returned[0]
        assert isinstance(fetched, GenerationResult) and fetched.info() == out.info == final.info
        assert (fetched.anatomy, fetched.modality, fetched.seed, fetched.sampler, fetched.steps,
                fetched.size_xyz) == ("ct-chest-abdomen", "CT", 11, "ddim", 4, (32, 32, 16))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fetched.image),
                                      sitk.GetArrayFromImage(out.images["result"]))
        assert final.result() == GenerationResult.from_info(out.info)
    finally:
        release.set()
        srv.stop()


# ---- uploads and reconstruction ----------------------------------------------------------------------------
def _echo_reconstruction(image, task, views, acceleration, mask, simulate, sampler, steps, seed, data_consistency,
                         anatomy=None, method="diffusion", progress=None, cancel=None):
    """Stands in for the reconstruction pipeline: returns the input, so only the HTTP layer is under test."""
    from MedDiffusionLib.progress import ProgressTracker

    tracker = ProgressTracker(3, progress, cancel)
    tracker.begin()
    for _ in range(3):
        tracker.advance()
    return ReconstructionResult(image, sitk.Cast(image, sitk.sitkFloat32) * 0.5, task=task, method=method, seed=seed)


@pytest.fixture(scope="module")
def stub_server(model_dir, tmp_path_factory):
    """The real app in a uvicorn thread of this process, with a stub reconstruction pipeline: the upload path
    (streaming limit, format and content checks) is tested whether or not the real pipeline exists yet."""
    d = tmp_path_factory.mktemp("stub")
    srv = InProcessServer(d / "store", model_dir, TOKEN, max_queue=1, max_upload_mb=1)
    svc = srv.svc
    svc.reconstructor, svc.tasks = _echo_reconstruction, ["sparse-ct"]
    yield srv
    srv.stop()


def test_upload_rejections(stub_server, tmp_path):
    server = stub_server
    cases = [(b"\x00garbage" * 1000, "volume.nii.gz", 400, "neither NRRD nor NIfTI"),
             (nrrd_bytes(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), tmp_path), "v.nrrd", 400, "2D"),
             (nrrd_bytes(volume(nan=True), tmp_path), "v.nrrd", 400, "NaN"),
             (os.urandom(3 * 2**20), "big.nrrd", 413, "limit of 1 MB")]
    for data, name, code, message in cases:
        status, body = upload(server, data, name, tmp=tmp_path)
        assert status == code and message in body["detail"], body
    ok = nrrd_bytes(volume(), tmp_path)
    for fields, message in [({"task": "dehaze"}, "unknown task 'dehaze'"),
                            ({"task": "sparse-ct", "views": 0}, "views"),
                            ({"task": "sparse-ct", "colour": "red"}, "colour"),
                            ({"task": "sparse-ct", "anatomy": "mr-knee"}, "needs a CT anatomy"),
                            ({"task": "sparse-ct", "anatomy": "ct-brain"}, "unknown anatomy"),
                            ({"task": "sparse-ct", "method": "zero-filled"}, "does not apply to task 'sparse-ct'"),
                            ({"task": "sparse-ct", "method": "magic"}, "method")]:
        status, body = upload(server, ok, "v.nrrd", fields, tmp=tmp_path)
        assert status == 400 and message in body["detail"], body
    assert not list((server.store / "uploads").iterdir())  # nothing left behind
    big = tmp_path / "huge.nrrd"
    big.write_bytes(b"NRRD" + bytes(2 * 2**20))
    with pytest.raises(RemoteError, match="above the server's limit") as err:  # the client checks first
        RemoteClient(server.url, TOKEN).reconstruct(big)
    assert err.value.status == 413


@pytest.mark.parametrize("fields", [
    {"acceleration": 1}, {"acceleration": 64.5}, {"steps": 0}, {"steps": 1001}, {"sampler": "euler"},
    {"views": 2049}, {"views": 0}, {"mask": "radial"}, {"task": "pet"}, {"seed": -1},
    {"task": "mri", "method": "tv", "simulate": False},
])
def test_server_refuses_what_the_library_refuses(stub_server, tmp_path, fields):
    """One rule, one message: the upload is refused with exactly the library's ReconstructOptions message."""
    from MedDiffusionLib.options import ReconstructOptions

    with pytest.raises(InputError) as err:
        ReconstructOptions(**{"task": "sparse-ct", **fields}).validate()
    status, body = upload(stub_server, nrrd_bytes(volume(), tmp_path), "v.nrrd", {"task": "sparse-ct", **fields},
                          tmp=tmp_path)
    assert status == 400 and body["detail"] == str(err.value), body
    assert not list((stub_server.store / "uploads").iterdir())


@pytest.mark.parametrize("body", [
    {"steps": 0}, {"steps": 1001}, {"sampler": "euler"}, {"seed": -1}, {"seed": 2**63}, {"hu_range": [5, -5]},
])
def test_generate_refuses_what_the_library_refuses(stub_server, body):
    from MedDiffusionLib.options import GenerateOptions

    with pytest.raises(InputError) as err:
        GenerateOptions(**{"anatomy": "ct-legs", **body}).validate()
    status, _, raw = http(stub_server.url + "/v1/generate", "POST", body=json.dumps({"anatomy": "ct-legs", **body})
                          .encode(), headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["detail"] == str(err.value), raw


def test_reconstruct_through_the_http_layer(stub_server):
    client = RemoteClient(stub_server.url, TOKEN)
    img = volume(spacing=(0.8, 0.8, 2.5))
    job = client.reconstruct(img, task="sparse-ct", views=8, steps=2, seed=3, simulate=False)
    final = client.wait(job, poll_s=0.05, timeout=30)
    assert final.params["views"] == 8 and final.params["simulate"] is False
    assert final.outputs == ("result", "degraded") and final.info["seed"] == 3
    out = client.result(job)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
    assert out.GetSpacing() == pytest.approx(img.GetSpacing()) and out.GetOrigin() == pytest.approx(img.GetOrigin())
    assert client.degraded(job).GetSize() == img.GetSize()
    assert not list((stub_server.store / "jobs" / job).glob("input*"))  # the upload is deleted after the job


def _require_reconstruct(server) -> None:
    status, _, raw = http(server.url + "/v1/models")
    assert status == 200 and json.loads(raw)["reconstruct_available"], raw  # the tiny bundle has ControlNets


def test_reconstruct_end_to_end(server, client):
    _require_reconstruct(server)
    tasks = client.models()["tasks"]
    assert tasks, "the tiny bundle has ControlNets: the server must offer their tasks"
    task = "sparse-ct" if "sparse-ct" in tasks else tasks[0]
    img = volume(size=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    job = client.reconstruct(img, task=task, views=8, acceleration=4, steps=2, seed=3)
    final = client.wait(job, poll_s=0.1, timeout=90)
    assert final.kind == "reconstruct" and final.outputs == ("result", "degraded")
    assert final.info["task"] == task and final.info["seed"] == 3 and final.info["steps"] == 2
    out = client.result(job)
    assert out.GetSize() == img.GetSize()
    assert out.GetSpacing() == pytest.approx(img.GetSpacing()) and out.GetOrigin() == pytest.approx(img.GetOrigin())
    degraded = client.degraded(job)
    assert degraded.GetSize() == img.GetSize() and degraded.GetSpacing() == pytest.approx(img.GetSpacing())
    tv = client.wait(client.reconstruct(img, task=task, method="tv", views=8, acceleration=4, seed=3), poll_s=0.1,
                     timeout=90)
    assert tv.state == "done" and tv.info["method"] == "tv" and tv.params["method"] == "tv"


# ---- persistence and expiry --------------------------------------------------------------------------------
def test_restart_keeps_results_and_fails_interrupted_jobs(model_dir, tmp_path):
    store, log = tmp_path / "store", tmp_path / "server.log"
    first = Server(model_dir, store, log)
    try:
        c = first.client()
        done = c.generate("ct-legs", steps=2, seed=1)
        c.wait(done, poll_s=0.1, timeout=60)
        before = sitk.GetArrayFromImage(c.result(done))
        interrupted = c.generate(**SLOW)
        wait_state(c, interrupted, ("running",))
        queued = c.generate(**SLOW)
    finally:
        first.stop()
    assert first.proc.returncode is not None
    second = Server(model_dir, store, log, token_mode="file")
    try:
        c = second.client()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(c.result(done)), before)
        for job in (interrupted, queued):
            st = c.status(job)
            assert st.state == "failed" and st.error == "server restarted while the job was running"
    finally:
        second.stop()
    # Same store, tiny TTL: the old results are purged at startup, and new ones a moment after they finish.
    third = Server(model_dir, store, log, "--result-ttl-hours", "0.0005", token_mode="none")  # 1.8 s
    try:
        c = third.client(token=None)  # --insecure on 127.0.0.1: no token needed
        assert c.health()["auth_required"] is False
        with pytest.raises(JobNotFound, match="kept"):
            c.result(done)
        job = c.generate("ct-legs", steps=2, seed=2)
        c.wait(job, poll_s=0.05, timeout=60)
        assert (store / "jobs" / job / "result.nrrd").is_file()
        deadline = time.monotonic() + 10
        while (store / "jobs" / job).exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # the periodic purge, without any request for the job
        assert not (store / "jobs" / job).exists()
        assert http(f"{third.url}/v1/jobs/{job}")[0] == 404
    finally:
        third.stop()

