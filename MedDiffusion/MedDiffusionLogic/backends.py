"""Where a job runs: the library pipelines in this process, or a MedDiffusion server through RemoteClient.

A backend runs inside the worker thread. It receives plain values (a parameters snapshot, a SimpleITK image),
never MRML nodes, and returns an `Outcome`; progress goes through a callback taking a `ProgressUpdate`, and a
`threading.Event` cancels. MedDiffusionLib is imported lazily so the module loads without torch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import SimpleITK as sitk

from .parameters import MedDiffusionParameters

__all__ = [
    "ProgressUpdate",
    "Outcome",
    "Backend",
    "LocalBackend",
    "RemoteBackend",
    "AnatomyChoice",
    "resolve_device",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressUpdate:
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    stage: str = ""


@dataclass
class Outcome:
    """What a finished job hands back to the main thread."""

    image: sitk.Image
    degraded: sitk.Image | None = None
    seed: int | None = None
    modality: str = "CT"
    anatomy: str = ""
    info: dict[str, str] = field(default_factory=dict)  # provenance, stored as node attributes


@dataclass(frozen=True)
class AnatomyChoice:
    """One entry of the Generate panel: an anatomy, its modality and the volume sizes it can produce."""

    name: str
    modality: str
    sizes_xyz: tuple[tuple[int, int, int], ...] = ()
    spacing_xyz: tuple[float, float, float] | None = None


ProgressFn = Callable[[ProgressUpdate], None]


class Backend(Protocol):
    def generate(self, params: MedDiffusionParameters, seed: int, progress: ProgressFn,
                 cancel: threading.Event) -> Outcome: ...

    def reconstruct(self, params: MedDiffusionParameters, image: sitk.Image, seed: int, progress: ProgressFn,
                    cancel: threading.Event) -> Outcome: ...


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is a clear error."""
    import torch

    from MedDiffusionLib.errors import InputError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was selected but PyTorch sees no GPU (or is a CPU-only build); choose 'auto' or "
                         "'CPU'")
    return device


def _anatomy_name(anatomy: Any, fallback: str) -> str:
    return str(getattr(anatomy, "name", None) or anatomy or fallback)


def iter_catalog(catalog: Any) -> list[Any]:
    """The Anatomy entries of a Catalog (a sequence), or of a plain list/dict of them."""
    return list(catalog.values()) if isinstance(catalog, dict) else list(catalog)


def anatomy_choices(catalog: Any, downsample: int = 8) -> list[AnatomyChoice]:
    """Catalog -> AnatomyChoice list (sizes from `anatomy.volume_sizes_xyz(downsample)`)."""
    choices = []
    for anatomy in iter_catalog(catalog):
        try:
            sizes = tuple(tuple(int(v) for v in s) for s in anatomy.volume_sizes_xyz(downsample))
        except Exception:  # an entry without sizes still lets the user pick it with the default size
            sizes = ()
        spacing = getattr(anatomy, "spacing_xyz", None)
        choices.append(AnatomyChoice(anatomy.name, anatomy.modality, sizes,
                                     tuple(float(v) for v in spacing) if spacing else None))
    return choices


class LocalBackend:
    """Runs GenerationPipeline / ReconstructionPipeline in this process; bundles and pipelines are cached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bundles: dict[tuple, Any] = {}
        self._pipelines: dict[tuple, Any] = {}

    @staticmethod
    def model_source(params: MedDiffusionParameters) -> tuple[str, ...]:
        if params.use_demo_model:
            return ("demo",)
        if params.bundle_dir:
            return ("bundle", params.bundle_dir)
        if params.autoencoder_path and params.denoiser_path:
            return ("files", params.autoencoder_path, params.denoiser_path)
        from MedDiffusionLib.errors import InputError
        raise InputError("no model selected: tick 'use bundled demo model', or choose a bundle folder, or both an "
                         "autoencoder and a denoiser checkpoint")

    def bundle(self, params: MedDiffusionParameters) -> Any:
        source = self.model_source(params)
        with self._lock:
            if source not in self._bundles:
                self._bundles.clear()  # one model in memory at a time: they are large
                self._pipelines.clear()
                self._bundles[source] = self._load(source)
            return self._bundles[source]

    @staticmethod
    def _load(source: tuple[str, ...]) -> Any:
        from MedDiffusionLib.checkpoints import bundle as bundle_mod

        if source[0] == "demo":
            return bundle_mod.load_bundle(None)
        if source[0] == "bundle":
            return bundle_mod.load_bundle(source[1])
        # Two checkpoint files (the authors' release or ours) with the official anatomy table.
        return bundle_mod.bundle_from_official(source[1], source[2])

    def _pipeline(self, kind: str, params: MedDiffusionParameters) -> Any:
        bundle = self.bundle(params)
        device = resolve_device(params.device)
        key = (kind, self.model_source(params), device)
        with self._lock:
            if key not in self._pipelines:
                if kind == "generate":
                    from MedDiffusionLib.pipelines.generate import GenerationPipeline as cls
                else:
                    from MedDiffusionLib.pipelines.reconstruct import ReconstructionPipeline as cls
                self._pipelines[key] = cls(bundle, device)
            return self._pipelines[key]

    def anatomies(self, params: MedDiffusionParameters) -> list[AnatomyChoice]:
        bundle = self.bundle(params)
        return anatomy_choices(bundle.catalog, int(bundle.downsample))

    @staticmethod
    def _progress_adapter(progress: ProgressFn) -> Callable[[Any], None]:
        def on_progress(info: Any) -> None:
            progress(ProgressUpdate(int(getattr(info, "step", 0)), int(getattr(info, "total", 0)),
                                    float(getattr(info, "elapsed_s", 0.0) or 0.0), getattr(info, "eta_s", None),
                                    str(getattr(info, "stage", "") or "")))
        return on_progress

    def generate(self, params: MedDiffusionParameters, seed: int, progress: ProgressFn,
                 cancel: threading.Event) -> Outcome:
        progress(ProgressUpdate(stage="loading model"))
        pipeline = self._pipeline("generate", params)
        result = pipeline(params.anatomy, size_xyz=params.size_xyz, sampler=params.sampler, steps=params.steps,
                          seed=seed, progress=self._progress_adapter(progress), cancel=cancel)
        name = _anatomy_name(getattr(result, "anatomy", None), params.anatomy)
        try:  # the catalog knows the modality; the panel's modality filter may be stale
            modality = self.bundle(params).catalog.get(name).modality
        except Exception:
            modality = params.modality
        return Outcome(image=result.image, seed=int(getattr(result, "seed", seed)), modality=modality, anatomy=name,
                       info={"backend": "local", "sampler": params.sampler, "steps": str(params.steps)})

    def reconstruct(self, params: MedDiffusionParameters, image: sitk.Image, seed: int, progress: ProgressFn,
                    cancel: threading.Event) -> Outcome:
        progress(ProgressUpdate(stage="loading model"))
        pipeline = self._pipeline("reconstruct", params)
        result = pipeline(image, task=params.task, views=params.views, acceleration=params.acceleration,
                          mask=params.mask, simulate=params.simulate, sampler=params.sampler, steps=params.steps,
                          seed=seed, data_consistency=params.data_consistency,
                          progress=self._progress_adapter(progress), cancel=cancel)
        return Outcome(image=result.image, degraded=getattr(result, "degraded", None), seed=seed,
                       modality="CT" if params.task == "sparse-ct" else "MR",
                       info={"backend": "local", "sampler": params.sampler, "steps": str(params.steps)})


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class RemoteBackend:
    """Submits the job to a MedDiffusion server (`meddiffusion serve`, docs/SERVER.md) through
    `MedDiffusionLib.client.RemoteClient`, polls its status and downloads the result volumes with their geometry.

    Cancelling also cancels the server job. Client failures become `MedDiffusionError`s whose message tells the
    user what to do (token, server busy, request refused...), so the logic shows them without a traceback.
    An empty `token` means the client's default, $MEDDIFFUSION_TOKEN.
    """

    def __init__(self, url: str, token: str = "", poll_interval_s: float = 0.5, timeout_s: float = 30.0,
                 max_missed_polls: int = 3) -> None:
        self.url = (url or "").strip()
        self.token = token
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s  # per network operation
        self.max_missed_polls = max_missed_polls  # unanswered status polls in a row (a tunnel reconnecting)
        self.job_id: str | None = None  # the latest server job submitted by this backend

    def client(self) -> Any:
        from MedDiffusionLib.client import RemoteClient
        from MedDiffusionLib.errors import InputError

        if not self.url:
            raise InputError("the remote backend needs a server URL (e.g. http://127.0.0.1:8000 through an SSH "
                             "tunnel)")
        try:
            return RemoteClient(self.url, token=self.token or None, timeout=self.timeout_s)
        except ValueError as exc:  # a malformed URL
            raise InputError(str(exc)) from None

    # ---------------------------------------------------------------- errors

    def _user_message(self, exc: Exception, client: Any = None) -> str | None:
        """The message for a client error that needs rewording for the panel; None keeps the client's own
        (ServerUnreachable, JobFailed, WaitTimeout already name the server and the problem)."""
        from MedDiffusionLib.client import AuthenticationError, JobNotFound, QueueFullError, RemoteError

        if isinstance(exc, AuthenticationError):
            sent = bool(getattr(client, "token", None) or self.token)
            what = "rejected the access token" if sent else "needs an access token, and none was given"
            return (f"the MedDiffusion server at {self.url} {what}: enter the token the server was started with "
                    "(its --token-file or $MEDDIFFUSION_TOKEN) in the remote server settings")
        if isinstance(exc, QueueFullError):
            return f"the MedDiffusion server is busy: {exc.detail}"
        if isinstance(exc, JobNotFound):
            job = f"job {self.job_id[:8]}" if self.job_id else "the job"
            return (f"the MedDiffusion server no longer has {job} ({exc.detail}); it may have been restarted with "
                    "another store, or the result expired")
        if isinstance(exc, RemoteError):
            if exc.status == 400:
                return f"the MedDiffusion server refused the job: {exc.detail}"
            if exc.status == 413:
                return f"the MedDiffusion server refused the upload: {exc.detail}"
            if exc.status == 501:
                return f"the MedDiffusion server cannot run this job: {exc.detail}"
            return f"the MedDiffusion server at {self.url} answered with error {exc.status}: {exc.detail}"
        return None

    @contextmanager
    def _errors(self, client: Any = None) -> Iterator[None]:
        from MedDiffusionLib.errors import MedDiffusionError

        try:
            yield
        except MedDiffusionError as exc:
            message = self._user_message(exc, client)
            if message is None:
                raise
            raise MedDiffusionError(message) from exc

    # ---------------------------------------------------------------- catalog

    def models(self) -> dict[str, Any]:
        """The server's GET /v1/models answer (model, device, anatomies, samplers, tasks, limits...)."""
        client = self.client()
        with self._errors(client):
            return client.models()

    def anatomies(self) -> list[AnatomyChoice]:
        return [AnatomyChoice(str(entry["name"]), str(entry.get("modality") or "CT"),
                              tuple(tuple(int(v) for v in s) for s in entry.get("sizes_xyz") or ()),
                              tuple(float(v) for v in entry["spacing_xyz"]) if entry.get("spacing_xyz") else None)
                for entry in self.models().get("anatomies", [])]

    # ---------------------------------------------------------------- jobs

    def _wait(self, client: Any, job_id: str, progress: ProgressFn, cancel: threading.Event) -> dict[str, Any]:
        """Poll the job until it ends; returns the final status (state 'done'). A cancel request cancels the
        server job too; the job's own failure or cancellation on the server raises JobFailed / JobCancelled."""
        from MedDiffusionLib.client import JobCancelled, JobFailed, ServerUnreachable
        from MedDiffusionLib.errors import Cancelled

        start = time.monotonic()
        missed = 0
        while True:
            if cancel.is_set():
                try:
                    client.cancel(job_id)  # a running job stops at its next sampler step
                except Exception as exc:  # the job is abandoned either way; say so in the log only
                    _log.warning("could not cancel server job %s: %s", job_id[:8], exc)
                raise Cancelled("cancelled by the user")
            try:
                status = client.status(job_id)
                missed = 0
            except ServerUnreachable:
                missed += 1
                if missed > self.max_missed_polls:
                    raise
                cancel.wait(min(self.poll_interval_s * 2**missed, 5.0))
                continue
            state = status.get("state")
            if state == "done":
                return status
            if state == "failed":
                raise JobFailed(job_id, status.get("error") or "no reason given")
            if state == "cancelled":
                raise JobCancelled(job_id)
            progress(self._progress(status, time.monotonic() - start))
            cancel.wait(self.poll_interval_s)  # wakes at once on cancel

    @staticmethod
    def _progress(status: dict[str, Any], elapsed_s: float) -> ProgressUpdate:
        if status.get("state") == "queued":
            position = status.get("queue_position")
            stage = f"queued on the server (position {position})" if position else "queued on the server"
            return ProgressUpdate(0, 0, elapsed_s, None, stage)
        return ProgressUpdate(int(status.get("step") or 0), int(status.get("total") or 0), elapsed_s,
                              status.get("eta_s"), str(status.get("stage") or "running on the server"))

    def _submitted(self, job_id: str) -> str:
        self.job_id = str(job_id)
        _log.info("MedDiffusion server %s: job %s submitted", self.url, self.job_id[:8])
        return self.job_id

    def _info(self, params: MedDiffusionParameters, job_id: str, final: dict[str, Any]) -> dict[str, str]:
        info = final.get("info") or {}
        steps = info.get("steps", params.steps)
        return {"backend": "remote", "server": self.url, "job": job_id,
                "sampler": str(info.get("sampler") or params.sampler), "steps": str(steps)}

    @staticmethod
    def _modality(client: Any, anatomy: str, fallback: str) -> str:
        from MedDiffusionLib.errors import MedDiffusionError

        try:  # the server's catalog knows the modality; the panel's modality filter may be stale
            entries = client.models().get("anatomies", [])
            return str(next(e["modality"] for e in entries if e.get("name") == anatomy))
        except (MedDiffusionError, StopIteration, KeyError, AttributeError):
            return fallback

    def generate(self, params: MedDiffusionParameters, seed: int, progress: ProgressFn,
                 cancel: threading.Event) -> Outcome:
        client = self.client()
        with self._errors(client):
            progress(ProgressUpdate(stage="submitting"))
            job_id = self._submitted(client.generate(params.anatomy, size_xyz=params.size_xyz,
                                                     sampler=params.sampler, steps=params.steps, seed=seed))
            final = self._wait(client, job_id, progress, cancel)
            progress(ProgressUpdate(stage="downloading"))
            image = client.result(job_id)
            info = final.get("info") or {}
            anatomy = str(info.get("anatomy") or params.anatomy)
            modality = self._modality(client, anatomy, params.modality)
        return Outcome(image=image, seed=_int_or(info.get("seed"), seed), modality=modality, anatomy=anatomy,
                       info=self._info(params, job_id, final))

    def reconstruct(self, params: MedDiffusionParameters, image: sitk.Image, seed: int, progress: ProgressFn,
                    cancel: threading.Event) -> Outcome:
        from MedDiffusionLib.errors import MedDiffusionError

        client = self.client()
        with self._errors(client):
            progress(ProgressUpdate(stage="uploading"))
            job_id = self._submitted(client.reconstruct(
                image, task=params.task, views=params.views, acceleration=params.acceleration, mask=params.mask,
                simulate=params.simulate, sampler=params.sampler, steps=params.steps, seed=seed,
                data_consistency=params.data_consistency))
            final = self._wait(client, job_id, progress, cancel)
            progress(ProgressUpdate(stage="downloading"))
            result = client.result(job_id)
            degraded = None
            if params.simulate and "degraded" in (final.get("outputs") or ()):
                try:
                    degraded = client.degraded(job_id)
                except MedDiffusionError as exc:  # the reconstruction is what matters; keep it without the input
                    _log.warning("server job %s: degraded volume unavailable: %s", job_id[:8], exc)
            info = final.get("info") or {}
        return Outcome(image=result, degraded=degraded, seed=_int_or(info.get("seed"), seed),
                       modality="CT" if params.task == "sparse-ct" else "MR",
                       info=self._info(params, job_id, final))
