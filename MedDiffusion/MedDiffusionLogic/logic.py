"""MedDiffusionLogic: the module's Qt-free logic. One job at a time, on a job server (jobs.py), advanced by
`poll()` from the main thread (the panel's QTimer; a loop in tests): no Python threads in Slicer's process.

The main thread reads the input volume (a view of its voxels, streamed by the upload) and creates the result
nodes in `finish()`; nothing else touches MRML.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Optional, Union

import numpy as np
from MedDiffusionLib.options import ReconstructOptions
from MedDiffusionLib.progress import CANCELLED, DONE, FAILED, IDLE, RUNNING, JobStatus
from MedDiffusionLib.results import GenerationResult, ReconstructionResult

from . import mrml_volumes
from .backends import AnatomyChoice, LocalBackend, ModelSummary, RemoteBackend
from .jobs import PanelJob
from .parameters import (HU_OFF, TASK_MODALITY, MedDiffusionParameterNode, MedDiffusionParameters,
                         parse_hu_setting)

__all__ = ["MedDiffusionLogic", "BusyError", "generation_node_name", "reconstruction_node_names",
           "suggest_anatomy", "apply_display_preset", "IDLE", "RUNNING", "DONE", "FAILED", "CANCELLED"]

_log = logging.getLogger(__name__)

# Display presets (window, level).
CT_SOFT_TISSUE = (400.0, 40.0)
CT_BONE = (1800.0, 400.0)


class BusyError(RuntimeError):
    """A job is already running: cancel it or wait."""


def _short_anatomy(anatomy: str, modality: str) -> str:
    prefix = modality.lower() + "-"
    return anatomy[len(prefix):] if anatomy.lower().startswith(prefix) else anatomy


def generation_node_name(result: GenerationResult) -> str:
    """'MedDiffusion CT chest-abdomen seed 17 ddim' (the modality prefix of the anatomy name is not repeated)."""
    return f"MedDiffusion {result.modality} {_short_anatomy(result.anatomy, result.modality)} " \
           f"seed {result.seed}{f' {result.sampler}' if result.sampler else ''}"


def reconstruction_node_names(params: MedDiffusionParameters,
                              result: Optional[ReconstructionResult] = None) -> tuple[str, str]:
    """(reconstruction, degraded input) names, e.g. 'MedDiffusion sparse-CT 30 views head-neck seed 3 ddim recon'
    / 'MedDiffusion sparse-CT 30 views FBP'; a model-free method names itself ('... 30 views sart recon')."""
    if params.task == "sparse-ct":
        base = f"MedDiffusion sparse-CT {params.views} views"
        degraded = f"{base} FBP"
    else:
        base = f"MedDiffusion MRI {params.acceleration}x {params.mask}"
        degraded = f"{base} zero-filled"
    if result is not None and result.method != "diffusion":
        base += f" {result.method}"  # model-free: no anatomy, seed or sampler took part
    elif result is not None:
        sampler = result.sampler or ""
        base += f" {_short_anatomy(result.anatomy or '', result.modality)} seed {result.seed}" \
                f"{f' {sampler}' if sampler else ''}"
    return f"{base} recon", degraded


def suggest_anatomy(name: str, made_with: str, task: str,
                    anatomies: tuple[AnatomyChoice, ...] | list[AnatomyChoice]) -> str:
    """The model anatomy that best fits an input volume for `task`: the anatomy a MedDiffusion volume was made
    with (`made_with`, its MedDiffusion.anatomy attribute), else the one whose name shares most words with the
    volume's `name` ('Chest CT' -> ct-chest-abdomen), else the task's first anatomy. '' when there is none."""
    modality = TASK_MODALITY.get(task, "CT")
    fitting = [a for a in anatomies if a.modality == modality]
    if not fitting:
        return ""
    if any(a.name == made_with for a in fitting):
        return made_with
    words = {w for w in "".join(c if c.isalnum() else " " for c in (name or "").lower()).split()}
    words |= {w.rstrip("s") for w in words}  # 'legs' ~ 'leg'
    scored = [(len(words & ({p.rstrip("s") for p in a.name.lower().split("-")[1:]} |
                            set(a.name.lower().split("-")[1:]))), -i, a.name) for i, a in enumerate(fitting)]
    best = max(scored)
    return best[2] if best[0] > 0 else fitting[0].name


class MedDiffusionLogic:
    """Qt-free module logic. `scene` is the MRML scene results go into (slicer.mrmlScene inside Slicer).

    `local` is the local backend (its job server is started on first use and kept for the next jobs).
    """

    def __init__(self, scene: Any = None, local: Optional[LocalBackend] = None) -> None:
        self.scene = scene
        self.local = local or LocalBackend()
        self._job: Optional[PanelJob] = None
        self._input_id = ""
        self.last_result: Optional[Union[GenerationResult, ReconstructionResult]] = None
        self.longest_finish_s = 0.0  # the node creation of the last finish(): measured for the docs

    # ---------------------------------------------------------------- parameters and catalog
    def parameter_node(self, scene: Any = None) -> MedDiffusionParameterNode:
        return MedDiffusionParameterNode.get_or_create(scene or self.scene)

    def backend(self, params: MedDiffusionParameters, token: str = "") -> Any:
        if params.backend == "remote":
            return RemoteBackend(params.server_url, token)
        return self.local

    def model_summary(self, params: MedDiffusionParameters, token: str = "") -> ModelSummary:
        """What the selected model offers: local -> its model.yaml (instant, no torch); remote -> one short
        /v1/models request."""
        return self.backend(params, token).model_summary(params, token)

    def anatomies(self, params: MedDiffusionParameters, token: str = "") -> list[AnatomyChoice]:
        return list(self.model_summary(params, token).anatomies)

    def stop_server(self) -> None:
        """Stop the local job server (the user's Stop; Slicer's exit). A running local job is cancelled."""
        if self._job is not None and self._job.backend is self.local and not self._job.snapshot().ended:
            self._job.cancel()
        self.local.stop()

    @property
    def server_log_path(self) -> Optional[str]:
        path = self.local.server.log_path
        return str(path) if path is not None else None

    # ---------------------------------------------------------------- jobs
    @staticmethod
    def _seed(params: MedDiffusionParameters) -> int:
        # Chosen here, not on the server, so a random seed is known (node name) and reproducible afterwards.
        return random.SystemRandom().randrange(2**31 - 1) if params.random_seed else params.seed

    def _check_idle(self) -> None:
        if self.is_running:
            raise BusyError("MedDiffusion is already running a job; cancel it first")

    def start_generate(self, params: MedDiffusionParameters, token: str = "") -> int:
        """Start generating a volume; returns the seed used."""
        self._check_idle()
        params = params.validated()
        seed = self._seed(params)
        request = {"anatomy": params.anatomy, "size_xyz": params.size_xyz, "sampler": params.sampler,
                   "steps": params.steps, "seed": seed}

        def complete(job: PanelJob, summary: ModelSummary) -> None:
            # In the job's first step: a remote model list is a request, and its errors belong to the job.
            entry = summary.anatomy(params.anatomy)
            job.modality = entry.modality if entry is not None else params.modality
            # The answer may not claim more voxels than asked for (checked before the download allocates).
            sizes = [params.size_xyz] if params.size_xyz else list(entry.sizes_xyz if entry is not None else ())
            if sizes:
                job.max_voxels = max(int(np.prod(s)) for s in sizes)
            hu_range = self.hu_range(params, summary) if job.modality == "CT" else None
            job.request["hu_range"] = list(hu_range) if hu_range is not None else None

        self._job = PanelJob("generate", params, self.backend(params, token), request, complete=complete)
        return seed

    @staticmethod
    def hu_range(params: MedDiffusionParameters, summary: ModelSummary) -> Optional[tuple[float, float]]:
        """The HU range generated CT is mapped to: the panel's setting, else the model's declared range."""
        setting = parse_hu_setting(params.ct_hu_range)
        if setting == HU_OFF:
            return None
        return setting if setting is not None else summary.hu_range  # type: ignore[return-value]

    def start_reconstruct(self, params: MedDiffusionParameters, token: str = "", input_node: Any = None) -> int:
        """Start reconstructing `input_node` (default: the parameters' input volume); returns the seed used."""
        self._check_idle()
        params = params.validated()
        request = {"task": params.task, "anatomy": params.recon_anatomy or None, "views": params.views,
                   "acceleration": params.acceleration, "mask": params.mask, "simulate": params.simulate,
                   "sampler": params.sampler, "steps": params.steps, "seed": self._seed(params),
                   "data_consistency": params.data_consistency, "method": params.method}
        # The library's rules (those the server applies), before the volume is read and uploaded.
        ReconstructOptions.from_mapping(request).validate()
        if input_node is None and params.input_volume_id and self.scene is not None:
            input_node = self.scene.GetNodeByID(params.input_volume_id)
        volume = mrml_volumes.volume_node_to_array(input_node)  # main thread: reads MRML (a view, no copy)
        name, made_with = input_node.GetName() or "", input_node.GetAttribute("MedDiffusion.anatomy") or ""
        self._input_id = input_node.GetID() or ""

        def complete(job: PanelJob, summary: ModelSummary) -> None:
            if not job.request["anatomy"] and params.method == "diffusion":  # only the prior has an anatomy
                job.request["anatomy"] = suggest_anatomy(name, made_with, params.task, summary.anatomies) or None

        self._job = PanelJob("reconstruct", params, self.backend(params, token), request, volume=volume,
                             modality=TASK_MODALITY[params.task], complete=complete,
                             max_voxels=int(volume.array.size))  # outputs are on the input's grid
        return int(request["seed"])

    def poll(self) -> JobStatus:
        """Advance the job by one short step and return its status (call it from a timer); idle without a job."""
        return self._job.step() if self._job is not None else JobStatus()

    @property
    def job(self) -> Optional[PanelJob]:
        return self._job

    @property
    def is_running(self) -> bool:
        return self._job is not None and not self._job.snapshot().ended

    def cancel(self) -> None:
        """Stop the running job (a transfer at once; a server job at its next sampler step)."""
        if self._job is not None:
            self._job.cancel()

    def wait(self, timeout_s: Optional[float] = None, poll_s: float = 0.05,
             sleep: Callable[[float], None] = time.sleep) -> JobStatus:
        """Poll until the job ends (scripts, self-test). The GUI's timer calls poll() instead."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        state = self.poll()
        while state.running and (deadline is None or time.monotonic() < deadline):
            sleep(poll_s)
            state = self.poll()
        return state

    def finish(self, scene: Any = None) -> list[Any]:
        """On the main thread: add the finished job's volumes to the scene and return them (result first).

        Returns [] for a failed or cancelled job; the job is cleared either way, so the logic is idle again.
        """
        job = self._job
        if job is None or not job.snapshot().ended:
            return []
        self._job = None
        if job.snapshot().state != DONE or job.result is None:
            return []
        began = time.monotonic()
        scene = scene or self.scene
        result = self.last_result = job.result
        if isinstance(result, GenerationResult):
            nodes = [self._add_volume(scene, result.image, generation_node_name(result), result, job.provenance)]
        else:
            recon_name, degraded_name = reconstruction_node_names(job.params, result)
            nodes = [self._add_volume(scene, result.image, recon_name, result, job.provenance)]
            if result.degraded is not None and job.params.simulate:
                nodes.append(self._add_volume(scene, result.degraded, degraded_name, result, job.provenance))
                # Same window as the reconstruction: the fade between the two compares like with like.
                display, source = nodes[1].GetDisplayNode(), nodes[0].GetDisplayNode()
                if display is not None and source is not None:
                    display.SetWindowLevel(source.GetWindow(), source.GetLevel())
            nodes[0].SetAttribute("MedDiffusion.input", self._input_id)
        parameter_node = MedDiffusionParameterNode.get_or_create(scene)
        parameter_node.set_output("Output", nodes[0])
        parameter_node.set_output("Degraded", nodes[1] if len(nodes) > 1 else None)
        self._show(nodes)
        self.longest_finish_s = time.monotonic() - began
        return nodes

    # ---------------------------------------------------------------- results in the scene
    @staticmethod
    def _add_volume(scene: Any, volume: Any, name: str, result: Union[GenerationResult, ReconstructionResult],
                    provenance: dict[str, str]) -> Any:
        window_level = display_window_level(volume.array, result.modality, result.anatomy or "")
        node = mrml_volumes.array_to_volume_node(volume, scene, name, window_level)
        for key, value in {"seed": str(result.seed), "anatomy": result.anatomy, "modality": result.modality,
                           **provenance}.items():
            if value not in (None, "", "None"):
                node.SetAttribute(f"MedDiffusion.{key}", str(value))
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


def display_window_level(array: np.ndarray, modality: str, anatomy: str = "") -> tuple[float, float]:
    """A window/level fitting the intensities: CT in HU gets a CT preset (bone for the legs, soft tissue
    otherwise), normalised [0, 1] data gets window 1 / level 0.5, anything else (MR) its 1-99 percentile range.
    Statistics come from a voxel sample (milliseconds for 512^3)."""
    arr = mrml_volumes.display_sample(array)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr.ravel()
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if modality.upper() == "CT" and lo < -200.0:  # air is about -1000 HU: intensities are in HU
        return CT_BONE if "leg" in anatomy.lower() else CT_SOFT_TISSUE
    if lo >= -0.05 and hi <= 1.05:
        return 1.0, 0.5
    p1, p99 = (float(v) for v in np.percentile(finite, [1.0, 99.0])) if finite.size else (lo, hi)
    return max(p99 - p1, 1e-6), (p99 + p1) / 2.0


def apply_display_preset(node: Any, modality: str, anatomy: str = "") -> tuple[float, float]:
    """Grey colormap and `display_window_level` on an existing volume node. Returns (window, level)."""
    import slicer

    window, level = display_window_level(slicer.util.arrayFromVolume(node), modality, anatomy)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        mrml_volumes.set_grey_window_level(display, (window, level))
    return window, level
