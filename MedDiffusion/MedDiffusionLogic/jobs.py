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
from dataclasses import replace
from typing import Any, Callable, Optional, Union

from MedDiffusionLib.errors import Cancelled, MedDiffusionError
from MedDiffusionLib.progress import CANCELLED, DONE, FAILED, IDLE, QUEUED, RUNNING, JobStatus
from MedDiffusionLib.results import GenerationResult, ReconstructionResult

from .backends import reworded_errors
from .parameters import MedDiffusionParameters

__all__ = ["PanelJob", "IDLE", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"]

_log = logging.getLogger(__name__)

POLL_S = 0.3             # status requests while the server works
CANCEL_GRACE_S = 1.5     # after a cancel request, wait this long at most for the server's confirmation
TRANSFER_BUDGET_S = 0.1  # bytes moved per step(); one step also parses/inflates what arrived


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
        # Once done: the server's result (volumes as transfers.VolumeArray) and where it came from (node attributes)
        self.result: Optional[Union[GenerationResult, ReconstructionResult]] = None
        self.provenance: dict[str, str] = {}
        self.stage = "prepare"
        self._start = time.monotonic()
        self._state = JobStatus(state=RUNNING, kind=kind).with_stage("starting")
        self._client: Any = None
        self._transfer: Any = None
        self._watcher: Any = None
        self._final = JobStatus()
        self._downloads: list[str] = []
        self._volumes: dict[str, Any] = {}
        self._cancel_at: Optional[float] = None
        self.longest_step_s = 0.0  # the longest single step(): what the GUI froze for at most

    # ---------------------------------------------------------------- the panel's view
    def snapshot(self) -> JobStatus:
        """The job as the panel shows it: the server's JobStatus while it runs there, the panel's own stages
        (starting, uploading, downloading) before and after; elapsed time since the user asked."""
        state = self._state
        if state.running:
            state = replace(state, elapsed_s=time.monotonic() - self._start)
        return state

    def _set_stage(self, stage: str) -> None:
        self._state = self._state.with_stage(stage, state=RUNNING, queue_position=None)

    def _end(self, state: str, message: str = "") -> None:
        if self._transfer is not None:
            self._transfer.close()
            self._transfer = None
        current = self._state.current
        self._state = replace(self._state, state=state, error=message or None,
                              current=replace(current, eta_s=None) if current is not None else None,
                              elapsed_s=time.monotonic() - self._start, finished=time.time())

    # ---------------------------------------------------------------- driving
    def step(self) -> JobStatus:
        if self._state.ended:
            return self._state
        began = time.monotonic()
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
                self._set_stage(self.backend.status or "starting the job server")
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
            self._set_stage("submitting")
            self.job_id = str(self._client.generate(**self.request))
        else:
            if self._transfer is None:
                self._transfer = self._client.start_reconstruct_upload(self.volume, **self.request)
            sent = self._transfer.bytes_moved
            self._set_stage(f"uploading ({sent / 2**20:.0f} MB sent)")
            if not self._transfer.step(TRANSFER_BUDGET_S):
                return
            self.job_id = str(self._transfer.result["id"])
            self._transfer = None
            self.volume = None  # the server has it; do not keep the input alive here
        from MedDiffusionLib.client import JobWatcher

        _log.info("MedDiffusion %s job %s submitted to %s", self.kind, self.job_id[:8], self.backend.url)
        self._watcher = JobWatcher(self._client, self.job_id, POLL_S)
        self.stage = "run"
        self._state = replace(self._state, state=QUEUED, id=self.job_id, current=None)

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
        if status.state == DONE:
            self._final = status
            self._downloads = ["result"]
            if self.kind == "reconstruct" and self.params.simulate and "degraded" in status.outputs:
                self._downloads.append("degraded")
            self.stage = "download"
            self._set_stage("downloading")
            return
        # The server's view as it is (queue position, the pipeline's ProgressInfo); the panel keeps its clock.
        self._state = replace(status, elapsed_s=self._state.elapsed_s)

    def _download(self) -> None:
        if self._cancel_at is not None:
            return self._end(CANCELLED)
        which = self._downloads[0]
        if self._transfer is None:
            self._transfer = self._client.start_download(self.job_id, which, self.max_voxels)
        got = self._transfer.bytes_moved
        self._set_stage(f"downloading the {which} volume ({got / 2**20:.0f} MB)")
        if not self._transfer.step(TRANSFER_BUDGET_S):
            return
        self._volumes[which] = self._transfer.volume
        self._transfer = None
        self._downloads.pop(0)
        if not self._downloads:
            self.result = self._final.result()  # the pipeline's result type, as the server reported it
            self.result.image = self._volumes["result"]
            if isinstance(self.result, ReconstructionResult):
                self.result.degraded = self._volumes.get("degraded")
            self.provenance = self._provenance(self.result)
            self._end(DONE)

    def _provenance(self, result: Union[GenerationResult, ReconstructionResult]) -> dict[str, str]:
        """Where the volumes came from, for the nodes' attributes."""
        provenance = {"backend": self.backend.name, "job": self.job_id, "sampler": result.sampler or "",
                      "steps": str(result.steps or "")}
        if isinstance(result, ReconstructionResult):
            provenance["method"] = result.method
        if self.backend.name == "remote":
            provenance["server"] = self.backend.url
        if self.request.get("hu_range"):
            provenance["hu_range"] = "{:g},{:g}".format(*self.request["hu_range"])
        return provenance

    # ---------------------------------------------------------------- cancel
    def cancel(self) -> None:
        """Stop at once when nothing runs on the server yet; else ask the server (one short request)."""
        if self._state.ended or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        self._set_stage("cancelling")
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
