"""MedDiffusionLogic: runs one generation/reconstruction job at a time in a background thread.

Threading contract: the worker thread never touches MRML (VTK/MRML objects are not thread-safe and Slicer's
views would render mid-update). The main thread extracts the input as a SimpleITK image and a parameters
snapshot before `start_*`, polls a lock-protected progress snapshot with `poll()` (a QTimer in the widget, a
loop in tests), and creates the result nodes itself in `finish()`.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import mrml_volumes
from .backends import AnatomyChoice, Backend, LocalBackend, Outcome, ProgressUpdate, RemoteBackend
from .parameters import MedDiffusionParameterNode, MedDiffusionParameters

__all__ = ["JobState", "MedDiffusionLogic", "BusyError", "generation_node_name", "reconstruction_node_names"]

_log = logging.getLogger(__name__)

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
# Display presets (window, level).
CT_SOFT_TISSUE = (400.0, 40.0)
CT_BONE = (1800.0, 400.0)


class BusyError(RuntimeError):
    """A job is already running: cancel it or wait."""


@dataclass(frozen=True)
class JobState:
    """A consistent snapshot of the current job, safe to read from the main thread."""

    state: str = IDLE
    kind: str = ""  # "generate" | "reconstruct"
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
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


def _clock(seconds: float | None) -> str:
    seconds = max(0, int(round(seconds or 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def generation_node_name(outcome: Outcome) -> str:
    """'MedDiffusion CT chest-abdomen seed 17' (the modality prefix of the anatomy name is not repeated)."""
    short = outcome.anatomy
    prefix = outcome.modality.lower() + "-"
    if short.lower().startswith(prefix):
        short = short[len(prefix):]
    return f"MedDiffusion {outcome.modality} {short} seed {outcome.seed}"


def reconstruction_node_names(params: MedDiffusionParameters) -> tuple[str, str]:
    """(reconstruction, degraded input) names, e.g. 'MedDiffusion sparse-CT 30 views recon' / '... FBP'."""
    if params.task == "sparse-ct":
        base = f"MedDiffusion sparse-CT {params.views} views"
        return f"{base} recon", f"{base} FBP"
    base = f"MedDiffusion MRI {params.acceleration}x {params.mask}"
    return f"{base} recon", f"{base} zero-filled"


class _Job:
    """One background run: the thread, its cancel flag and the progress it reports (under a lock)."""

    def __init__(self, kind: str, params: MedDiffusionParameters,
                 work: Callable[[Callable[[ProgressUpdate], None], threading.Event], Outcome]) -> None:
        self.kind = kind
        self.params = params
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self._state = JobState(state=RUNNING, kind=kind, stage="starting")
        self._start = time.monotonic()
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"MedDiffusion-{kind}", daemon=True)

    def _report(self, update: ProgressUpdate) -> None:
        with self._lock:
            if self._state.state == RUNNING:
                # Pipelines time each stage (sampling, decoding) separately; the panel shows the whole job.
                self._state = replace(self._state, step=update.step, total=update.total,
                                      elapsed_s=time.monotonic() - self._start,
                                      eta_s=update.eta_s, stage=update.stage or self._state.stage)

    def _finish(self, state: str, message: str = "") -> None:
        with self._lock:
            self._state = replace(self._state, state=state, message=message,
                                  elapsed_s=time.monotonic() - self._start, eta_s=None)

    def _run(self, work: Callable[..., Outcome]) -> None:
        try:
            from MedDiffusionLib.errors import Cancelled, MedDiffusionError
        except ImportError:  # only a test backend can run without the library
            Cancelled = MedDiffusionError = ()  # type: ignore[assignment,misc]
        try:
            outcome = work(self._report, self.cancel_event)
        except Cancelled:
            self._finish(CANCELLED)
        except MedDiffusionError as exc:  # meant for the user: the message alone
            self._finish(CANCELLED if self.cancel_event.is_set() else FAILED, str(exc))
        except Exception as exc:  # a bug or an environment problem: keep the traceback in the log
            _log.exception("MedDiffusion %s failed", self.kind)
            self._finish(CANCELLED if self.cancel_event.is_set() else FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self.outcome = outcome
            self._finish(DONE)

    def snapshot(self) -> JobState:
        with self._lock:
            state = self._state
        if state.state == RUNNING:
            state = replace(state, elapsed_s=time.monotonic() - self._start)
        return state


class MedDiffusionLogic:
    """Qt-free module logic. `scene` is the MRML scene results go into (slicer.mrmlScene inside Slicer).

    `backend_factory(params, token)` may be given to run jobs elsewhere (tests use a fake backend).
    """

    def __init__(self, scene: Any = None,
                 backend_factory: Callable[[MedDiffusionParameters, str], Backend] | None = None) -> None:
        self.scene = scene
        self._local = LocalBackend()
        self._backend_factory = backend_factory
        self._job: _Job | None = None
        self._input_id = ""
        self.last_outcome: Outcome | None = None

    # ---------------------------------------------------------------- parameters and catalog

    def parameter_node(self, scene: Any = None) -> MedDiffusionParameterNode:
        return MedDiffusionParameterNode.get_or_create(scene or self.scene)

    def backend(self, params: MedDiffusionParameters, token: str = "") -> Backend:
        if self._backend_factory is not None:
            return self._backend_factory(params, token)
        if params.backend == "remote":
            return RemoteBackend(params.server_url, token)
        return self._local

    def anatomies(self, params: MedDiffusionParameters, token: str = "") -> list[AnatomyChoice]:
        """Anatomies the selected model (or server) offers. May load the model: call it off the hot path."""
        backend = self.backend(params, token)
        return backend.anatomies(params) if isinstance(backend, LocalBackend) else backend.anatomies()

    # ---------------------------------------------------------------- jobs

    def _start(self, kind: str, params: MedDiffusionParameters,
               work: Callable[[Callable[[ProgressUpdate], None], threading.Event], Outcome]) -> None:
        if self._job is not None and self._job.thread.is_alive():
            raise BusyError("MedDiffusion is already running a job; cancel it first")
        self._job = _Job(kind, params, work)
        self._job.thread.start()

    @staticmethod
    def _seed(params: MedDiffusionParameters) -> int:
        # Chosen here, not in the library, so a random seed is known (node name) and reproducible afterwards.
        return random.SystemRandom().randrange(2**31 - 1) if params.random_seed else params.seed

    def start_generate(self, params: MedDiffusionParameters, token: str = "") -> int:
        """Start generating a volume; returns the seed used."""
        params = params.validated()
        seed = self._seed(params)
        backend = self.backend(params, token)
        self._start("generate", params, lambda progress, cancel: backend.generate(params, seed, progress, cancel))
        return seed

    def start_reconstruct(self, params: MedDiffusionParameters, token: str = "", input_node: Any = None) -> int:
        """Start reconstructing `input_node` (default: the parameters' input volume); returns the seed used."""
        params = params.validated()
        if input_node is None and params.input_volume_id and self.scene is not None:
            input_node = self.scene.GetNodeByID(params.input_volume_id)
        image = mrml_volumes.volume_node_to_image(input_node)  # main thread: reads MRML
        self._input_id = input_node.GetID() or ""
        seed = self._seed(params)
        backend = self.backend(params, token)
        self._start("reconstruct", params,
                    lambda progress, cancel: backend.reconstruct(params, image, seed, progress, cancel))
        return seed

    def poll(self) -> JobState:
        return self._job.snapshot() if self._job is not None else JobState()

    @property
    def is_running(self) -> bool:
        return self._job is not None and self._job.thread.is_alive()

    def cancel(self, wait_s: float = 0.0) -> None:
        """Ask the running job to stop (it stops at its next sampler step); optionally wait for it."""
        if self._job is not None:
            self._job.cancel_event.set()
            if wait_s > 0:
                self._job.thread.join(wait_s)

    def wait(self, timeout_s: float | None = None) -> JobState:
        """Block until the job ends (tests, self-test, scripts). The GUI polls instead."""
        if self._job is not None:
            self._job.thread.join(timeout_s)
        return self.poll()

    def finish(self, scene: Any = None) -> list[Any]:
        """On the main thread: add the finished job's volumes to the scene and return them (result first).

        Returns [] for a failed or cancelled job; the job is cleared either way, so the logic is idle again.
        """
        job = self._job
        if job is None or job.thread.is_alive():
            return []
        self._job = None
        if job.snapshot().state != DONE or job.outcome is None:
            return []
        scene = scene or self.scene
        outcome = self.last_outcome = job.outcome
        if job.kind == "generate":
            nodes = [self._add_volume(scene, outcome.image, generation_node_name(outcome), outcome)]
        else:
            recon_name, degraded_name = reconstruction_node_names(job.params)
            nodes = [self._add_volume(scene, outcome.image, recon_name, outcome)]
            if outcome.degraded is not None and job.params.simulate:
                nodes.append(self._add_volume(scene, outcome.degraded, degraded_name, outcome))
            nodes[0].SetAttribute("MedDiffusion.input", self._input_id)
        parameter_node = MedDiffusionParameterNode.get_or_create(scene)
        parameter_node.set_output("Output", nodes[0])
        parameter_node.set_output("Degraded", nodes[1] if len(nodes) > 1 else None)
        self._show(nodes)
        return nodes

    # ---------------------------------------------------------------- results in the scene

    @staticmethod
    def _add_volume(scene: Any, image: sitk.Image, name: str, outcome: Outcome) -> Any:
        node = mrml_volumes.image_to_volume_node(image, scene, name)
        for key, value in {"seed": str(outcome.seed), "anatomy": outcome.anatomy, "modality": outcome.modality,
                           **outcome.info}.items():
            if value not in (None, "", "None"):
                node.SetAttribute(f"MedDiffusion.{key}", str(value))
        apply_display_preset(node, outcome.modality, outcome.anatomy)
        return node

    @staticmethod
    def _show(nodes: list[Any]) -> None:
        """Put the result in the slice views (only inside the Slicer application)."""
        import slicer

        if not hasattr(slicer, "app") or not nodes:
            return
        foreground = nodes[1] if len(nodes) > 1 else None
        # The degraded input sits underneath at opacity 0: the user fades it in with the slice-view slider.
        slicer.util.setSliceViewerLayers(background=nodes[0], foreground=foreground,
                                         foregroundOpacity=0.0 if foreground else None, fit=True)


def apply_display_preset(node: Any, modality: str, anatomy: str = "") -> tuple[float, float]:
    """Grey colormap and a window/level fitting the intensities: CT in HU gets a CT preset (bone for the legs,
    soft tissue otherwise), normalised [0, 1] data gets window 1 / level 0.5, anything else (MR) the 1-99
    percentile range. Returns (window, level)."""
    import slicer

    arr = slicer.util.arrayFromVolume(node)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr.ravel()
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if modality.upper() == "CT" and lo < -200.0:  # air is about -1000 HU: intensities are in HU
        window, level = CT_BONE if "leg" in anatomy.lower() else CT_SOFT_TISSUE
    elif lo >= -0.05 and hi <= 1.05:
        window, level = 1.0, 0.5
    else:
        p1, p99 = (float(v) for v in np.percentile(finite, [1.0, 99.0])) if finite.size else (lo, hi)
        window, level = max(p99 - p1, 1e-6), (p99 + p1) / 2.0
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(window, level)
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    return window, level
