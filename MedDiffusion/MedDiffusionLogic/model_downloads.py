"""Downloading a published model from the Slicer panel: `meddiffusion models pull` in a child process.

Why a child: a multi-GB download and the conversion that follows must neither freeze Slicer nor share its
memory, and Cancel must stop it at once (the child unwinds on SIGTERM and leaves no partial model). The child
reports through a small JSON file (``--progress-file``) that the panel reads on a timer; nothing here blocks
for more than a file read. No Qt: the widget owns the timer, this module the processes.

Two steps, as in the command line: ``ModelCommand.plan(name)`` lists the files and their size (for the consent
dialog), then ``ModelCommand.pull(name)`` downloads and converts.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["ModelCommand", "CommandStatus"]


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

    def __init__(self, args: list[str], python: str, env: Optional[dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="meddiffusion-pull-"))
        self.progress_file = self._dir / "progress.json"
        self.log_file = self._dir / "pull.log"
        self._cancelled = False
        cmd = [python, "-m", "MedDiffusionLib", "models", "pull", *args, "--progress-file", str(self.progress_file),
               "--quiet"]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=cwd)

    @classmethod
    def plan(cls, name: str, python: str, env: Optional[dict[str, str]] = None,
             cwd: Optional[str] = None) -> "ModelCommand":
        """List what `name` needs (files, sizes); ends in state 'planned' (or 'done' when already there)."""
        return cls([name, "--dry-run"], python, env, cwd)

    @classmethod
    def pull(cls, name: str, python: str, env: Optional[dict[str, str]] = None,
             cwd: Optional[str] = None) -> "ModelCommand":
        """Download and convert `name` (the user consented in the panel, hence --yes)."""
        return cls([name, "--yes"], python, env, cwd)

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
        for p in (self.progress_file, self.log_file):
            try:
                p.unlink()
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass
