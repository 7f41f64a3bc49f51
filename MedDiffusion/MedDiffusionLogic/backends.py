"""Where a job runs: the library pipelines in this process, or a MedDiffusion server through RemoteClient.

A backend runs inside the worker thread. It receives plain values (a parameters snapshot, a SimpleITK image),
never MRML nodes, and returns an `Outcome`; progress goes through a callback taking a `ProgressUpdate`, and a
`threading.Event` cancels. MedDiffusionLib is imported lazily so the module loads without torch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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


_DONE = {"done", "succeeded", "success", "completed", "finished"}
_FAILED = {"failed", "error"}
_CANCELLED = {"cancelled", "canceled"}


class RemoteBackend:
    """Submits the job to a MedDiffusion server and polls it; cancelling also cancels the server job."""

    def __init__(self, url: str, token: str = "", poll_interval_s: float = 0.5) -> None:
        self.url = url
        self.token = token
        self.poll_interval_s = poll_interval_s

    def client(self) -> Any:
        from MedDiffusionLib.client import RemoteClient
        from MedDiffusionLib.errors import InputError

        if not self.url:
            raise InputError("the remote backend needs a server URL")
        return RemoteClient(self.url, self.token or None)

    def anatomies(self) -> list[AnatomyChoice]:
        models = self.client().models()
        entries = models.get("anatomies", models) if isinstance(models, dict) else models
        if isinstance(entries, dict):
            entries = [dict(v, name=k) if isinstance(v, dict) else {"name": k} for k, v in entries.items()]
        choices = []
        for entry in entries:
            sizes = entry.get("sizes_xyz") or entry.get("volume_sizes_xyz") or entry.get("sizes") or ()
            spacing = entry.get("spacing_xyz")
            choices.append(AnatomyChoice(str(entry["name"]), str(entry.get("modality", "CT")),
                                         tuple(tuple(int(v) for v in s) for s in sizes),
                                         tuple(float(v) for v in spacing) if spacing else None))
        return choices

    def _wait(self, client: Any, job_id: str, progress: ProgressFn, cancel: threading.Event) -> None:
        from MedDiffusionLib.errors import Cancelled, MedDiffusionError

        start = time.monotonic()
        while True:
            if cancel.is_set():
                try:
                    client.cancel(job_id)
                except Exception as exc:  # the job is abandoned either way; say so in the log only
                    _log.warning("could not cancel server job %s: %s", job_id, exc)
                raise Cancelled("cancelled by the user")
            status = client.status(job_id)
            state = str(status.get("state", "")).lower()
            if state in _DONE:
                return
            if state in _FAILED:
                raise MedDiffusionError(f"the server job failed: {status.get('error') or 'no reason given'}")
            if state in _CANCELLED:
                raise Cancelled("the job was cancelled on the server")
            progress(ProgressUpdate(int(status.get("step") or 0), int(status.get("total") or 0),
                                    time.monotonic() - start, status.get("eta_s"),
                                    "queued on server" if state == "queued" else (state or "running")))
            cancel.wait(self.poll_interval_s)  # wakes at once on cancel

    def generate(self, params: MedDiffusionParameters, seed: int, progress: ProgressFn,
                 cancel: threading.Event) -> Outcome:
        client = self.client()
        progress(ProgressUpdate(stage="submitting"))
        job_id = client.generate(anatomy=params.anatomy, size_xyz=params.size_xyz, sampler=params.sampler,
                                 steps=params.steps, seed=seed)
        self._wait(client, job_id, progress, cancel)
        progress(ProgressUpdate(stage="downloading"))
        return Outcome(image=client.result(job_id), seed=seed, modality=params.modality, anatomy=params.anatomy,
                       info={"backend": "remote", "server": self.url, "job": str(job_id),
                             "sampler": params.sampler, "steps": str(params.steps)})

    def reconstruct(self, params: MedDiffusionParameters, image: sitk.Image, seed: int, progress: ProgressFn,
                    cancel: threading.Event) -> Outcome:
        client = self.client()
        progress(ProgressUpdate(stage="uploading"))
        job_id = client.reconstruct(image, task=params.task, views=params.views, acceleration=params.acceleration,
                                    mask=params.mask, simulate=params.simulate, sampler=params.sampler,
                                    steps=params.steps, seed=seed, data_consistency=params.data_consistency)
        self._wait(client, job_id, progress, cancel)
        progress(ProgressUpdate(stage="downloading"))
        degraded = None
        if params.simulate:
            try:
                degraded = client.degraded(job_id)
            except Exception as exc:  # the reconstruction is what matters; keep it even without the input view
                _log.warning("server job %s: degraded volume unavailable: %s", job_id, exc)
        return Outcome(image=client.result(job_id), degraded=degraded, seed=seed,
                       modality="CT" if params.task == "sparse-ct" else "MR",
                       info={"backend": "remote", "server": self.url, "job": str(job_id),
                             "sampler": params.sampler, "steps": str(params.steps)})
