"""The server under attack (issue 11): hostile uploads, unauthenticated and slow bodies, slow-loris headers,
open documentation, Host-header redirects, weak tokens, foreign store folders. A real `meddiffusion serve`
subprocess on 127.0.0.1 (memory is measured on its process), plus an in-process server where a test needs
short timeouts. Every test here failed on the code before the fix."""
from __future__ import annotations

import gzip
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from MedDiffusionLib.client import _multipart
from server_fixture import REPO, InProcessServer, ServerProcess, free_port, server_env

TOKEN = secrets.token_urlsafe(24)
MB = 2**20


# ---- helpers -------------------------------------------------------------------------------------------------
def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status memory line in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_growth(pid: int, action) -> int:
    """How far the process's peak resident memory rose above its resident memory before ``action``."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass  # not permitted: VmHWM keeps the startup peak, so the growth is under-estimated (still bounded)
    before = proc_status(pid, "VmRSS")
    action()
    time.sleep(0.3)
    grew = proc_status(pid, "VmHWM") - before
    print(f"peak growth of the server process: {grew / MB:.1f} MB")  # shown with pytest -s
    return grew


def nrrd(lines: list[bytes], data: bytes, eol: bytes = b"\n") -> bytes:
    return eol.join(lines) + eol + eol + data


FLOAT_222 = [b"NRRD0004", b"type: float", b"dimension: 3", b"sizes: 8 8 8", b"endian: little"]


def exchange(port: int, head: bytes, body_chunks=(), read_timeout: float = 10.0) -> tuple[Optional[int], bytes, int]:
    """Send a raw request head and body chunks; returns (status or None, response bytes, body bytes sent).
    Sending stops quietly when the server closes the connection."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = s.recv(65536)
                if not more:
                    break
                data += more
            data += s.recv(65536) if b"\r\n\r\n" in data and b'"}' not in data else b""
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, sent


def head(method: str, path: str, token: Optional[str], extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{extra}\r\n".encode()


def upload(url: str, data: bytes, fields: Optional[dict] = None, tmp: Optional[Path] = None,
           token: Optional[str] = TOKEN) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    path = tmp / f"u{secrets.token_hex(3)}.nrrd"
    path.write_bytes(data)
    body, boundary, _ = _multipart(fields or {"task": "sparse-ct", "steps": 2, "simulate": "false"}, path)
    req = urllib.request.Request(url + "/v1/reconstruct", data=b"".join(body), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from helpers import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("model"), controlnets=True)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    srv = ServerProcess(model_dir, d / "store", d / "server.log", "--max-upload-mb", "1", token=TOKEN)
    if not srv.client().models()["reconstruct_available"]:
        srv.stop()
        pytest.skip("reconstruction is not available in this build (uploads are not accepted)")
    yield srv
    srv.stop()


def cancel_all(srv: ServerProcess) -> None:
    client = srv.client()
    for job in (srv.store / "jobs").iterdir():
        try:
            client.cancel(job.name)
        except Exception:
            pass


# ---- item 2: the server only decodes the bytes it received ---------------------------------------------------
@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"])
def test_upload_naming_a_server_file_is_refused(server, tmp_path, eol):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOP-SECRET" * 52)  # 520 bytes: more than the 8x8x8 uint8 volume needs
    details = []
    for target in (str(secret), str(tmp_path / "no-such-file.bin")):
        lines = [b"NRRD0004", b"type: uint8", b"dimension: 3", b"sizes: 8 8 8", b"encoding: raw",
                 b"data file: " + target.encode()]
        status, body = upload(server.url, nrrd(lines, b"", eol), tmp=tmp_path)
        assert status == 400, body
        details.append(body["detail"])
    assert details[0] == details[1]  # the answer does not tell whether a path exists on the server
    assert "detached data file" in details[0] and str(tmp_path) not in details[0]


def test_header_beyond_the_cap_is_refused(server, tmp_path):
    padding = [b"# " + b"x" * 100] * 700  # 72 KB of comments, then the detached data line
    lines = FLOAT_222[:1] + padding + [b"data file: /etc/passwd"] + FLOAT_222[1:] + [b"encoding: raw"]
    status, body = upload(server.url, nrrd(lines, b""), tmp=tmp_path)
    assert status == 400 and "blank line within its first 64 KB" in body["detail"], body


def test_other_detached_formats_are_refused(server, tmp_path):
    mha = b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n"
    status, body = upload(server.url, mha, tmp=tmp_path)
    assert status == 400 and ".mhd/.mha" in body["detail"], body
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(tmp_path / "pair.hdr"))  # .hdr + .img (ni1)
    status, body = upload(server.url, (tmp_path / "pair.hdr").read_bytes() + bytes(512), tmp=tmp_path)
    assert status == 400 and "neither NRRD nor NIfTI" in body["detail"], body


# ---- item 7: declared sizes against the bytes received -------------------------------------------------------
def test_small_file_declaring_a_huge_volume_costs_no_memory(server, tmp_path):
    lines = [b"NRRD0004", b"type: double", b"dimension: 3", b"sizes: 512 512 512", b"endian: little",
             b"encoding: raw"]
    attack = nrrd(lines, bytes(1024))  # 1.2 KB claiming 1 GiB of doubles
    result = {}
    grew = peak_growth(server.proc.pid, lambda: result.update(zip(("status", "body"),
                                                                  upload(server.url, attack, tmp=tmp_path))))
    assert grew < 100 * MB, f"server peak memory grew by {grew / MB:.0f} MB"
    assert result["status"] == 400 and "declares 1073741824 bytes" in result["body"]["detail"], result


def test_gzip_bomb_is_counted_in_bounded_memory(server, tmp_path):
    bomb = gzip.compress(bytes(256 * MB), 9)  # ~260 KB that expands to 256 MiB
    lines = [b"NRRD0004", b"type: double", b"dimension: 3", b"sizes: 512 512 512", b"endian: little",
             b"encoding: gzip"]
    result = {}
    grew = peak_growth(server.proc.pid, lambda: result.update(zip(("status", "body"),
                                                                  upload(server.url, nrrd(lines, bomb), tmp=tmp_path))))
    assert grew < 100 * MB, f"server peak memory grew by {grew / MB:.0f} MB"
    assert result["status"] == 400 and "holds 268435456 bytes of decompressed data" in result["body"]["detail"]
    # More data than declared is refused too (counting stops one byte past the declared size).
    small = [b"sizes: 16 16 16" if x.startswith(b"sizes") else x for x in lines]
    status, body = upload(server.url, nrrd(small, bomb), tmp=tmp_path)
    assert status == 400 and "holds more bytes" in body["detail"], body


# ---- item 6: authentication before any body byte; streamed caps ---------------------------------------------
def test_unauthenticated_body_is_never_read(server):
    h = head("POST", "/v1/generate", None, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    piece = b" " * MB
    chunks = (b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(100))  # 100 MiB, no Content-Length
    result = {}
    grew = peak_growth(server.proc.pid, lambda: result.update(zip(("status", "raw", "sent"),
                                                                  exchange(server.port, h, chunks))))
    assert grew < 50 * MB, f"server peak memory grew by {grew / MB:.0f} MB"
    assert result["status"] == 401 or (result["status"] is None and result["sent"] < 100 * MB), result
    # The 401 comes from the headers alone: no body byte is needed (or awaited).
    status, raw, _ = exchange(server.port, h, read_timeout=5)
    assert status == 401 and b"www-authenticate: Bearer" in raw


def test_streamed_json_is_capped_without_content_length(server):
    h = head("POST", "/v1/generate", TOKEN, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    piece = b" " * 16384
    chunks = [b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(6)]  # 96 KB > the 64 KB JSON cap
    status, raw, _ = exchange(server.port, h, chunks)
    assert status == 413 and b"too large" in raw, raw[:300]


# ---- item 9: the smaller holes -------------------------------------------------------------------------------
def test_docs_and_schema_are_not_served(server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert exchange(server.port, head("GET", path, None))[0] == 401
        assert exchange(server.port, head("GET", path, TOKEN))[0] == 404


def test_no_redirect_built_from_the_host_header(server):
    h = f"GET /v1/models/ HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    status, raw, _ = exchange(server.port, h)
    assert status == 404 and b"location:" not in raw.lower() and b"evil.example" not in raw


def test_job_id_with_a_trailing_newline_is_unknown(server):
    from MedDiffusionLib.server.security import is_valid_job_id, new_job_id

    job = new_job_id()
    assert is_valid_job_id(job) and not is_valid_job_id(job + "\n") and not is_valid_job_id(job + "\r\n")
    assert exchange(server.port, head("GET", f"/v1/jobs/{job}%0A", TOKEN))[0] == 404


def test_acceleration_one_is_refused_at_the_request(server, tmp_path):
    img = np.zeros((8, 8, 8), np.float32).tobytes()
    data = nrrd(FLOAT_222 + [b"encoding: raw"], img)
    status, body = upload(server.url, data, {"task": "mri", "acceleration": "1"}, tmp=tmp_path)
    assert status == 400 and "acceleration must be > 1" in body["detail"], body
    assert not list((server.store / "uploads").iterdir())  # refused before the upload was kept


def test_file_exactly_at_the_size_limit_is_accepted(server, tmp_path):
    sizes = (100, 100, 104)
    lines = [b"NRRD0004", b"type: uint8", b"dimension: 3", b"sizes: %d %d %d" % sizes, b"encoding: raw",
             b"space directions: (1,0,0) (0,1,0) (0,0,1)", b"space: left-posterior-superior"]
    pad = MB - int(np.prod(sizes)) - len(nrrd(lines + [b"#"], b""))
    exact = nrrd(lines + [b"#" + b"x" * pad], bytes(int(np.prod(sizes))))
    assert len(exact) == MB  # the server's --max-upload-mb 1
    try:
        status, body = upload(server.url, exact, {"task": "sparse-ct", "views": 4, "steps": 1}, tmp=tmp_path)
        assert status == 202, body
        (tmp_path / "exact.nrrd").write_bytes(exact)  # the client's own check agrees
        assert server.client().reconstruct(tmp_path / "exact.nrrd", task="sparse-ct", views=4, steps=1)
        over = nrrd(lines + [b"#" + b"x" * (pad + 1)], bytes(int(np.prod(sizes))))
        status, body = upload(server.url, over, {"task": "sparse-ct"}, tmp=tmp_path)
        assert status == 413 and "limit of 1 MB" in body["detail"], body
    finally:
        cancel_all(server)


@pytest.mark.parametrize("token, message", [("a" * 16, "too short"), ("a" * 40, "predictable"),
                                            ("abcd" * 10, "predictable"), ("0123456789" * 4, "predictable")])
def test_weak_tokens_are_refused(tmp_path, token, message):
    cmd = [sys.executable, "-m", "MedDiffusionLib", "serve", "--port", str(free_port()), "--store",
           str(tmp_path / "s")]
    r = subprocess.run(cmd, cwd=REPO, env=server_env(token), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "secrets.token_urlsafe" in r.stderr, r.stderr


# ---- item 9: slow clients ------------------------------------------------------------------------------------
@pytest.fixture
def quick_server(model_dir, tmp_path):
    srv = InProcessServer(tmp_path / "store", model_dir, TOKEN, header_timeout_s=1.0, body_idle_s=1.0)
    yield srv
    srv.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_slow_loris_headers_are_cut_off(quick_server):
    base = open_fds()
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", quick_server.port), timeout=5)
        s.sendall(b"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    held = open_fds()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # keep dripping header bytes: a drip must not reset the deadline
        for s in socks:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        time.sleep(0.25)
    closed = 0
    for s in socks:
        s.settimeout(3)
        try:
            closed += s.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except socket.timeout:
            pass
        s.close()
    assert closed == len(socks), f"{len(socks) - closed} connections still held after the header deadline"
    time.sleep(0.2)
    assert held - base >= 40 and open_fds() <= base + 2  # the server side let go of its sockets too


def test_stalled_upload_body_is_cut_off(quick_server, tmp_path):
    h = head("POST", "/v1/reconstruct", TOKEN,
             "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n")
    start = time.monotonic()
    status, raw, _ = exchange(quick_server.port, h, [b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                                    b"filename=\"v.nrrd\"\r\n\r\nNRRD"], read_timeout=10)
    assert status == 408 and time.monotonic() - start < 6, raw[:300]
    assert not list((quick_server.store / "uploads").iterdir())  # the partial file is gone


def test_uvicorn_limits():
    from MedDiffusionLib.server.guard import MAX_CONNECTIONS, uvicorn_config

    cfg = uvicorn_config(object(), "127.0.0.1", 1)
    assert cfg.limit_concurrency == MAX_CONNECTIONS and cfg.timeout_keep_alive <= 10
    assert cfg.h11_max_incomplete_event_size <= 64 * 1024


# ---- item 5: the store folder --------------------------------------------------------------------------------
def test_serve_refuses_a_foreign_store_folder(tmp_path):
    foreign = tmp_path / "photos"
    (foreign / "uploads").mkdir(parents=True)
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    (foreign / "uploads" / "keep.txt").write_text("mine")
    foreign.chmod(0o755)
    cmd = [sys.executable, "-m", "MedDiffusionLib", "serve", "--port", str(free_port()), "--store", str(foreign)]
    r = subprocess.run(cmd, cwd=REPO, env=server_env(TOKEN), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not empty" in r.stderr and ".meddiffusion-store" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o755
    assert (foreign / "uploads" / "keep.txt").read_text() == "mine" and (foreign / "holiday.jpg").exists()


def test_store_marker_rules(tmp_path):
    from MedDiffusionLib.server.store import STORE_MARKER, JobStore, StoreDirError, claim_store_dir

    fresh = JobStore(tmp_path / "new" / "store", 60)  # created and marked
    assert (fresh.root / STORE_MARKER).is_file() and stat.S_IMODE(fresh.root.stat().st_mode) == 0o700
    (fresh.root / "jobs" / "x").mkdir()
    assert JobStore(fresh.root, 60).root == fresh.root  # a marked store is reused whatever it holds
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (claim_store_dir(empty) / STORE_MARKER).is_file()
    with pytest.raises(StoreDirError, match="not a folder"):
        claim_store_dir(tmp_path / "empty" / STORE_MARKER)
    legacy = tmp_path / "legacy"  # written before the marker existed: adopted
    (legacy / "jobs" / ("A" * 32)).mkdir(parents=True)
    (legacy / "jobs" / ("A" * 32) / "job.json").write_text("{}")
    (legacy / "uploads").mkdir()
    assert (claim_store_dir(legacy) / STORE_MARKER).is_file()
    lookalike = tmp_path / "lookalike"  # same folder names, foreign content: refused
    (lookalike / "jobs" / "thesis").mkdir(parents=True)
    with pytest.raises(StoreDirError, match="not empty"):
        JobStore(lookalike, 60)
    assert (lookalike / "jobs" / "thesis").is_dir()
