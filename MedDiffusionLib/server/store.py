"""Job records (JSON) and result volumes (NRRD) on disk, so results survive a server restart.

Layout under the store folder::

    .meddiffusion-store           marker: this folder belongs to the server (see ``claim_store_dir``)
    jobs/<job id>/job.json        the record, rewritten atomically on every state change
    jobs/<job id>/input.<ext>     a reconstruction job's uploaded volume (deleted when the job ends)
    jobs/<job id>/<output>.nrrd   "result", and "degraded" for reconstructions
    uploads/                      uploads being received; leftovers are deleted at startup

Job ids are validated before they become folder names; nothing a client sends is used as a path.
Progress lives in memory only: it changes many times a second and is meaningless after a restart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import SimpleITK as sitk

from ..errors import InputError
from ..io.atomic import atomic_write_text
from ..io.volumes import write_volume
from ..progress import FINISHED_STATES, QUEUED, RUNNING, ProgressInfo
from .security import is_valid_job_id

log = logging.getLogger("meddiffusion.server")

ACTIVE_STATES = (QUEUED, RUNNING)
RESTART_REASON = "server restarted while the job was running"
OUTPUT_NAMES = ("result", "degraded")
STORE_MARKER = ".meddiffusion-store"
# A store written before the marker existed holds nothing but these two folders, with only job folders
# (each with its job.json) and upload leftovers in them; such a folder is adopted.
_LEGACY_ENTRIES = {"jobs", "uploads"}


class StoreDirError(InputError):
    """The --store folder is not the server's own (it would chmod it and delete files in it)."""


def claim_store_dir(root: str | os.PathLike[str]) -> Path:
    """Make sure ``root`` is the server's own folder before anything in it is changed; returns it absolute.

    A missing or empty folder is created and marked; a marked folder is reused; anything else (a non-empty
    folder without the marker, a file) is refused, because the server restricts the folder to its owner and
    deletes leftovers and expired results in it."""
    root = Path(root).expanduser().absolute()
    marker = root / STORE_MARKER
    if root.exists() and not root.is_dir():
        raise StoreDirError(f"the server store '{root}' is not a folder; choose a new or empty folder for --store")
    if marker.is_file():
        return root
    if root.is_dir():
        try:
            entries = {e.name for e in root.iterdir()}
        except OSError as exc:
            raise StoreDirError(f"cannot list the server store '{root}': {exc.strerror or exc}") from None
        if entries and not _is_legacy_store(root, entries):
            raise StoreDirError(
                f"refusing to use '{root}' as the server store: the folder is not empty and has no "
                f"{STORE_MARKER} marker, so it is not a MedDiffusion store (the server deletes files in its store "
                "and makes it private). Choose a new or empty folder for --store")
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text("MedDiffusion server store: job records and results; expired files are deleted.\n",
                          encoding="utf-8")
    except OSError as exc:
        raise StoreDirError(f"cannot create the server store '{root}': {exc.strerror or exc}") from None
    return root


@dataclass
class JobRecord:
    """A job as the store keeps it in job.json: kind, parameters, state, progress, times, outputs."""
    id: str
    kind: str                      # "generate" | "reconstruct"
    params: dict[str, Any]
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    progress: float = 0.0                    # the whole job, 0..1
    current: Optional[ProgressInfo] = None   # the stage it is in, as the pipeline reported it
    outputs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    input_name: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobRecord":
        """A record from job.json (unknown keys from other versions are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if values.get("current") is not None:
            values["current"] = ProgressInfo(**values["current"])
        return cls(**values)


def _is_legacy_store(root: Path, entries: set[str]) -> bool:
    if not entries <= _LEGACY_ENTRIES or not all((root / e).is_dir() for e in entries):
        return False
    jobs = list((root / "jobs").iterdir()) if "jobs" in entries else []
    uploads = list((root / "uploads").iterdir()) if "uploads" in entries else []
    return (all(is_valid_job_id(j.name) and (j / "job.json").is_file() for j in jobs)
            and all(u.name.startswith("upload-") and u.is_file() for u in uploads))


class JobStore:
    """Thread-safe table of job records mirrored to disk, with time-to-live expiry of finished jobs."""

    def __init__(self, root: str | os.PathLike[str], ttl_s: float) -> None:
        self.root = claim_store_dir(root)  # before any chmod or deletion below
        self.jobs_dir = self.root / "jobs"
        self.uploads_dir = self.root / "uploads"
        self.ttl_s = float(ttl_s)
        self._records: dict[str, JobRecord] = {}
        self._lock = threading.RLock()
        for d in (self.root, self.jobs_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)  # results may be patient-like data: owner only

    # ---- startup -------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Load the records left by a previous run; jobs it left queued or running can never finish now."""
        counts = {"loaded": 0, "failed_on_restart": 0, "dropped": 0}
        for leftover in self.uploads_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        now = time.time()
        for job_dir in sorted(self.jobs_dir.iterdir()):
            if not job_dir.is_dir() or not is_valid_job_id(job_dir.name):
                continue
            try:
                rec = JobRecord.from_json(json.loads((job_dir / "job.json").read_text(encoding="utf-8")))
                if rec.id != job_dir.name:
                    raise ValueError("id does not match its folder")
            except (OSError, ValueError, TypeError) as exc:
                log.warning("dropping unreadable job folder %s: %s", job_dir.name, exc)
                shutil.rmtree(job_dir, ignore_errors=True)
                counts["dropped"] += 1
                continue
            if rec.state in ACTIVE_STATES:
                rec.state, rec.error, rec.finished = "failed", RESTART_REASON, now
                rec.current = None
                counts["failed_on_restart"] += 1
            elif rec.state == "done" and any(not (job_dir / f"{o}.nrrd").is_file() for o in rec.outputs):
                rec.state, rec.error = "failed", "the result file is missing from the server's store"
            self._drop_input(rec)
            with self._lock:
                self._records[rec.id] = rec
            self.save(rec)
            counts["loaded"] += 1
        self.purge_expired()
        return counts

    # ---- records -------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The job's folder; KeyError for an id the server could not have issued (never a path outside the store)."""
        if not is_valid_job_id(job_id):
            raise KeyError(job_id)
        return self.jobs_dir / job_id

    def add(self, rec: JobRecord, input_file: Optional[Path] = None, input_suffix: str = "") -> None:
        """Register a new job; an upload is moved (same file system, so a rename) into the job folder."""
        d = self.job_dir(rec.id)
        d.mkdir(mode=0o700)
        if input_file is not None:
            rec.input_name = f"input{input_suffix}"
            os.replace(input_file, d / rec.input_name)
        with self._lock:
            self._records[rec.id] = rec
        self.save(rec)

    def save(self, rec: JobRecord) -> None:
        """Write the record's job.json atomically (skipped when a purge removed the job meanwhile)."""
        with self._lock:
            text = json.dumps(rec.to_json(), indent=1)
        d = self.job_dir(rec.id)
        if d.is_dir():  # a purge may have removed it meanwhile
            atomic_write_text(d / "job.json", text)

    def get(self, job_id: str) -> Optional[JobRecord]:
        """The live record (not a copy; mutate through update()), or None if unknown or expired."""
        if not is_valid_job_id(job_id):
            return None
        with self._lock:
            rec = self._records.get(job_id)
            if rec is not None and self._expired(rec, time.time()):
                self._remove(rec.id)  # purge on access: an expired result is never served
                return None
            return rec

    def snapshot(self, job_id: str) -> Optional[JobRecord]:
        """A consistent copy for responses (the worker thread updates progress concurrently)."""
        with self._lock:
            rec = self.get(job_id)
            return None if rec is None else dataclasses.replace(rec, params=dict(rec.params), info=dict(rec.info),
                                                                 outputs=list(rec.outputs))

    def update(self, job_id: str, persist: bool = False, **changes: Any) -> Optional[JobRecord]:
        """Change fields of a job's record (saved when ``persist``); returns the record, None for an unknown job."""
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None:
                return None
            for k, v in changes.items():
                setattr(rec, k, v)
        if persist:
            self.save(rec)
        return rec

    def records(self) -> Iterator[JobRecord]:
        """A snapshot of every record."""
        with self._lock:
            return iter(list(self._records.values()))

    def count(self, state: str) -> int:
        """How many jobs are in ``state``."""
        with self._lock:
            return sum(1 for r in self._records.values() if r.state == state)

    # ---- files ---------------------------------------------------------------------------------------
    def input_path(self, rec: JobRecord) -> Optional[Path]:
        """The stored upload of the job, if it has one."""
        return self.job_dir(rec.id) / rec.input_name if rec.input_name else None

    def write_output(self, job_id: str, name: str, image: sitk.Image) -> None:
        """Write an output volume of the job as compressed NRRD."""
        if name not in OUTPUT_NAMES:
            raise ValueError(f"unknown output '{name}'")
        # Compressed NRRD keeps spacing/origin/direction and shrinks transfers through SSH tunnels.
        write_volume(image, self.job_dir(job_id) / f"{name}.nrrd", compress=True)

    def output_path(self, rec: JobRecord, name: str) -> Optional[Path]:
        """The file of a finished output, or None."""
        if name not in rec.outputs:
            return None
        p = self.job_dir(rec.id) / f"{name}.nrrd"
        return p if p.is_file() else None

    def finish(self, job_id: str, state: str, error: Optional[str] = None, **changes: Any) -> None:
        """Mark the job finished in ``state`` (done, failed or cancelled), drop its upload and save."""
        rec = self.update(job_id, state=state, error=error, finished=time.time(), current=None, **changes)
        if rec is not None:
            self._drop_input(rec)
            self.save(rec)

    def _drop_input(self, rec: JobRecord) -> None:
        if rec.input_name:
            with contextlib.suppress(OSError):
                (self.job_dir(rec.id) / rec.input_name).unlink()

    # ---- expiry --------------------------------------------------------------------------------------
    def expires_at(self, rec: JobRecord) -> Optional[float]:
        """When the job's results are purged (POSIX time), None while it has not finished."""
        return rec.finished + self.ttl_s if rec.state in FINISHED_STATES and rec.finished else None

    def _expired(self, rec: JobRecord, now: float) -> bool:
        exp = self.expires_at(rec)
        return exp is not None and exp <= now

    def _remove(self, job_id: str) -> None:
        with self._lock:
            self._records.pop(job_id, None)
        shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)

    def purge_expired(self) -> int:
        """Delete finished jobs older than the TTL (records and files); returns how many went."""
        now = time.time()
        with self._lock:
            expired = [r.id for r in self._records.values() if self._expired(r, now)]
        for job_id in expired:
            self._remove(job_id)
        if expired:
            log.info("purged %d expired job(s)", len(expired))
        return len(expired)
