"""The options of each task, written once: defaults, bounds, choices and their validation.

`GenerateOptions` and `ReconstructOptions` are the single source of truth for what a user may ask for. The
pipelines validate their inputs with them; the command line, the HTTP server's schemas, the Slicer panel and the
client derive their defaults, choices and bounds from them (Testing/test_options_agree.py checks that they do),
so a value is refused the same way, with the same message, everywhere -- and before any work is queued.

This module imports nothing heavy (no torch, numpy or SimpleITK): the Slicer panel reads it at start-up.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from .errors import InputError

__all__ = [
    "SAMPLERS", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "SCHEDULE_LENGTH", "TASKS", "MASKS", "SEED_MAX", "METHODS",
    "DEFAULT_METHOD", "METHOD_TASKS", "MEASUREMENT_METHODS",
    "Bound", "OptionSpec", "TaskOptions", "GenerateOptions", "ReconstructOptions", "parse_size", "format_size",
    "default_steps",
]

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp")
DEFAULT_SAMPLER = "dpmpp"
# Steps used when none are given. DDPM: every timestep (the authors' sampler); DDIM and DPM-Solver++ reach
# comparable quality in far fewer model evaluations.
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 100, "dpmpp": 50}
# Length of the diffusion schedule (timesteps T) when a bundle declares none; steps can never exceed a bundle's T.
SCHEDULE_LENGTH = 1000
# Reconstruction task -> the modality of the anatomies it fits.
TASKS: dict[str, str] = {"sparse-ct": "CT", "mri": "MR"}
MASKS: tuple[str, ...] = ("gaussian", "poisson")
# Reconstruction methods (pipelines/recon_settings.py documents what each does and the rules it follows).
METHODS: tuple[str, ...] = ("fbp", "zero-filled", "sart", "tv", "diffusion")
DEFAULT_METHOD = "diffusion"
METHOD_TASKS: dict[str, tuple[str, ...]] = {
    "fbp": ("sparse-ct",), "zero-filled": ("mri",), "sart": ("sparse-ct",), "tv": ("sparse-ct", "mri"),
    "diffusion": ("sparse-ct", "mri"),
}
# Methods that solve against the measurements. An already-degraded MRI input (simulate=False) has none: its
# sampling mask is unknown (a degraded CT input is re-projected, so CT always has them).
MEASUREMENT_METHODS: tuple[str, ...] = ("sart", "tv")
SEED_MAX = 2**63 - 1  # seeds go to torch.Generator.manual_seed, which takes a 64-bit integer
# Exclusive lower bound of the MRI undersampling factor R: R = 1 samples everything (physics.mri uses it too).
MIN_ACCELERATION = 1.0

SizeXYZ = Tuple[int, int, int]
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX\u00d7,\s]\s*(\d+)\s*[xX\u00d7,\s]\s*(\d+)\s*$")


def parse_size(size: Union[str, Sequence[int]]) -> SizeXYZ:
    """A volume size 'XxYxZ' voxels (e.g. '256x256x128') or a 3-sequence of ints -> (X, Y, Z).

    Args:
        size: 'XxYxZ' text ('x' may also be written 'X', 'x' with spaces around it, a comma or a multiplication
            sign), or three whole numbers in X, Y, Z order (floats such as 64.0 are accepted, 64.5 and booleans
            are not).

    Returns:
        (X, Y, Z) in voxels, each >= 1.

    Raises:
        InputError: unless there are exactly three positive whole numbers.
    """
    if isinstance(size, str):
        m = _SIZE_RE.match(size)
        if not m:
            raise InputError(f"size must be three whole numbers written XxYxZ (e.g. 256x256x128), got {size!r}")
        vals = tuple(int(g) for g in m.groups())
    else:
        try:
            vals = tuple(_whole(v) for v in size)
        except (TypeError, ValueError):
            raise InputError(f"size must be 'XxYxZ' or three whole numbers, got {size!r}") from None
        if len(vals) != 3:
            raise InputError(f"size must have three values (X, Y, Z), got {size!r}")
    if any(v <= 0 for v in vals):
        raise InputError(f"size {size!r} must be positive in every direction")
    return vals[0], vals[1], vals[2]


def format_size(size_xyz: Sequence[int]) -> str:
    """(X, Y, Z) -> 'XxYxZ', the format `parse_size` reads."""
    return "x".join(str(int(v)) for v in size_xyz)


def _whole(v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(v, int):
        return v
    f = float(v)
    if not f.is_integer():
        raise ValueError(f"{v!r} is not a whole number")
    return int(f)


def default_steps(sampler: str, timesteps: int = SCHEDULE_LENGTH) -> int:
    """The steps `sampler` uses when none are given, never more than the schedule's length.

    Args:
        sampler: one of `SAMPLERS` (a KeyError otherwise: callers pass checked names).
        timesteps: length T of the model's diffusion schedule.

    Returns:
        ``min(DEFAULT_STEPS[sampler], timesteps)``.
    """
    return min(DEFAULT_STEPS[sampler], int(timesteps))


@dataclass(frozen=True)
class Bound:
    """A numeric range; `low_open` excludes `low` itself (acceleration > 1)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies within the bound."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        """The bound in words, for error messages and help texts ("between 1 and 1000", "greater than 1")."""
        if self.low is not None and self.high is not None and not self.low_open:
            return f"between {self.low:g} and {self.high:g}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)

    def int_range(self) -> tuple[Optional[int], Optional[int]]:
        """The smallest and largest whole numbers inside (for integer widgets: > 1 becomes >= 2)."""
        low = None if self.low is None else (math.floor(self.low) + 1 if self.low_open else math.ceil(self.low))
        return low, None if self.high is None else math.floor(self.high)


@dataclass(frozen=True)
class OptionSpec:
    """What a front end needs to offer one option: its type, default, choices or bound, and a help line."""

    name: str
    kind: type                         # int, float, str, bool, tuple
    default: Any
    help: str
    choices: Optional[tuple[str, ...]] = None
    bound: Optional[Bound] = None
    optional: bool = False             # None is a valid value ("use the default" / "random")


def _opt(default: Any, help: str, *, choices: Optional[Sequence[str]] = None, bound: Optional[Bound] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "bound": bound})


def _steps_help() -> str:
    table = ", ".join(f"{n} {s}" for s, n in DEFAULT_STEPS.items())
    return f"sampler steps, at most the schedule's length (default {table})"


_T = TypeVar("_T", bound="TaskOptions")


@dataclass(frozen=True)
class TaskOptions:
    """Shared machinery: field specs, generic checks and bundle-dependent bounds."""

    if TYPE_CHECKING:  # fields of every task (declared by each subclass, in its own order)
        sampler: str
        steps: Optional[int]

    TASK: ClassVar[str] = ""
    # kind of each field, for the generic checks (the annotations are strings under `from __future__`)
    KINDS: ClassVar[dict[str, type]] = {}

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        """Every option of the task by name, in declaration order."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING:
                default = None
            else:
                default = f.default
            out[f.name] = OptionSpec(f.name, cls.KINDS[f.name], default, f.metadata.get("help", ""),
                                     f.metadata.get("choices"), f.metadata.get("bound"),
                                     optional=f.default is None)
        return out

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        """The specification (default, bound, choices, help) of the field ``name``."""
        return cls.specs()[name]

    @classmethod
    def from_mapping(cls: type[_T], values: Mapping[str, Any]) -> _T:
        """Options from a mapping (a request body, a namespace's dict), not yet validated.

        Raises:
            InputError: naming the keys that are not fields of the task.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown {cls.TASK} option(s): {', '.join(unknown)}")
        return cls(**dict(values))

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (for JSON, the server's job parameters and the pipelines' keyword arguments)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def check_field(cls, name: str, value: Any, timesteps: int = SCHEDULE_LENGTH) -> Any:
        """One option's value type-, choice- and bound-checked and normalised.

        Args:
            name: a field of this class (a KeyError otherwise).
            value: as a user gave it; None keeps the default where the field is optional.
            timesteps: the schedule length, the upper bound of ``steps``.

        Returns:
            The value as the field's kind (whole floats become ints; choices stripped and lower-cased), or None.

        Raises:
            InputError: naming the option, when the value is missing but required, of the wrong type (a bool is
                not a number), not a choice, or outside the field's bound.
        """
        spec = cls.spec(name)
        if value is None:
            if not spec.optional:
                raise InputError(f"{name} is required")
            return None
        value = _typed(spec, value)
        if spec.choices is not None:
            value = value.strip().lower()
            if value not in spec.choices:
                raise InputError(f"unknown {name} {value!r}: choose one of {', '.join(spec.choices)}")
        bound = Bound(1, int(timesteps)) if name == "steps" else spec.bound
        if bound is not None and not bound.contains(value):
            raise InputError(f"{name} must be {bound.describe()}, got {value:g}")
        return value

    def _checked(self, bundle: Any) -> dict[str, Any]:
        """Every field checked by `check_field`; steps up to the bundle's schedule length. With a bundle, steps
        left out become the sampler's default for it, so validated options name the steps that will run."""
        timesteps = int(bundle.timesteps) if bundle is not None else SCHEDULE_LENGTH
        values = {name: self.check_field(name, getattr(self, name), timesteps) for name in self.specs()}
        if bundle is not None and values["steps"] is None:
            values["steps"] = default_steps(values["sampler"], timesteps)
        return values

    def steps_or_default(self, timesteps: int = SCHEDULE_LENGTH) -> int:
        """The steps to run: the given ones, else the sampler's default (at most ``timesteps``)."""
        return default_steps(self.sampler, timesteps) if self.steps is None else int(self.steps)


def _typed(spec: OptionSpec, value: Any) -> Any:
    """`value` as the spec's type; InputError naming the option when it is not one."""
    try:
        if spec.kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if spec.kind is int:
            return _whole(value)
        if spec.kind is float:
            if isinstance(value, bool):
                raise TypeError
            f = float(value)
            if not math.isfinite(f):
                raise ValueError
            return f
        if spec.kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text"}[spec.kind]
        raise InputError(f"{spec.name} must be {what}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class GenerateOptions(TaskOptions):
    """Unconditional generation of one anatomy (GenerationPipeline).

    Each field's default, bound and help line live in its metadata (`specs()`), which every front end shows;
    below are the units and forms that the help lines leave out.

    Attributes:
        anatomy: a catalog name (case-insensitive); required.
        size_xyz: output size in voxels, X x Y x Z (text 'XxYxZ' or three ints; `validate` makes it a tuple).
            With a bundle every side must be a multiple of ``downsample * latent_multiple``.
        sampler: one of `SAMPLERS`.
        steps: sampler steps, 1 .. the bundle's schedule length T; None: `default_steps`.
        seed: 0 .. `SEED_MAX`; None: a random seed, which the result reports.
        hu_range: (low, high) in HU, low < high, both finite; CT anatomies only. None leaves intensities in
            [0, 1].
    """

    TASK: ClassVar[str] = "generate"
    KINDS: ClassVar[dict[str, type]] = {"anatomy": str, "size_xyz": tuple, "sampler": str, "steps": int,
                                        "seed": int, "hu_range": tuple}

    anatomy: Optional[str] = _opt(None, "anatomy to generate, e.g. ct-chest-abdomen (see `meddiffusion anatomies`)")
    size_xyz: Optional[Union[str, Sequence[int]]] = _opt(
        None, "output size XxYxZ voxels (default: the anatomy's first trained size)")
    sampler: str = _opt(DEFAULT_SAMPLER, "sampler", choices=SAMPLERS)
    steps: Optional[int] = _opt(None, _steps_help(), bound=Bound(1, SCHEDULE_LENGTH))
    seed: Optional[int] = _opt(None, "random seed (default: random, reported)", bound=Bound(0, SEED_MAX))
    hu_range: Optional[Sequence[float]] = _opt(None, "CT only: map the model's [0, 1] intensities to this HU range")

    def validate(self, bundle: Any = None) -> "GenerateOptions":
        """A normalised copy, or an InputError naming the first bad field.

        Args:
            bundle: a loaded `ModelBundle`, or None for the checks that need no model (types, choices, bounds,
                size and HU-range form; steps up to `SCHEDULE_LENGTH`).

        Returns:
            A copy with size as (X, Y, Z) and sampler lower-case. With a bundle also: the anatomy as the catalog
            spells it and steps filled in with the sampler's default for the bundle's schedule.

        Raises:
            InputError: naming the first bad field. With a bundle this includes an unknown anatomy, a hu_range on
                a non-CT anatomy, a size off the model's grid and steps beyond its schedule.
        """
        values = self._checked(bundle)
        if values["anatomy"] is None or not values["anatomy"].strip():
            raise InputError("anatomy is required")
        if values["size_xyz"] is not None:
            values["size_xyz"] = parse_size(values["size_xyz"])
        if values["hu_range"] is not None:
            values["hu_range"] = _hu_range(values["hu_range"])
        if bundle is not None:
            entry = bundle.catalog.get(values["anatomy"])
            values["anatomy"] = entry.name
            if values["hu_range"] is not None and entry.modality != "CT":
                raise InputError(f"hu_range only applies to CT; {entry.name} is {entry.modality}")
            if values["size_xyz"] is not None:
                step = int(bundle.downsample) * int(bundle.denoiser.latent_multiple)
                if any(s % step for s in values["size_xyz"]):
                    raise InputError(f"size {format_size(values['size_xyz'])} does not fit the model's grid: every "
                                     f"side must be a positive multiple of {step} voxels")
        return GenerateOptions(**values)


def _hu_range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"hu_range must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"hu_range must be two increasing numbers (low, high), got {low:g}, {high:g}")
    return low, high


@dataclass(frozen=True)
class ReconstructOptions(TaskOptions):
    """Sparse-view CT / accelerated MRI reconstruction (ReconstructionPipeline).

    Each field's default, bound and help line live in its metadata (`specs()`), which every front end shows;
    below are the units and forms that the help lines leave out.

    Attributes:
        task: 'sparse-ct' or 'mri' (the keys of `TASKS`).
        method: one of `METHODS`; `METHOD_TASKS` says which tasks each applies to.
        anatomy: the diffusion prior's catalog name (case-insensitive), of the task's modality; None: chosen from
            the scan.
        views: sparse-ct: number of parallel-beam angles, evenly spaced over [0, 180) degrees.
        acceleration: mri: undersampling factor R > 1 (the fraction of k-space kept is about 1/R).
        mask: mri: 'gaussian' (1D variable-density phase-encode lines) or 'poisson' (2D Poisson disc).
        simulate: True: the input is a fully sampled scan that is measured here; False: it is already the FBP /
            zero-filled image of a degraded scan.
        noise_photons: sparse-ct: incident photons per ray of the Poisson noise model, > 0; None: noise-free.
        sampler: one of `SAMPLERS`.
        steps: sampler steps, 1 .. the bundle's schedule length T; None: `default_steps`.
        seed: 0 .. `SEED_MAX`; None: a random seed, which the result reports.
        data_consistency: diffusion: whether the result is solved against the measurements on the scan's grid.
        tv_weight: >= 0; None: `pipelines.recon_settings.tv_weight` (from views / acceleration and noise).
        dc_every: diffusion: guidance every K sampler steps, >= 0; None: about 4 times per run.
    """

    TASK: ClassVar[str] = "reconstruct"
    KINDS: ClassVar[dict[str, type]] = {
        "task": str, "method": str, "anatomy": str, "views": int, "acceleration": float, "mask": str,
        "simulate": bool, "noise_photons": float, "sampler": str, "steps": int, "seed": int,
        "data_consistency": bool, "tv_weight": float, "dc_every": int}

    task: str = _opt("sparse-ct", "sparse-ct (sparse-view CT) or mri (undersampled MRI)", choices=tuple(TASKS))
    method: str = _opt(DEFAULT_METHOD, "reconstruction method on the scan's own grid: fbp and sart are CT-only, "
                       "zero-filled MRI-only; fbp / zero-filled / sart / tv need no model", choices=METHODS)
    anatomy: Optional[str] = _opt(None, "diffusion prior's anatomy (default: chosen from the modality and the "
                                  "scan's field of view; the choice and the reason are reported)")
    views: int = _opt(30, "sparse-ct: projection angles over 180 degrees", bound=Bound(1, 2048))
    # > 1: an acceleration of 1 is a fully sampled scan (physics.mri refuses it too); 64 keeps a few lines.
    acceleration: float = _opt(8.0, "mri: undersampling factor R",
                               bound=Bound(MIN_ACCELERATION, 64, low_open=True))
    mask: str = _opt("gaussian", "mri: 1D Gaussian variable-density lines or 2D Poisson disc", choices=MASKS)
    simulate: bool = _opt(True, "measure the input and reconstruct (else the input is the FBP / zero-filled image)")
    noise_photons: Optional[float] = _opt(None, "sparse-ct: Poisson noise with N incident photons per ray "
                                          "(default: noise-free)", bound=Bound(0, None, low_open=True))
    sampler: str = _opt(DEFAULT_SAMPLER, "sampler", choices=SAMPLERS)
    steps: Optional[int] = _opt(None, _steps_help(), bound=Bound(1, SCHEDULE_LENGTH))
    seed: Optional[int] = _opt(None, "random seed (default: random, reported)", bound=Bound(0, SEED_MAX))
    data_consistency: bool = _opt(True, "diffusion: solve against the measurements on the scan's grid (off: the "
                                  "prior only, brought to the scan's grid)")
    tv_weight: Optional[float] = _opt(None, "TV weight of the tv method and of the diffusion method's final solve "
                                      "(default: the documented rule from the views / acceleration and noise; 0: "
                                      "diffusion solves the prior-regularised least squares by CG only)",
                                      bound=Bound(0, None))
    dc_every: Optional[int] = _opt(None, "diffusion: guidance towards the measurements every K sampler steps "
                                   "(default: ~4 per run; 0: only the final solve on the scan's grid)",
                                   bound=Bound(0, None))

    @property
    def modality(self) -> str:
        """The modality of the anatomies the task fits."""
        return TASKS[self.task]

    def validate(self, bundle: Any = None) -> "ReconstructOptions":
        """A normalised copy, or an InputError naming the first bad field.

        Args:
            bundle: a loaded `ModelBundle`, or None for the checks that need no model (steps then up to
                `SCHEDULE_LENGTH`).

        Returns:
            A copy with choices lower-case and an empty anatomy as None. With a bundle also: the anatomy as the
            catalog spells it and steps filled in with the sampler's default for the bundle's schedule.

        Raises:
            InputError: naming the first bad field, a method that does not apply to the task, a measurement
                method (sart, tv) on an already-degraded MRI input, and with a bundle and the diffusion method:
                no ControlNet for the task, or an anatomy that is unknown or of another modality.
        """
        values = self._checked(bundle)
        if values["anatomy"] is not None and not values["anatomy"].strip():
            values["anatomy"] = None  # an empty form field: the default anatomy
        if values["task"] not in METHOD_TASKS[values["method"]]:
            allowed = [m for m, tasks in METHOD_TASKS.items() if values["task"] in tasks]
            raise InputError(f"method '{values['method']}' does not apply to task '{values['task']}'; choose one "
                             f"of {', '.join(allowed)}")
        if values["method"] in MEASUREMENT_METHODS and values["task"] == "mri" and not values["simulate"]:
            raise InputError(f"method '{values['method']}' needs measurements; an already-degraded MRI input has no "
                             "known sampling mask (simulate from a fully sampled input, or use zero-filled / "
                             "diffusion)")
        if bundle is not None and values["method"] == "diffusion":  # the model-free methods need no ControlNet
            task = values["task"]
            if task not in bundle.controlnets:
                have = ", ".join(sorted(bundle.controlnets)) or "none"
                raise InputError(f"model '{bundle.name}' has no ControlNet for task '{task}' (available: {have})")
            if values["anatomy"] is not None:
                entry = bundle.catalog.get(values["anatomy"])
                modality = TASKS[task]
                if entry.modality != modality:
                    names = ", ".join(a.name for a in bundle.catalog.by_modality(modality))
                    raise InputError(f"anatomy '{entry.name}' is {entry.modality}; task '{task}' needs a {modality} "
                                     f"anatomy: {names}")
                values["anatomy"] = entry.name
        return ReconstructOptions(**values)
