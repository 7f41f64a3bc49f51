"""The local backend's job server: `meddiffusion serve` on 127.0.0.1 in a child process of Slicer.

Why a process: Slicer's main thread holds Python's GIL while Qt idles, so a Python thread in Slicer's process
barely runs; a CUDA crash or an out-of-memory kill in a child never takes Slicer down; stopping the child frees
all of its GPU memory. The child is driven with the same RemoteClient as a remote server (one job path).

Per session: a random token (never stored anywhere but this object and the child's environment), a private job
store (a fresh 0700 temporary folder, deleted on stop) and a log file the panel can open. The child exits with
Slicer: `stop()` at exit / aboutToQuit, and the child itself exits when its stdin pipe closes (server_child.py),
which also covers a crashed or killed Slicer. Every call here is short: `poll_ready()` is one health request
with a sub-second timeout, so the panel's timer drives the start-up without freezing the GUI.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from MedDiffusionLib.errors import MedDiffusionError

__all__ = ["LocalServer", "ServerSpec", "find_python", "PYTHON_ENV", "ServerStartError"]

_log = logging.getLogger(__name__)

PYTHON_ENV = "MEDDIFFUSION_PYTHON"  # override: the Python that runs the local server
HEALTH_TIMEOUT_S = 0.5
START_TIMEOUT_S = 600.0
LOCAL_MAX_UPLOAD_MB = 4096            # importing torch and loading a full-size model can take minutes
CHILD = Path(__file__).with_name("server_child.py")

class ServerStartError(MedDiffusionError):
    """The local server could not be started or died; the message points to its log."""


def find_python(override: str = "") -> str:
    """The Python that runs the server: `override` or $MEDDIFFUSION_PYTHON, else this interpreter when it is a
    plain Python (tests, PythonSlicer itself), else Slicer's own `PythonSlicer` next to the Slicer executable."""
    candidates = [override, os.environ.get(PYTHON_ENV, "")]
    exe = Path(sys.executable)
    if exe.name.lower().startswith("python"):
        candidates.append(str(exe))
    suffix = ".exe" if os.name == "nt" else ""
    # Linux/Windows: bin/SlicerApp-real next to bin/PythonSlicer; macOS: Contents/MacOS/Slicer, Contents/bin/.
    name = "PythonSlicer" + suffix
    candidates += [str(exe.with_name(name)), str(exe.parent.parent / "bin" / name), shutil.which("PythonSlicer") or ""]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerStartError("cannot find a Python to run the local MedDiffusion server (looked for PythonSlicer "
                           f"next to {exe}); set {PYTHON_ENV} to a Python executable")


def _lib_root() -> Path:
    """The folder holding MedDiffusionLib: the repository root in a checkout, the module folder in an installed
    extension (the child puts it on sys.path)."""
    try:
        import MedDiffusionLib
    except ImportError:  # pragma: no cover - the module puts the library on sys.path first
        return Path(__file__).resolve().parents[2]
    return Path(MedDiffusionLib.__file__).resolve().parents[1]


LIB_ROOT = _lib_root()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerSpec(tuple):
    """What the running server was started with; a different spec means a restart. (model args, device)"""

    def __new__(cls, model_args: tuple[str, ...], device: str) -> "ServerSpec":
        return super().__new__(cls, (tuple(model_args), device))

    @property
    def model_args(self) -> tuple[str, ...]:
        return self[0]

    @property
    def device(self) -> str:
        return self[1]


class LocalServer:
    """One `meddiffusion serve` child. States: 'stopped', 'starting', 'ready', 'failed'."""

    def __init__(self, python: str = "", extra_args: tuple[str, ...] = (), env: Optional[dict[str, str]] = None
                 ) -> None:
        self.python_override = python
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.spec: Optional[ServerSpec] = None
        self.token = ""
        self.url = ""
        self.folder: Optional[Path] = None
        self.log_path: Optional[Path] = None
        self.state = "stopped"
        self.message = ""
        self.started_at = 0.0
        self._next_check = 0.0
        self._log_handle: Any = None
        atexit.register(self.stop)

    # ---------------------------------------------------------------- lifetime
    def ensure(self, spec: ServerSpec) -> None:
        """Start a server for `spec` unless one is starting or ready for it (a different one, or a ready one
        that died since, is replaced). Returns at once; `poll_ready()` says when it answers. A child that dies
        while starting is left for `poll_ready()` to report with its log: restarting it would retry a bad model
        forever while the panel only ever says 'starting'."""
        if self.proc is not None and self.spec == spec and (
                self.state == "starting" or (self.state == "ready" and self.proc.poll() is None)):
            return
        self.stop()
        self._start(spec)

    def _start(self, spec: ServerSpec) -> None:
        python = find_python(self.python_override)
        self.folder = Path(tempfile.mkdtemp(prefix="meddiffusion-slicer-"))  # 0700: private to this user
        self.log_path = self.folder / "server.log"
        self.token = secrets.token_urlsafe(32)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [python, str(CHILD), str(LIB_ROOT), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--store", str(self.folder / "store"), "--device", spec.device, "--log-level", "info",
               # Raw (uncompressed) uploads on loopback: a 512^3 float volume is 512 MiB plus headers.
               "--max-upload-mb", str(LOCAL_MAX_UPLOAD_MB), "--max-queue", "2",
               *self.extra_args, *spec.model_args]
        env = {k: v for k, v in os.environ.items() if k != "MEDDIFFUSION_TOKEN"}
        env.update(PYTHONUNBUFFERED="1", MEDDIFFUSION_TOKEN=self.token, **self.extra_env)
        self._log_handle = open(self.log_path, "ab")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log_handle,
                                         stderr=subprocess.STDOUT, env=env, cwd=str(self.folder),
                                         creationflags=flags)
        except OSError as exc:
            self._close_log()
            self.state, self.message = "failed", f"cannot start {python}: {exc}"
            raise ServerStartError(f"the local MedDiffusion server could not be started: {exc}") from None
        self.spec = spec
        self.state, self.message = "starting", "starting the local server"
        self.started_at = time.monotonic()
        self._next_check = 0.0
        _log.info("MedDiffusion local server starting: pid %s, %s, log %s", self.proc.pid, self.url, self.log_path)

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop the child (closing its stdin makes it exit; then terminate, then kill) and delete its folder."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=wait_s / 2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=wait_s / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=wait_s)
        self._close_log()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.state, self.spec, self.token = "stopped", None, ""

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    # ---------------------------------------------------------------- state
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 2.0) -> Any:
        from MedDiffusionLib.client import RemoteClient

        return RemoteClient(self.url, token=self.token, timeout=timeout)

    def log_tail(self, max_chars: int = 400) -> str:
        """The end of the server's log (what the panel shows while it starts or after it failed)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, self.log_path.stat().st_size - max_chars))
            return fh.read().decode("utf-8", "replace").strip()

    def poll_ready(self) -> bool:
        """One short check: True when the server answers with our token. Raises ServerStartError when the child
        died or did not come up in time (the message quotes its log)."""
        if self.proc is None:
            raise ServerStartError("the local MedDiffusion server is not running")
        code = self.proc.poll()
        if code is not None:
            tail = self.log_tail()
            self.state, self.message = "failed", f"exited with code {code}"
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc = None
            self._close_log()
            raise ServerStartError(f"the local MedDiffusion server stopped (exit code {code}). End of its log "
                                   f"({self.log_path}):\n{tail}")
        if self.state == "ready":
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + 0.25
        try:
            self.client(HEALTH_TIMEOUT_S).models()  # with the token: proves it is our server, not another one
        except MedDiffusionError:  # no answer yet, or not ours (a bug here is not 'still starting')
            if now - self.started_at > START_TIMEOUT_S:
                tail = self.log_tail()  # stop() deletes the server's folder, its log included
                self.stop()
                self.state = "failed"
                raise ServerStartError(f"the local MedDiffusion server did not answer within {START_TIMEOUT_S:g} s. "
                                       f"End of its log:\n{tail}") from None
            last = self.log_tail(200).splitlines()
            self.message = f"starting the local server ({now - self.started_at:.0f} s)" + \
                (f": {last[-1][-120:]}" if last else "")
            return False
        self.state, self.message = "ready", "local server ready"
        return True

    def check_alive(self) -> bool:
        """After start-up: is the server still answering? (a stale one is replaced by the next `ensure`)"""
        if not self.alive():
            self.state = "failed"
            return False
        try:
            self.client(HEALTH_TIMEOUT_S).health()
        except MedDiffusionError:
            self.state = "failed"
            return False
        return True
