"""One generation or reconstruction job, advanced in short steps from the main thread (no Python threads).

Inside Slicer the main thread holds the GIL while Qt idles, so the job never runs in this process: it runs in a
job server (the local child process or a remote server), and `PanelJob.step()` -- called by the panel's QTimer
-- only does short things: one health check while the local server starts, one status request when a poll is
due, or at most `budget_s` of moving upload/download bytes. Stages:

    prepare (local server starting) -> submit (generate request / sliced upload) -> run (status polls)
    -> download (sliced, decoded while it arrives) -> done

Cancel closes a transfer at once, or asks the server to cancel and reports the job cancelled as soon as the
server confirms (or after CANCEL_GRACE_S at most: the server then stops at its next sampler step on its own).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .backends import Outcome, reworded_errors
from .parameters import MedDiffusionParameters

__all__ = ["JobState", "PanelJob", "IDLE", "RUNNING", "DONE", "FAILED", "CANCELLED"]

_log = logging.getLogger(__name__)

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
POLL_S = 0.3             # status requests while the server works
CANCEL_GRACE_S = 1.5     # after a cancel request, wait this long at most for the server's confirmation
TRANSFER_BUDGET_S = 0.1  # bytes moved per step(); one step also parses/inflates what arrived


@dataclass(frozen=True)
class JobState:
    """A snapshot of the current job for the panel."""

    state: str = IDLE
    kind: str = ""  # "generate" | "reconstruct"
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    stage: str = ""
    message: str = ""  # user-facing error for FAILED

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def percent(self) -> int:
        return int(round(100.0 * self.step / self.total)) if self.total > 0 else 0

    def describe(self) -> str:
        """One status line: 'sampling: step 12/50, 0:21 elapsed, about 0:34 left'."""
        if self.state == FAILED:
            return f"Failed: {self.message}"
        if self.state == CANCELLED:
            return "Cancelled."
        if self.state == DONE:
            return f"Done in {_clock(self.elapsed_s)}."
        if self.state == IDLE:
            return "Ready."
        parts = [self.stage or "running"]
        if self.total > 0:
            parts[0] += f": step {self.step}/{self.total}"
        parts.append(f"{_clock(self.elapsed_s)} elapsed")
        if self.eta_s is not None and self.total > 0:
            parts.append(f"about {_clock(self.eta_s)} left")
        return ", ".join(parts)


def _clock(seconds: Optional[float]) -> str:
    seconds = max(0, int(round(seconds or 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PanelJob:
    """A job on a job server, driven by `step()`. `request` holds the generate or reconstruct options (the
    client's keyword arguments); `volume` is the reconstruction input (a transfers.VolumeArray)."""

    def __init__(self, kind: str, params: MedDiffusionParameters, backend: Any, request: dict[str, Any],
                 volume: Any = None, max_voxels: int = 1024**3, modality: str = "",
                 complete: Optional[Callable[["PanelJob", Any], None]] = None) -> None:
        self.kind = kind
        self._complete = complete  # fills the request from the model summary in the first step
        self.modality = modality
        self.params = params
        self.backend = backend
        self.request = dict(request)
        self.volume = volume
        self.max_voxels = max_voxels
        self.job_id = ""
        self.outcome: Optional[Outcome] = None
        self.stage = "prepare"
        self._start = time.monotonic()
        self._state = JobState(state=RUNNING, kind=kind, stage="starting")
        self._client: Any = None
        self._transfer: Any = None
        self._watcher: Any = None
        self._final: dict[str, Any] = {}
        self._downloads: list[str] = []
        self._volumes: dict[str, Any] = {}
        self._cancel_at: Optional[float] = None
        self.longest_step_s = 0.0  # the longest single step(): what the GUI froze for at most

    # ---------------------------------------------------------------- the panel's view
    def snapshot(self) -> JobState:
        state = self._state
        if state.state == RUNNING:
            state = replace(state, elapsed_s=time.monotonic() - self._start)
        return state

    def _set(self, **changes: Any) -> None:
        self._state = replace(self._state, **changes)

    def _end(self, state: str, message: str = "") -> None:
        if self._transfer is not None:
            self._transfer.close()
            self._transfer = None
        self._state = replace(self._state, state=state, message=message, eta_s=None,
                              elapsed_s=time.monotonic() - self._start)

    # ---------------------------------------------------------------- driving
    def step(self) -> JobState:
        if self._state.finished:
            return self._state
        began = time.monotonic()
        try:
            from MedDiffusionLib.errors import Cancelled, MedDiffusionError
        except ImportError:  # pragma: no cover
            Cancelled = MedDiffusionError = ()  # type: ignore[assignment,misc]
        try:
            with reworded_errors(self.backend.url, self.job_id, bool(self.backend.token)):
                self._advance()
        except Cancelled:
            self._end(CANCELLED)
        except MedDiffusionError as exc:  # meant for the user: the message alone
            self._end(CANCELLED if self._cancel_at is not None else FAILED, str(exc))
        except Exception as exc:  # a bug or an environment problem: keep the traceback in the log
            _log.exception("MedDiffusion %s failed", self.kind)
            self._end(CANCELLED if self._cancel_at is not None else FAILED, f"{type(exc).__name__}: {exc}")
        self.longest_step_s = max(self.longest_step_s, time.monotonic() - began)
        return self.snapshot()

    def _advance(self) -> None:
        if self.stage == "prepare":
            if self._cancel_at is not None:
                return self._end(CANCELLED)
            if not self.backend.prepare(self.params):
                self._set(stage=self.backend.status or "starting the job server")
                return
            self._client = self.backend.client()
            if self._complete is not None:
                self._complete(self, self.backend.model_summary(self.params))
            self.stage = "submit"
        if self.stage == "submit":
            self._submit()
        elif self.stage == "run":
            self._poll()
        elif self.stage == "download":
            self._download()

    def _submit(self) -> None:
        if self._cancel_at is not None:
            return self._end(CANCELLED)
        if self.kind == "generate":
            self._set(stage="submitting")
            self.job_id = str(self._client.generate(**self.request))
        else:
            if self._transfer is None:
                self._transfer = self._client.start_reconstruct_upload(self.volume, **self.request)
            sent = self._transfer.bytes_moved
            self._set(stage=f"uploading ({sent / 2**20:.0f} MB sent)")
            if not self._transfer.step(TRANSFER_BUDGET_S):
                return
            self.job_id = str(self._transfer.result["id"])
            self._transfer = None
            self.volume = None  # the server has it; do not keep the input alive here
        from MedDiffusionLib.client import JobWatcher

        _log.info("MedDiffusion %s job %s submitted to %s", self.kind, self.job_id[:8], self.backend.url)
        self._watcher = JobWatcher(self._client, self.job_id, POLL_S)
        self.stage = "run"
        self._set(stage="queued")

    def _poll(self) -> None:
        if self._cancel_at is not None and time.monotonic() - self._cancel_at > CANCEL_GRACE_S:
            return self._end(CANCELLED)  # the server stops at its next step by itself
        if not self._watcher.due():
            return
        status = self._watcher.poll()
        if status is None:  # a missed poll (tunnel hiccup); the watcher backs off
            return
        if self._cancel_at is not None:
            return  # waiting for 'cancelled' (raised by the watcher as JobCancelled)
        state = status.get("state")
        if state == "done":
            self._final = status
            self._downloads = ["result"]
            if self.kind == "reconstruct" and self.params.simulate and "degraded" in (status.get("outputs") or ()):
                self._downloads.append("degraded")
            self.stage = "download"
            self._set(stage="downloading", step=0, total=0, eta_s=None)
            return
        if state == "queued":
            position = status.get("queue_position")
            self._set(stage=f"queued on the server (position {position})" if position else "queued", step=0,
                      total=0, eta_s=None)
            return
        self._set(step=int(status.get("step") or 0), total=int(status.get("total") or 0), eta_s=status.get("eta_s"),
                  stage=str(status.get("stage") or "running"))

    def _download(self) -> None:
        if self._cancel_at is not None:
            return self._end(CANCELLED)
        which = self._downloads[0]
        if self._transfer is None:
            self._transfer = self._client.start_download(self.job_id, which, self.max_voxels)
        got = self._transfer.bytes_moved
        self._set(stage=f"downloading the {which} volume ({got / 2**20:.0f} MB)")
        if not self._transfer.step(TRANSFER_BUDGET_S):
            return
        self._volumes[which] = self._transfer.volume
        self._transfer = None
        self._downloads.pop(0)
        if not self._downloads:
            self.outcome = self._outcome()
            self._end(DONE)

    def _outcome(self) -> Outcome:
        info = self._final.get("info") or {}
        anatomy = str(info.get("anatomy") or self.request.get("anatomy") or "")
        seed = info.get("seed", self.request.get("seed"))
        provenance = {"backend": self.backend.name, "job": self.job_id,
                      "sampler": str(info.get("sampler") or self.params.sampler),
                      "steps": str(info.get("steps") or self.request.get("steps") or "")}
        if self.kind == "reconstruct":
            provenance["method"] = str(info.get("method") or self.request.get("method") or "")
        if self.backend.name == "remote":
            provenance["server"] = self.backend.url
        if self.request.get("hu_range"):
            provenance["hu_range"] = "{:g},{:g}".format(*self.request["hu_range"])
        modality = "CT" if (self.kind == "reconstruct" and self.params.task == "sparse-ct") else \
            "MR" if self.kind == "reconstruct" else (self.modality or "CT")
        return Outcome(volume=self._volumes["result"], degraded=self._volumes.get("degraded"),
                       seed=int(seed) if seed is not None else None, modality=modality, anatomy=anatomy,
                       info=provenance)

    # ---------------------------------------------------------------- cancel
    def cancel(self) -> None:
        """Stop at once when nothing runs on the server yet; else ask the server (one short request)."""
        if self._state.finished or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        self._set(stage="cancelling")
        if self.job_id and self.stage == "run":
            try:
                self._client.cancel(self.job_id)
            except Exception as exc:  # the job is abandoned either way; say so in the log only
                _log.warning("could not cancel server job %s: %s", self.job_id[:8], exc)
                self._end(CANCELLED)
            if self._watcher is not None:
                self._watcher.next_poll_s = 0.0  # confirm at the next step
        else:
            self._end(CANCELLED)
