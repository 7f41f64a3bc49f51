"""A bounded job queue and one worker thread per device (`serve --devices cuda:0,cuda:1`), all pulling from it.

One worker per device because a GPU runs one sampling loop efficiently at a time and two would compete for its
memory; each worker owns its device's pipelines, so no network is shared between threads.
The queue bound turns overload into an immediate 429 instead of hours of hidden waiting. Progress from the
pipeline callbacks is written into the in-memory record, which status requests read.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import SimpleITK as sitk

from ..errors import Cancelled, MedDiffusionError
from ..progress import ProgressCallback, ProgressInfo
from .security import new_job_id
from .store import JobRecord, JobStore

log = logging.getLogger("meddiffusion.server")

# Overall progress: sampling dominates the run time; decoding and writing share the rest. Other stages (those a
# reconstruction adds after decoding, for example) report their own step/total but leave the overall value.
CANCELLING = "cancelling"  # the stage shown between a cancel request and the pipeline stopping
STAGE_SPANS = {"preparing": (0.0, 0.02), "sampling": (0.02, 0.9), "decoding": (0.9, 0.98), "writing": (0.98, 1.0)}


class QueueFull(MedDiffusionError):
    """Too many jobs are waiting; the client should retry later (HTTP 429)."""


@dataclass
class RunOutput:
    """What a runner hands back: the output volumes by name and the job's info."""
    images: dict[str, sitk.Image]
    info: dict[str, Any] = field(default_factory=dict)


# runner(record, input_path_or_None, progress_callback, cancel_event) -> RunOutput
Runner = Callable[[JobRecord, Optional[Path], ProgressCallback, threading.Event], RunOutput]


@dataclass
class Worker:
    """What one worker thread runs jobs with: its runners (bound to its device) and an after-job hook."""
    runners: Mapping[str, Runner]
    after_job: Optional[Callable[[], None]] = None  # e.g. release cached GPU memory between jobs
    name: str = "worker"


class JobManager:
    """`runners` for one worker, or a list of Workers (one thread each, e.g. one per GPU) sharing the queue."""

    def __init__(self, store: JobStore, runners: Mapping[str, Runner] | Sequence[Worker], max_queue: int = 8,
                 after_job: Optional[Callable[[], None]] = None) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.store = store
        self.workers = [Worker(dict(runners), after_job)] if isinstance(runners, Mapping) else list(runners)
        if not self.workers or any(set(w.runners) != set(self.workers[0].runners) for w in self.workers):
            raise ValueError("every worker needs the same job kinds")
        self.runners = dict(self.workers[0].runners)
        self.max_queue = int(max_queue)
        self._queue: deque[str] = deque()
        self._cancels: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._running: dict[int, str] = {}  # worker index -> job id
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one thread per worker (once)."""
        if not self._threads:
            for i, w in enumerate(self.workers):
                t = threading.Thread(target=self._worker, args=(i,), name=f"meddiffusion-{w.name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker: the running job is interrupted but left 'running' on disk, so the next start reports
        it (and the still-queued ones) as failed because of the restart, exactly as after a crash."""
        with self._cond:
            self._stopping = True
            for event in self._cancels.values():
                event.set()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))

    # ---- requests ------------------------------------------------------------------------------------
    def queued_count(self) -> int:
        """Jobs waiting in the queue."""
        with self._cond:
            return len(self._queue)

    def is_full(self) -> bool:
        """Whether the queue is at its limit (new jobs are refused with 503)."""
        return self.queued_count() >= self.max_queue

    def queue_position(self, job_id: str) -> Optional[int]:
        """1 = next to run; None when not waiting."""
        with self._cond:
            try:
                return self._queue.index(job_id) + 1
            except ValueError:
                return None

    @property
    def running_id(self) -> Optional[str]:
        """One running job (the first worker's), for callers that think of one device."""
        ids = self.running_ids
        return ids[0] if ids else None

    @property
    def running_ids(self) -> list[str]:
        """Ids of the running jobs, by worker."""
        with self._cond:
            return [self._running[i] for i in sorted(self._running)]

    def submit(self, kind: str, params: dict[str, Any], input_file: Optional[Path] = None,
               input_suffix: str = "") -> JobRecord:
        """Queue a job (QueueFull when the queue is at its limit); returns its record."""
        if kind not in self.runners:
            raise MedDiffusionError(f"this server cannot run '{kind}' jobs")
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the job queue is full ({self.max_queue} waiting); try again later")
            rec = JobRecord(id=new_job_id(), kind=kind, params=params)
            self.store.add(rec, input_file, input_suffix)
            self._cancels[rec.id] = threading.Event()
            self._queue.append(rec.id)
            self._cond.notify_all()
        log.info("job %s queued: %s %s", rec.id[:8], kind, params)
        return rec

    def cancel(self, job_id: str) -> Optional[JobRecord]:
        """Queued jobs end at once; a running job stops at its next sampler step. Finished jobs are unchanged."""
        with self._cond:
            rec = self.store.get(job_id)
            if rec is None:
                return None
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._cancels.pop(job_id, None)
                self.store.finish(job_id, "cancelled", "cancelled by the user")
            elif rec.state in ("queued", "running") and job_id in self._cancels:  # picked up, maybe not started
                self._cancels[job_id].set()
                self.store.update(job_id, current=ProgressInfo(0, 0, stage=CANCELLING))
        return rec

    # ---- worker --------------------------------------------------------------------------------------
    def _next(self, index: int) -> Optional[str]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job_id = self._queue.popleft()
            self._running[index] = job_id
            return job_id

    def _worker(self, index: int) -> None:
        worker = self.workers[index]
        while True:
            job_id = self._next(index)
            if job_id is None:
                return
            try:
                self._run(job_id, worker.runners)
            except Exception:  # never let one job kill the worker
                log.exception("job %s: unexpected error in the worker", job_id[:8])
            finally:
                with self._cond:
                    self._running.pop(index, None)
                    self._cancels.pop(job_id, None)
                if worker.after_job is not None:
                    try:
                        worker.after_job()
                    except Exception:
                        log.exception("after-job hook failed")

    def _progress_callback(self, job_id: str) -> ProgressCallback:
        def report(info: ProgressInfo) -> None:
            rec = self.store.get(job_id)
            overall = rec.progress if rec is not None else 0.0
            span = STAGE_SPANS.get(info.stage)
            if span is not None:
                overall = max(overall, span[0] + (span[1] - span[0]) * info.fraction)
            if rec is not None and rec.current is not None and rec.current.stage == CANCELLING:
                info = replace(info, stage=CANCELLING)  # until the pipeline stops, the user sees the cancel
            self.store.update(job_id, progress=min(overall, 1.0), current=info)
        return report

    def _run(self, job_id: str, runners: Mapping[str, Runner]) -> None:
        rec = self.store.get(job_id)
        cancel = self._cancels.get(job_id)
        if rec is None or cancel is None:
            return
        runner = runners[rec.kind]
        if cancel.is_set():
            self.store.finish(job_id, "cancelled", "cancelled by the user")
            return
        self.store.update(job_id, persist=True, state="running", started=time.time(),
                          current=ProgressInfo(0, 0, stage="starting"))
        log.info("job %s running", job_id[:8])
        try:
            out = runner(rec, self.store.input_path(rec), self._progress_callback(job_id), cancel)
            report = self._progress_callback(job_id)
            for i, (name, image) in enumerate(out.images.items()):
                report(ProgressInfo(i, len(out.images), 0.0, None, "writing"))
                self.store.write_output(job_id, name, image)
            self.store.finish(job_id, "done", None, progress=1.0, outputs=list(out.images), info=out.info)
            log.info("job %s done", job_id[:8])
        except Cancelled:
            if self._stopping:
                log.info("job %s interrupted by the server shutdown", job_id[:8])
                return  # stays 'running' on disk: reported failed by the restart
            self.store.finish(job_id, "cancelled", "cancelled by the user")
            log.info("job %s cancelled", job_id[:8])
        except MedDiffusionError as exc:
            self.store.finish(job_id, "failed", str(exc))
            log.info("job %s failed: %s", job_id[:8], exc)
        except Exception as exc:
            log.exception("job %s crashed", job_id[:8])
            self.store.finish(job_id, "failed", describe_crash(exc))


def describe_crash(exc: BaseException) -> str:
    """A message a user can act on for errors that are not MedDiffusionErrors."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return ("the server ran out of memory for this job; try a smaller size, or wait for other work on the "
                f"GPU to finish ({type(exc).__name__})")
    return f"internal error ({type(exc).__name__}: {text[:300]})"
