"""Progress of a run and status of a job: the one progress type and the one job-status type of the project.

`ProgressInfo` is what a pipeline reports for its current stage (sampling, decoding, ...). `JobStatus` is a job's
snapshot: its state, the `ProgressInfo` of the stage it is in, the overall fraction, errors and (once done) what
the result says. The pipelines emit ProgressInfo, the CLI prints it, the server stores it and sends JobStatus
as JSON (`to_json`), the client reads it back (`from_json`) and the Slicer panel shows it (`describe`): the same
two types from the sampler loop to the status line.

This module imports nothing heavy (no torch, numpy or SimpleITK): the client and the Slicer panel use it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Union

from .errors import Cancelled

if TYPE_CHECKING:
    from .results import GenerationResult, ReconstructionResult

__all__ = ["ProgressInfo", "ProgressCallback", "CancelFlag", "check_cancel", "ProgressTracker", "JobStatus",
           "JOB_STATES", "FINISHED_STATES", "IDLE", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"]

# The states of a job on the wire; IDLE ("no job yet") exists only in a front end (the panel before a run).
QUEUED, RUNNING, DONE, FAILED, CANCELLED, IDLE = "queued", "running", "done", "failed", "cancelled", "idle"
JOB_STATES: tuple[str, ...] = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED_STATES: tuple[str, ...] = (DONE, FAILED, CANCELLED)


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a threading.Event): set means stop at the next step."""

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        ...


@dataclass(frozen=True)
class ProgressInfo:
    """One stage's progress: `step` of `total` done after `elapsed_s` seconds, about `eta_s` left (None: unknown)."""

    step: int
    total: int
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    stage: str = "sampling"

    @property
    def fraction(self) -> float:
        """Share of the stage done, in [0, 1]."""
        return self.step / self.total if self.total else 0.0


ProgressCallback = Callable[[ProgressInfo], None]


def check_cancel(cancel: Optional[CancelFlag]) -> None:
    """Raise Cancelled when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")


class ProgressTracker:
    """Counts steps of one stage, estimates the ETA from the mean step time, and honours cancel.

    Args:
        total: steps in the stage (at least 1 is counted).
        callback: receives a `ProgressInfo` at `begin` and after every `advance`; None: nothing is reported.
        cancel: checked at `begin` and after every `advance`; when set, `Cancelled` is raised there.
        stage: the stage's name ("sampling", "decoding", ...), shown by front ends.
    """

    def __init__(self, total: int, callback: Optional[ProgressCallback], cancel: Optional[CancelFlag],
                 stage: str = "sampling") -> None:
        self.total = max(int(total), 1)
        self.callback = callback
        self.cancel = cancel
        self.stage = stage
        self.start = time.perf_counter()
        self.step = 0

    def begin(self) -> None:
        """Report step 0 of the stage (and honour a cancel that came before it started)."""
        check_cancel(self.cancel)
        self._emit()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more steps, report them, then stop here if cancelled."""
        self.step = min(self.step + n, self.total)
        self._emit()
        check_cancel(self.cancel)

    def _emit(self) -> None:
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.step * (self.total - self.step) if self.step else None
        self.callback(ProgressInfo(self.step, self.total, elapsed, eta, self.stage))


@dataclass(frozen=True)
class JobStatus:
    """A job's snapshot. On the wire (`to_json`) the current stage's ProgressInfo is flat: ``stage``, ``step``,
    ``total``, ``eta_s``, ``stage_elapsed_s``; ``progress`` is the whole job's fraction; times are ISO 8601 UTC."""

    state: str = IDLE
    kind: str = ""                          # "generate" | "reconstruct"
    id: str = ""
    current: Optional[ProgressInfo] = None  # the stage the job is in (None: no stage reported yet)
    progress: float = 0.0                   # the whole job, 0..1
    elapsed_s: float = 0.0                  # since the job started running (the panel: since the user asked)
    queue_position: Optional[int] = None    # 1 = next to run, while queued
    error: Optional[str] = None             # why it failed, for the user
    created: Optional[float] = None         # POSIX times
    started: Optional[float] = None
    finished: Optional[float] = None
    expires: Optional[float] = None         # when the server deletes the results
    params: Mapping[str, Any] = field(default_factory=dict)   # the validated options the job runs with
    outputs: tuple[str, ...] = ()           # downloadable volumes: "result", "degraded"
    info: Mapping[str, Any] = field(default_factory=dict)     # once done: the result's `info()`

    # ---- the views a front end needs ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Queued or running: the job has not ended."""
        return self.state in (QUEUED, RUNNING)

    @property
    def ended(self) -> bool:
        """Done, failed or cancelled (`finished` is the time it ended)."""
        return self.state in FINISHED_STATES

    @property
    def stage(self) -> str:
        """The current stage's name ("" before the job starts)."""
        return self.current.stage if self.current is not None else ""

    @property
    def step(self) -> int:
        """Steps done in the current stage."""
        return self.current.step if self.current is not None else 0

    @property
    def total(self) -> int:
        """Steps of the current stage."""
        return self.current.total if self.current is not None else 0

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds the current stage still needs, if known."""
        return self.current.eta_s if self.current is not None else None

    def with_stage(self, stage: str, step: int = 0, total: int = 0, eta_s: Optional[float] = None,
                   **changes: Any) -> "JobStatus":
        """A copy in another stage (a front end's own stages: starting, uploading, downloading).

        Args:
            stage: the stage's name.
            step: steps done in it.
            total: its steps (0: no count shown).
            eta_s: seconds left, if known.
            **changes: other fields to replace (e.g. state, elapsed_s).
        """
        return replace(self, current=ProgressInfo(step, total, 0.0, eta_s, stage), **changes)

    def describe(self) -> str:
        """One status line: 'sampling: step 12/50, 0:21 elapsed, about 0:34 left'."""
        if self.state == FAILED:
            return f"Failed: {self.error or 'no reason given'}"
        if self.state == CANCELLED:
            return "Cancelled."
        if self.state == DONE:
            return f"Done in {_clock(self.elapsed_s)}."
        if self.state == IDLE:
            return "Ready."
        if self.state == QUEUED:
            head = "queued" + (f" on the server (position {self.queue_position})" if self.queue_position else "")
        else:
            head = self.stage or "running"
            if self.total > 0:
                head += f": step {self.step}/{self.total}"
        parts = [head, f"{_clock(self.elapsed_s)} elapsed"]
        if self.eta_s is not None and self.total > 0 and self.state == RUNNING:
            parts.append(f"about {_clock(self.eta_s)} left")
        return ", ".join(parts)

    def result(self) -> Union["GenerationResult", "ReconstructionResult"]:
        """What the finished job's result says (`info`), as the task's result type, without its volumes."""
        from .results import result_from_info

        return result_from_info(self.kind, self.info)

    # ---- the wire format -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON object the server sends (docs/SERVER.md, "Job status")."""
        cur = self.current
        return {"id": self.id, "kind": self.kind, "state": self.state, "progress": min(max(self.progress, 0.0), 1.0),
                "stage": cur.stage if cur is not None else None,
                "step": cur.step if cur is not None else None,
                "total": cur.total if cur is not None else None,
                "eta_s": _finite(cur.eta_s) if cur is not None else None,
                "stage_elapsed_s": _finite(cur.elapsed_s) if cur is not None else None,
                "elapsed_s": _finite(self.elapsed_s), "queue_position": self.queue_position, "error": self.error,
                "created": _iso(self.created), "started": _iso(self.started), "finished": _iso(self.finished),
                "expires": _iso(self.expires), "params": dict(self.params), "outputs": list(self.outputs),
                "info": dict(self.info)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "JobStatus":
        """The status from the server's JSON; fields a newer server adds are ignored, missing ones default.

        Raises:
            ValueError: a number or time field that does not parse (TypeError for a number of the wrong type).
        """
        stage = data.get("stage")
        current = None if stage is None else ProgressInfo(int(data.get("step") or 0), int(data.get("total") or 0),
                                                          float(data.get("stage_elapsed_s") or 0.0),
                                                          _float_or_none(data.get("eta_s")), str(stage))
        queue = data.get("queue_position")
        return cls(state=str(data.get("state", "")), kind=str(data.get("kind", "")), id=str(data.get("id", "")),
                   current=current, progress=float(data.get("progress") or 0.0),
                   elapsed_s=float(data.get("elapsed_s") or 0.0),
                   queue_position=None if queue is None else int(queue), error=data.get("error"),
                   created=_posix(data.get("created")), started=_posix(data.get("started")),
                   finished=_posix(data.get("finished")), expires=_posix(data.get("expires")),
                   params=dict(data.get("params") or {}), outputs=tuple(data.get("outputs") or ()),
                   info=dict(data.get("info") or {}))


def _clock(seconds: Optional[float]) -> str:
    seconds = max(0, int(round(seconds or 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def _float_or_none(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _posix(text: Any) -> Optional[float]:
    if not text:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
