"""The module's settings, typed, with defaults, saved in the scene through a vtkMRMLScriptedModuleNode.

`MedDiffusionParameters` is an immutable snapshot (what a job is started with, so a job never reads the scene
again); `MedDiffusionParameterNode` wraps the scene node and converts both ways. The server token is deliberately
not a field: scenes get shared, so tokens live in application settings per server origin (tokens.py) and are
passed to the logic as an argument.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from MedDiffusionLib.options import (DEFAULT_SAMPLER, MASKS, METHOD_TASKS, METHODS, SAMPLERS, SEED_MAX,
                                     GenerateOptions, ReconstructOptions, default_steps, format_size, parse_size)
from MedDiffusionLib.options import TASKS as _TASKS

__all__ = [
    "MODULE_NAME",
    "BACKENDS",
    "DEVICES",
    "MODALITIES",
    "SAMPLERS",
    "TASKS",
    "MASKS",
    "METHODS",
    "methods_for_task",
    "method_for_task",
    "MedDiffusionParameters",
    "MedDiffusionParameterNode",
    "parse_size",
    "parse_hu_setting",
    "format_size",
    "TASK_MODALITY",
]

MODULE_NAME = "MedDiffusion"
BACKENDS = ("local", "remote")
DEVICES = ("auto", "cpu", "cuda")
MODALITIES = ("CT", "MR")
# Choices, defaults and bounds of the generation and reconstruction settings come from the library's options
# (MedDiffusionLib/options.py, no torch); Testing/test_options_agree.py checks this panel against them.
TASKS = tuple(_TASKS)
TASK_MODALITY = dict(_TASKS)  # modality each reconstruction task works on
HU_OFF = "off"  # ct_hu_range value: keep generated CT as the model's [0, 1] intensities
_SEED_MAX = min(SEED_MAX, 2**31 - 2)  # the seed spin box holds a 32-bit int (its maximum is 2147483646)
_STEPS_RANGE = GenerateOptions.spec("steps").bound.int_range()
_VIEWS_RANGE = ReconstructOptions.spec("views").bound.int_range()
# The panel's spin box takes whole factors: acceleration > 1 means at least 2.
_ACCELERATION_RANGE = ReconstructOptions.spec("acceleration").bound.int_range()

_log = logging.getLogger(__name__)


def _meta(choices: tuple[str, ...] | None = None, lo: int | None = None, hi: int | None = None) -> dict:
    return {"choices": choices, "min": lo, "max": hi}


@dataclass(frozen=True)
class MedDiffusionParameters:
    """Every control of the module panel. Sizes are 'XxYxZ' voxels ('' = the anatomy's default size)."""

    # Backend
    backend: str = field(default="local", metadata=_meta(BACKENDS))
    device: str = field(default="auto", metadata=_meta(DEVICES))
    server_url: str = "http://127.0.0.1:8000"
    # Models: the bundled demo model unless switched off; then a registered model by name (`meddiffusion models
    # list`: official-8x once downloaded, the user's own), else a bundle folder, else the two checkpoint files.
    use_demo_model: bool = True
    model_name: str = ""
    bundle_dir: str = ""
    autoencoder_path: str = ""
    denoiser_path: str = ""
    # Generate
    modality: str = field(default="CT", metadata=_meta(MODALITIES))
    anatomy: str = "ct-chest-abdomen"
    size: str = ""
    # The library's default sampler and its default steps (a fast one: 1000 DDPM steps take minutes on a GPU).
    sampler: str = field(default=DEFAULT_SAMPLER, metadata=_meta(SAMPLERS))
    steps: int = field(default=default_steps(DEFAULT_SAMPLER), metadata=_meta(None, *_STEPS_RANGE))
    seed: int = field(default=0, metadata=_meta(lo=0, hi=_SEED_MAX))
    random_seed: bool = True
    # Generated CT in Hounsfield units: '' = the range the model declares, 'LOW,HIGH' = that range, 'off' = [0, 1]
    ct_hu_range: str = ""
    # Reconstruct
    input_volume_id: str = ""  # stored as a node reference, not a parameter
    task: str = field(default=ReconstructOptions.task, metadata=_meta(TASKS))
    recon_anatomy: str = ""  # '' = suggested from the input volume
    views: int = field(default=ReconstructOptions.views, metadata=_meta(None, *_VIEWS_RANGE))
    acceleration: int = field(default=int(ReconstructOptions.acceleration), metadata=_meta(None, *_ACCELERATION_RANGE))
    mask: str = field(default=ReconstructOptions.mask, metadata=_meta(MASKS))
    method: str = field(default=ReconstructOptions.method, metadata=_meta(METHODS))
    simulate: bool = ReconstructOptions.simulate
    data_consistency: bool = ReconstructOptions.data_consistency

    def replace(self, **changes: Any) -> "MedDiffusionParameters":
        """A validated copy with `changes` applied. A new task keeps the method when it applies to that task,
        else takes the default method (the panel's method list changes with the task)."""
        if "task" in changes and "method" not in changes:
            changes["method"] = method_for_task(self.method, changes["task"])
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "MedDiffusionParameters":
        """Self, after checking choices and ranges; raises ValueError naming the bad field."""
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.size:
            parse_size(self.size)
        parse_hu_setting(self.ct_hu_range)
        if self.method not in methods_for_task(self.task):
            raise ValueError(f"method {self.method} does not apply to task {self.task}; choose one of "
                             f"{', '.join(methods_for_task(self.task))}")
        return self

    @property
    def size_xyz(self) -> tuple[int, int, int] | None:
        return parse_size(self.size) if self.size else None


def methods_for_task(task: str) -> tuple[str, ...]:
    """The reconstruction methods that apply to `task`, in the library's order (fbp is CT-only, ...)."""
    return tuple(m for m in METHODS if task in METHOD_TASKS[m])


def method_for_task(method: str, task: str) -> str:
    """`method` if it applies to `task`, else the library's default method (which applies to every task)."""
    return method if method in methods_for_task(task) else ReconstructOptions.method


_FIELDS = {f.name: f for f in dataclasses.fields(MedDiffusionParameters)}
_REFERENCE_FIELDS = {"input_volume_id": "InputVolume"}
_DEFAULTS = MedDiffusionParameters()


def _check_value(f: dataclasses.Field, value: Any) -> None:
    kind = type(getattr(_DEFAULTS, f.name))
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{f.name} must be an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}; got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ValueError(f"{f.name} must be >= {meta['min']}, got {value}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ValueError(f"{f.name} must be <= {meta['max']}, got {value}")


def parse_hu_setting(text: str) -> tuple[float, float] | str | None:
    """ct_hu_range -> None (model default), 'off', or (low, high); ValueError naming the problem."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == HU_OFF:
        return HU_OFF
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"CT HU range must be 'LOW,HIGH' (e.g. -1000,1000), empty or 'off'; got {text!r}") from None
    if not low < high:
        raise ValueError(f"CT HU range must be increasing (LOW < HIGH), got {text!r}")
    return low, high


def _to_text(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    return str(value)


def _from_text(name: str, text: str) -> Any:
    """Parse a stored string for field `name`; ValueError when it does not fit."""
    kind = type(getattr(_DEFAULTS, name))
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if kind is int:
        return int(text.strip())
    return text


class MedDiffusionParameterNode:
    """Typed access to the module's vtkMRMLScriptedModuleNode (one singleton per scene)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @classmethod
    def get_or_create(cls, scene: Any) -> "MedDiffusionParameterNode":
        """The scene's MedDiffusion parameter node, created with defaults if missing (same lookup as
        ScriptedLoadableModuleLogic.getParameterNode, so Slicer finds it on scene reload)."""
        import slicer

        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        wrapper = cls(node)
        wrapper._fill_defaults()
        return wrapper

    def _fill_defaults(self) -> None:
        # Write only what is missing so values from a saved scene win, and the saved XML lists every field.
        missing = {name: getattr(_DEFAULTS, name) for name in _FIELDS
                   if name not in _REFERENCE_FIELDS and not self.node.GetParameter(name)}
        if missing:
            was = self.node.StartModify()
            for name, value in missing.items():
                self.node.SetParameter(name, _to_text(value))
            self.node.EndModify(was)

    def read(self) -> MedDiffusionParameters:
        """A snapshot of the node; unreadable or out-of-range stored values fall back to their defaults."""
        values: dict[str, Any] = {}
        for name, f in _FIELDS.items():
            if name in _REFERENCE_FIELDS:
                values[name] = self.node.GetNodeReferenceID(_REFERENCE_FIELDS[name]) or ""
                continue
            text = self.node.GetParameter(name)
            if not text:  # missing (older scene): default; every "" field defaults to "" anyway
                continue
            try:
                value = _from_text(name, text)
                _check_value(f, value)
            except ValueError as exc:
                _log.warning("MedDiffusion parameter %s=%r ignored (%s); using the default", name, text, exc)
                continue
            values[name] = value
        if "method" in values:  # e.g. fbp stored with task mri by a hand-edited scene: the default method
            values["method"] = method_for_task(values["method"], values.get("task", _DEFAULTS.task))
        params = MedDiffusionParameters(**values)
        for name, check in (("size", parse_size), ("ct_hu_range", parse_hu_setting)):
            if getattr(params, name):
                try:
                    check(getattr(params, name))
                except ValueError:
                    params = dataclasses.replace(params, **{name: ""})
        return params

    def write(self, params: MedDiffusionParameters) -> None:
        """Store every field of `params` (validated first), in one Modified event."""
        params.validated()
        was = self.node.StartModify()
        try:
            for name in _FIELDS:
                value = getattr(params, name)
                if name in _REFERENCE_FIELDS:
                    self.node.SetNodeReferenceID(_REFERENCE_FIELDS[name], value or None)
                elif self.node.GetParameter(name) != _to_text(value):
                    self.node.SetParameter(name, _to_text(value))
        finally:
            self.node.EndModify(was)

    def update(self, **changes: Any) -> MedDiffusionParameters:
        """Change some fields (validated); returns the new snapshot."""
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown MedDiffusion parameter(s): {', '.join(sorted(unknown))}")
        params = self.read().replace(**changes)
        self.write(params)
        return params

    @property
    def input_volume(self) -> Any:
        return self.node.GetNodeReference(_REFERENCE_FIELDS["input_volume_id"])

    @input_volume.setter
    def input_volume(self, volume_node: Any) -> None:
        self.node.SetNodeReferenceID(_REFERENCE_FIELDS["input_volume_id"],
                                     volume_node.GetID() if volume_node is not None else None)

    def set_output(self, role: str, volume_node: Any) -> None:
        """Remember the latest result ('Output', 'Degraded') so it is found again after a scene reload."""
        self.node.SetNodeReferenceID(role, volume_node.GetID() if volume_node is not None else None)

    def output(self, role: str) -> Any:
        return self.node.GetNodeReference(role)
