"""A real `python -m MedDiffusionLib serve` subprocess on 127.0.0.1, for the server and Slicer-logic tests::

    from server_fixture import ServerProcess
    srv = ServerProcess(model_dir, tmp / "store", tmp / "server.log", token=TOKEN)
    try:
        srv.client().generate(...)
    finally:
        srv.stop()

The subprocess gets one thread per math library, so it leaves a core to the test process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.client import RemoteClient

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 90
_SAME = object()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(token: Optional[str]) -> dict[str, str]:
    """This process's environment with $MEDDIFFUSION_TOKEN set to ``token`` (removed when None)."""
    env = {k: v for k, v in os.environ.items() if k != "MEDDIFFUSION_TOKEN"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # leave a core to the test
    if token:
        env["MEDDIFFUSION_TOKEN"] = token
    return env


class ServerProcess:
    """A `python -m MedDiffusionLib serve` subprocess on a free port, on the CPU; ready when constructed.

    ``token_mode``: "env" passes ``token`` as $MEDDIFFUSION_TOKEN, "file" through --token-file (a file beside
    ``log``), "none" starts with --insecure and no token. Always call ``stop()`` (a fixture's finally).
    """

    def __init__(self, model: Path, store: Path, log: Path, *extra: str, token: Optional[str],
                 token_mode: str = "env") -> None:
        self.port = free_port()
        self.token = token
        env = server_env(token if token_mode == "env" else None)
        if token_mode == "file":
            token_file = log.with_name("token.txt")
            token_file.write_text(f"{token}\n")
            token_file.chmod(0o600)
            extra = (*extra, "--token-file", str(token_file))
        elif token_mode == "none":
            extra = (*extra, "--insecure")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.store = store
        cmd = [sys.executable, "-m", "MedDiffusionLib", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--model", str(model), "--store", str(store), "--log-level", "warning", *extra]
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"server did not answer /health within {STARTUP_S} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def client(self, token: Optional[str] = _SAME) -> RemoteClient:  # type: ignore[assignment]
        return RemoteClient(self.url, token=self.token if token is _SAME else token, timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def volume(size=(16, 16, 16), spacing=(1.0, 1.0, 2.0), dtype=np.float32, nan=False,
           origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A small random upload volume (optionally with a NaN voxel) for the server tests."""
    arr = np.random.default_rng(0).normal(size=size[::-1]).astype(dtype)
    if nan:
        arr[1, 2, 3] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


class InProcessServer:
    """The real app under the real (guarded) uvicorn server in a thread of this process, so a test can swap
    parts of it (a stub pipeline) or tighten its timeouts. Always call ``stop()``."""

    def __init__(self, store: Path, model: Path, token: Optional[str], header_timeout_s: float = 20.0,
                 **config: object) -> None:
        import threading

        import uvicorn

        from MedDiffusionLib.server.app import ServerConfig, create_app
        from MedDiffusionLib.server.guard import uvicorn_config

        self.app = create_app(ServerConfig(store_dir=store, model_dir=str(model), device="cpu", token=token,
                                           **config))  # type: ignore[arg-type]
        self.svc = self.app.state.services
        self.store, self.token = store, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uv = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, header_timeout_s=header_timeout_s,
                                                 log_level="warning"))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("the in-process server did not answer /health within 30 s")

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(15)
