"""Downloading a published model from the Slicer panel: `meddiffusion models pull` in a child process.

Why a child: a multi-GB download and the conversion that follows must neither freeze Slicer nor share its
memory, and Cancel must stop it at once (the child unwinds on SIGTERM and leaves no partial model). The child
reports through a small JSON file (``--progress-file``) that the panel reads on a timer; nothing here blocks
for more than a file read. No Qt: the widget owns the timer, this module the processes.

Two steps, as in the command line: ``ModelCommand.plan(name)`` lists the files and their size (for the consent
dialog), then ``ModelCommand.pull(name)`` downloads and converts; ``DownloadFlow`` strings them together for the
panel (plan, the user's answer, download), one non-blocking step per timer tick.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["ModelCommand", "CommandStatus", "ModelChoice", "model_choices", "model_folder", "launcher", "DownloadFlow",
           "FlowEvent", "consent_text"]


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the panel's model list (from the library's registry: one list for CLI, server and panel)."""

    name: str
    label: str
    available: bool
    downloadable: bool            # a published model that is not downloaded yet
    info: str                     # a line for the panel: what it is, size, where


def model_choices() -> list[ModelChoice]:
    """The registry's models for the panel's list (reads local files only; torch is not imported)."""
    from MedDiffusionLib.registry import human_bytes, list_models

    out = []
    for e in list_models():
        if e.available:
            label = f"{e.name}" + (" (bundled demo)" if e.kind == "bundled" else "")
            info = f"{e.description}. {human_bytes(e.disk_bytes)} in {e.path}"
        elif e.kind == "download":
            label = f"{e.name} (not downloaded, ~{human_bytes(e.download_estimate)})"
            info = f"{e.description}. Not downloaded yet: about {human_bytes(e.download_estimate)} to download."
        else:
            label, info = f"{e.name} (missing)", f"{e.description}. Its folder {e.path} is gone."
        out.append(ModelChoice(e.name, label, e.available, e.kind == "download" and not e.available, info))
    return out


def model_folder(spec: str) -> Path:
    """The folder of a model name or path; a published model that is not downloaded yet says how to get it."""
    from MedDiffusionLib.errors import InputError
    from MedDiffusionLib.registry import human_bytes, model_entry, resolve_model
    from MedDiffusionLib.registry.store import all_model_names

    if spec in all_model_names():
        entry = model_entry(spec)
        if entry.kind == "download" and not entry.available:
            raise InputError(f"the model '{spec}' is not downloaded yet: select it in the Models section and click "
                             f"Download (about {human_bytes(entry.download_estimate)})")
    return resolve_model(spec)


def launcher(python: str = "") -> list[str]:
    """How the panel runs `meddiffusion`: Slicer's Python with server_child.py, which ends the child when Slicer
    goes away (local_server.py finds the interpreter)."""
    from .local_server import CHILD, LIB_ROOT, find_python

    return [find_python(python), str(CHILD), str(LIB_ROOT)]


@dataclass
class CommandStatus:
    state: str                    # starting, running, planned, done, error, cancelled
    stage: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""
    path: str = ""                # the model folder, once done
    plan: Optional[dict] = None   # the download plan (files, sizes), for a plan command

    @property
    def finished(self) -> bool:
        return self.state in ("planned", "done", "error", "cancelled")

    @property
    def fraction(self) -> Optional[float]:
        return self.done_bytes / self.total_bytes if self.total_bytes else None


class ModelCommand:
    """One `python -m MedDiffusionLib models pull ...` child; ``poll()`` from a timer, ``cancel()`` any time."""

    def __init__(self, args: list[str], launcher: list[str], env: Optional[dict[str, str]] = None) -> None:
        """``launcher`` runs the `meddiffusion` command line: in Slicer ``[PythonSlicer, server_child.py, LIBROOT]``
        (local_server.py), elsewhere ``[python, "-m", "MedDiffusionLib"]``."""
        self._dir = Path(tempfile.mkdtemp(prefix="meddiffusion-pull-"))  # 0700: private to this user
        self.progress_file = self._dir / "progress.json"
        self.log_file = self._dir / "pull.log"
        self._cancelled = False
        cmd = [*launcher, "models", "pull", *args, "--progress-file", str(self.progress_file), "--quiet"]
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        with open(self.log_file, "wb") as log:
            # stdin stays open and unused: server_child.py ends the child when Slicer (its other end) goes away.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(self._dir), creationflags=flags)

    @classmethod
    def plan(cls, name: str, launcher: list[str], env: Optional[dict[str, str]] = None) -> "ModelCommand":
        """List what `name` needs (files, sizes); ends in state 'planned' (or 'done' when already there)."""
        return cls([name, "--dry-run"], launcher, env)

    @classmethod
    def pull(cls, name: str, launcher: list[str], env: Optional[dict[str, str]] = None) -> "ModelCommand":
        """Download and convert `name` (the user consented in the panel, hence --yes)."""
        return cls([name, "--yes"], launcher, env)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.progress_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def log_tail(self, max_chars: int = 400) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-max_chars:].strip()
        except OSError:
            return ""

    def poll(self) -> CommandStatus:
        data = self._read()
        code = self.proc.poll()
        state = str(data.get("state") or ("starting" if code is None else "error"))
        if self._cancelled:
            state = "cancelled"
        elif code is not None and state in ("starting", "running"):
            # The child ended without a final report (killed, or failed before it could write one).
            state = "error"
            data.setdefault("message", "")
            data["message"] = data["message"] or self.log_tail() or f"the download stopped (exit code {code})"
        return CommandStatus(state=state, stage=str(data.get("stage") or ""),
                             done_bytes=int(data.get("done_bytes") or 0), total_bytes=int(data.get("total_bytes") or 0),
                             message=str(data.get("message") or ""), path=str(data.get("path") or ""),
                             plan=data.get("plan") if isinstance(data.get("plan"), dict) else None)

    def cancel(self, wait_s: float = 10.0) -> None:
        """Stop the child (SIGTERM: it removes its partial files); kill it if it does not stop in time."""
        self._cancelled = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(wait_s)

    def close(self) -> None:
        """Forget the child's files (call when done with this command)."""
        if self.proc.poll() is None:
            self.cancel()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        for p in (self.progress_file, self.log_file):
            try:
                p.unlink()
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------- the flow
@dataclass
class FlowEvent:
    """What the panel shows after one step: a status line, a consent question, or the end."""

    kind: str                     # working, confirm, done, error, cancelled
    text: str = ""
    fraction: Optional[float] = None
    path: str = ""


def consent_text(name: str, plan: dict) -> str:
    """The download question: the source, every file with its size, the total, where it goes."""
    from MedDiffusionLib.registry import human_bytes

    lines = [f"Download the model '{name}' from the Hugging Face Hub ({plan.get('repo_id')})?", ""]
    for f in plan.get("files") or ():
        state = " (already in the cache)" if f.get("cached") else ""
        lines.append(f"  {f.get('role')}: {f.get('path')}, {human_bytes(f.get('size'))}{state}")
    lines += ["", f"Download: {human_bytes(plan.get('download_bytes'))}. The files are converted once to "
              f"safetensors in {plan.get('dest')}; the originals stay in the Hugging Face cache."]
    return "\n".join(lines)


def progress_text(name: str, status: CommandStatus) -> str:
    from MedDiffusionLib.registry import human_bytes

    if status.stage == "download" and status.total_bytes:
        return (f"Downloading {name}: {human_bytes(status.done_bytes)} of {human_bytes(status.total_bytes)}"
                + (f" ({status.message.split(': ', 1)[-1]})" if status.message else ""))
    if status.stage == "convert":
        return f"Converting {name} to safetensors (once)..."
    return f"Preparing {name}..."


class DownloadFlow:
    """Plan, the user's consent, then the download: ``step()`` once per timer tick, never blocking."""

    def __init__(self, name: str, launcher: list[str], env: Optional[dict[str, str]] = None) -> None:
        self.name = name
        self._launcher = launcher
        self._env = env
        self.phase = "plan"           # plan -> consent -> pull -> finished
        self.command: Optional[ModelCommand] = ModelCommand.plan(name, launcher, env)
        self.plan: Optional[dict] = None

    @property
    def active(self) -> bool:
        return self.phase != "finished"

    def _end(self, event: FlowEvent) -> FlowEvent:
        self.phase = "finished"
        if self.command is not None:
            self.command.close()
            self.command = None
        return event

    def step(self) -> FlowEvent:
        if self.phase == "consent":
            return FlowEvent("confirm", consent_text(self.name, self.plan or {}))
        if self.command is None:
            return FlowEvent("cancelled", f"Download of {self.name} cancelled.")
        status = self.command.poll()
        if not status.finished:
            if self.phase == "plan":
                return FlowEvent("working", f"Looking up {self.name} on the Hugging Face Hub...")
            return FlowEvent("working", progress_text(self.name, status), status.fraction)
        if status.state == "done":
            return self._end(FlowEvent("done", f"{self.name} is ready.", 1.0, status.path))
        if status.state == "planned" and self.phase == "plan":
            self.command.close()
            self.command, self.plan, self.phase = None, status.plan, "consent"
            return FlowEvent("confirm", consent_text(self.name, self.plan or {}))
        if status.state == "cancelled":
            return self._end(FlowEvent("cancelled", f"Download of {self.name} cancelled."))
        return self._end(FlowEvent("error", status.message or self.command.log_tail() or "the download failed"))

    def consent(self, yes: bool) -> None:
        """The answer to the 'confirm' event: start the download, or stop here."""
        if self.phase != "consent":
            return
        if not yes:
            self.phase = "finished"
            return
        self.command, self.phase = ModelCommand.pull(self.name, self._launcher, self._env), "pull"

    def cancel(self) -> None:
        if self.command is not None:
            self.command.cancel()
            self.command.close()
            self.command = None
        self.phase = "finished"
