"""The result of each task, one type per task: what the pipeline returns, what the server reports (`info()`, the
``info`` of a finished job's status), what the client and the Slicer panel read back (`from_info`).

The volumes travel apart from the rest (the server serves them as NRRD files), so ``image`` is whatever holds the
volume where the result is: a SimpleITK image from a pipeline, a `transfers.VolumeArray` in the Slicer panel, or
None when only the job status was read. Torch-free, like `progress`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, TypeVar, Union

__all__ = ["GenerationResult", "ReconstructionResult", "result_from_info"]

_R = TypeVar("_R", bound="_Result")
_VOLUMES = ("image", "degraded")


class _Result:
    """`info()` / `from_info()` for the result dataclasses: every field but the volumes, as JSON values."""

    # Every subclass is a dataclass; declared so that the type checker accepts dataclasses.fields(self).
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def info(self) -> dict[str, Any]:
        """The result without its volumes, JSON-serialisable (tuples as lists, non-finite numbers as None)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in _VOLUMES}

    @classmethod
    def from_info(cls: type[_R], info: Mapping[str, Any], image: Any = None, degraded: Any = None) -> _R:
        """The result an `info()` describes (fields a newer server adds are ignored), with the given volumes.

        Args:
            info: the mapping `info()` made (JSON lists become tuples).
            image: the volume to attach (a SimpleITK image, a `transfers.VolumeArray`, or None).
            degraded: a reconstruction's degraded input, likewise; ignored by results without one.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in info:
                v = info[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        values["image"] = image
        if "degraded" in {f.name for f in dataclasses.fields(cls)}:
            values["degraded"] = degraded
        return cls(**values)


@dataclass
class GenerationResult(_Result):
    """One generated volume and how it was made.

    Attributes:
        image: float32 volume, size X x Y x Z, the anatomy's spacing; HU when a hu_range was given, else [0, 1].
        seed: the seed used (a random one when none was given).
        steps: sampler steps run.
        size_xyz: voxels (X, Y, Z).
        elapsed_s: seconds for the whole batch the volume was made in, up to when it was ready.
        spacing_xyz: mm (X, Y, Z).
        device: where it ran ('cpu', 'cuda:0').
    """

    image: Any                            # see the module docstring
    anatomy: str = ""
    modality: str = ""                    # the anatomy's: CT or MR
    seed: Optional[int] = None
    sampler: str = ""
    steps: Optional[int] = None
    size_xyz: tuple[int, int, int] = (0, 0, 0)
    elapsed_s: float = 0.0
    spacing_xyz: Optional[tuple[float, float, float]] = None
    device: str = ""
    warnings: tuple[str, ...] = ()        # e.g. a size the model was not trained at


@dataclass
class ReconstructionResult(_Result):
    """A reconstruction on the input's grid, its degraded input, the settings used and the scores.

    Attributes:
        image: on the input's grid, in its pixel type and intensity scale (CT: HU).
        psnr: dB against the input (simulate only), on `metric_range`.
        ssim: in [-1, 1] against the input (simulate only).
        residual: ||A u - y|| / ||y|| of the output (None: nothing measured).
        tv_weight: the TV weight used (tv; diffusion's final solve).
        size_xyz: voxels (X, Y, Z), the input's.
        spacing_xyz: mm (X, Y, Z), the input's.
    """

    image: Any                            # the reconstruction, on the input's grid, in its pixel type
    degraded: Any = None                  # FBP / zero-filled (the input itself when simulate=False)
    task: str = ""
    method: str = ""
    simulated: bool = False
    data_consistency: bool = False        # whether the output was solved against measurements
    anatomy: Optional[str] = None         # the prior's anatomy (diffusion only)
    anatomy_reason: str = ""              # how it was chosen
    seed: Optional[int] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    views: Optional[int] = None
    acceleration: Optional[float] = None
    mask: Optional[str] = None
    tv_weight: Optional[float] = None
    psnr: Optional[float] = None          # vs the input on its grid (CT: window [-1000, 1000] HU), simulate only
    ssim: Optional[float] = None
    degraded_psnr: Optional[float] = None
    degraded_ssim: Optional[float] = None
    metric_range: Optional[tuple[float, float]] = None  # intensity window of the metrics
    residual: Optional[float] = None      # relative measurement residual ||A u - y|| / ||y|| of the output
    degraded_residual: Optional[float] = None
    dc_applications: int = 0              # guidance corrections during sampling
    model_size_xyz: tuple[int, int, int] = (0, 0, 0)  # the prior's grid (diffusion only)
    elapsed_s: float = 0.0
    size_xyz: tuple[int, int, int] = (0, 0, 0)        # the output's grid (the input's)
    spacing_xyz: Optional[tuple[float, float, float]] = None
    device: str = ""

    @property
    def modality(self) -> str:
        """The modality of the task's anatomies (options.TASKS)."""
        from .options import TASKS

        return TASKS[self.task]


def result_from_info(kind: str, info: Mapping[str, Any]) -> Union[GenerationResult, ReconstructionResult]:
    """The result type of a job ``kind`` ("generate", "reconstruct") from its status ``info``, without volumes.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "generate":
        return GenerationResult.from_info(info)
    if kind == "reconstruct":
        return ReconstructionResult.from_info(info)
    raise ValueError(f"unknown job kind {kind!r}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, bool, int)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    try:
        return _jsonable(v.item())  # numpy / torch scalars
    except (AttributeError, ValueError, TypeError, RuntimeError):
        raise TypeError(f"a result field holds a {type(v).__name__}, which has no JSON form") from None
