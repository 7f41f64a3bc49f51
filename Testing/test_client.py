"""RemoteClient in isolation: standard-library only, request encoding, and the mapping of failures to errors.
(The client against the real server is exercised in test_server.py.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from MedDiffusionLib.client import (AuthenticationError, JobFailed, JobNotFound, QueueFullError, RemoteClient,
                                    RemoteError, ServerUnreachable, _multipart)
from MedDiffusionLib.errors import InputError, MedDiffusionError

REPO = Path(__file__).resolve().parents[1]


def test_client_imports_only_the_standard_library():
    code = ("import sys; import MedDiffusionLib.client; "
            "bad = [m for m in ('torch', 'numpy', 'SimpleITK', 'fastapi', 'yaml') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing pre-imported by a sitecustomize
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_sizes_are_refused_before_any_request():
    c = RemoteClient("http://127.0.0.1:9")  # nothing listens: a request would be ServerUnreachable
    for bad in ("32x32", "axbxc", (1, 2)):
        with pytest.raises(InputError, match="size"):
            c.generate("ct-legs", bad)


def test_multipart_round_trip(tmp_path):
    from python_multipart.multipart import MultipartParser

    payload = bytes(range(256)) * 50 + b"\r\n--tricky--\r\n"
    path = tmp_path / "v.nrrd"
    path.write_bytes(payload)
    body, boundary, length = _multipart({"task": "mri", "steps": None, "simulate": False, "views": 30}, path)
    raw = b"".join(body)
    assert len(raw) == length
    parts, current = [], {}

    def on_part_begin():
        current.clear()
        current["data"] = b""

    def on_part_data(data, start, end):
        current["data"] += data[start:end]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                                        "on_part_end": lambda: parts.append(current["data"])})
    parser.write(raw)
    parser.finalize()
    assert parts == [b"mri", b"", b"false", b"30", payload]


def test_plain_http_token_to_remote_host_warns():
    with pytest.warns(UserWarning, match="without TLS"):
        RemoteClient("http://gpu.example.org:8000", token="t" * 20)
    RemoteClient("https://gpu.example.org", token="t" * 20)  # no warning with TLS
    RemoteClient("http://127.0.0.1:8000", token="t" * 20)    # nor through a tunnel


class _Canned(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server API
        status, body, ctype = self.routes.get(self.path, (404, b'{"detail": "not here"}', "application/json"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def canned():
    _Canned.routes = {
        "/v1/models": (401, b'{"detail": "missing or wrong access token"}', "application/json"),
        "/v1/jobs/abc": (404, b'{"detail": "unknown job id"}', "application/json"),
        "/v1/jobs/busy": (429, b'{"detail": "the job queue is full"}', "application/json"),
        "/v1/jobs/boom": (500, b"Internal Server Error", "text/plain"),
        "/v1/jobs/failed": (200, json.dumps({"state": "failed", "error": "out of memory"}).encode(),
                            "application/json"),
        "/health": (200, b"<html>not an API</html>", "text/html"),
        "/redirect": (307, b"", "text/plain"),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_errors_are_mapped(canned):
    c = RemoteClient(canned, token="t" * 20, timeout=5)
    with pytest.raises(AuthenticationError, match="rejected"):
        c.models()
    with pytest.raises(JobNotFound, match="unknown job id") as err:
        c.status("abc")
    assert err.value.status == 404
    with pytest.raises(QueueFullError):
        c.status("busy")
    with pytest.raises(RemoteError, match="500") as err:
        c.status("boom")
    assert err.value.detail == "Internal Server Error"
    with pytest.raises(RemoteError, match="not JSON"):
        c.health()
    with pytest.raises(RemoteError) as err:  # never follows redirects (it would resend the token elsewhere)
        c._request("GET", "/redirect")
    assert err.value.status == 307
    with pytest.raises(JobFailed, match="out of memory"):
        c.wait("failed", poll_s=0.01)
    assert all(issubclass(e, MedDiffusionError) for e in (ServerUnreachable, AuthenticationError, RemoteError))


def test_timeout_is_unreachable():
    # A listening socket that never answers: the connection succeeds, the read times out.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ServerUnreachable, match="timed out") as err:
            RemoteClient(url, timeout=0.5).health()
        assert url in str(err.value)


# ---- sliced transfers (MedDiffusionLib/transfers.py): the NRRD stream both ways -----------------------------


def _volume(shape=(5, 6, 7), dtype="float32"):
    import numpy as np

    from MedDiffusionLib.transfers import VolumeArray

    arr = (np.arange(np.prod(shape)).reshape(shape) * 1.5 - 100).astype(dtype)
    angle = 0.3
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    return VolumeArray(arr, (0.7, 1.3, 2.5), (-12.5, 30.25, 7.0), direction)


def _nrrd_bytes(volume, encoding="raw") -> bytes:
    import gzip

    from MedDiffusionLib.transfers import nrrd_header

    data = volume.array.astype(volume.array.dtype.newbyteorder("<")).tobytes()
    return nrrd_header(volume, encoding) + (gzip.compress(data) if encoding == "gzip" else data)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_streamed_nrrd_round_trip_matches_simpleitk(tmp_path, encoding):
    import numpy as np
    import SimpleITK as sitk

    from MedDiffusionLib.transfers import NrrdStreamDecoder

    volume = _volume()
    blob = _nrrd_bytes(volume, encoding)
    (tmp_path / "v.nrrd").write_bytes(blob)  # what we send is an NRRD that SimpleITK reads identically
    image = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(image), volume.array)
    assert np.allclose(image.GetSpacing(), volume.spacing) and np.allclose(image.GetOrigin(), volume.origin_lps)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction_lps)
    decoder = NrrdStreamDecoder(max_voxels=10**6)
    for i in range(0, len(blob), 7):  # fed in tiny pieces, header split anywhere
        decoder.feed(blob[i:i + 7])
    out = decoder.finish()
    assert np.array_equal(out.array, volume.array) and np.allclose(out.spacing, volume.spacing)
    assert np.allclose(out.direction_lps, volume.direction_lps) and np.allclose(out.origin_lps, volume.origin_lps)
    sitk.WriteImage(volume.to_sitk(), str(tmp_path / "itk.nrrd"), True)  # the server's own (ITK) writer
    decoder = NrrdStreamDecoder(max_voxels=10**6)
    decoder.feed((tmp_path / "itk.nrrd").read_bytes())
    assert np.array_equal(decoder.finish().array, volume.array)


def test_streamed_nrrd_refuses_hostile_answers():
    from MedDiffusionLib.transfers import NrrdStreamDecoder, TransferError

    volume = _volume()
    blob = _nrrd_bytes(volume, "gzip")
    with pytest.raises(TransferError, match="exceeds the expected"):  # checked before allocating anything
        NrrdStreamDecoder(max_voxels=100).feed(blob)
    header = blob[:blob.index(b"\n\n")]
    with pytest.raises(TransferError, match="cannot be read"):
        NrrdStreamDecoder(10**6).feed(header.replace(b"encoding: gzip", b"data file: /etc/passwd") + b"\n\n")
    import gzip

    bomb = header + b"\n\n" + gzip.compress(b"\0" * (volume.array.nbytes * 50))
    with pytest.raises(TransferError, match="more data than its header"):
        NrrdStreamDecoder(10**6).feed(bomb)
    decoder = NrrdStreamDecoder(10**6)
    decoder.feed(_nrrd_bytes(volume)[:-10])
    with pytest.raises(TransferError, match="truncated"):
        decoder.finish()
    with pytest.raises(TransferError, match="too long"):
        NrrdStreamDecoder(10**6).feed(b"NRRD0004\n" + b"# x\n" * 20000)
