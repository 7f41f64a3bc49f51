"""Request and response models of the HTTP API (pydantic); field names are the wire format."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..options import SCHEDULE_LENGTH, GenerateOptions, OptionSpec, ReconstructOptions

_GENERATE = GenerateOptions.specs()
_RECONSTRUCT = ReconstructOptions.specs()


def _option(spec: OptionSpec, **constraints: Any) -> Any:
    """A field with the option's default and help, its choices and bounds in the JSON schema. The values are
    checked by the options' `validate` (in the endpoints), so the server refuses exactly what the library
    refuses, with the same message; pydantic only checks the types (and lengths, against huge strings)."""
    schema: dict[str, Any] = {}
    if spec.choices:
        schema["enum"] = list(spec.choices)
    if spec.bound is not None:
        if spec.bound.low is not None:
            schema["exclusiveMinimum" if spec.bound.low_open else "minimum"] = spec.bound.low
        if spec.bound.high is not None:
            schema["maximum"] = spec.bound.high
    return Field(spec.default, description=spec.help, json_schema_extra=schema or None, **constraints)


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate: the server's subset of `GenerateOptions`."""
    model_config = ConfigDict(extra="forbid")  # a typo in a field name is an error, not a silent default

    anatomy: str = Field(min_length=1, max_length=64, description=_GENERATE["anatomy"].help)
    size_xyz: Optional[tuple[int, int, int]] = _option(_GENERATE["size_xyz"])
    sampler: str = _option(_GENERATE["sampler"], max_length=16)
    steps: Optional[int] = _option(_GENERATE["steps"])
    seed: Optional[int] = _option(_GENERATE["seed"])
    hu_range: Optional[tuple[float, float]] = _option(_GENERATE["hu_range"])


class ReconstructParams(BaseModel):
    """The form fields sent with the uploaded volume: the server's subset of `ReconstructOptions`."""
    model_config = ConfigDict(extra="forbid")

    task: str = _option(_RECONSTRUCT["task"], min_length=1, max_length=64)
    method: str = _option(_RECONSTRUCT["method"], max_length=16)
    anatomy: Optional[str] = _option(_RECONSTRUCT["anatomy"], max_length=64)
    views: int = _option(_RECONSTRUCT["views"])
    acceleration: float = _option(_RECONSTRUCT["acceleration"])
    mask: str = _option(_RECONSTRUCT["mask"], max_length=16)
    simulate: bool = _option(_RECONSTRUCT["simulate"])
    sampler: str = _option(_RECONSTRUCT["sampler"], max_length=16)
    steps: Optional[int] = _option(_RECONSTRUCT["steps"])
    seed: Optional[int] = _option(_RECONSTRUCT["seed"])
    data_consistency: bool = _option(_RECONSTRUCT["data_consistency"])


class AnatomyInfo(BaseModel):
    """One anatomy of the loaded model, as /v1/models lists it."""
    name: str
    class_index: int
    modality: str
    description: str = ""
    sizes_xyz: list[tuple[int, int, int]]
    spacing_xyz: tuple[float, float, float]


class Limits(BaseModel):
    """The server's limits, as /v1/models reports them."""
    max_queue: int
    max_upload_mb: float
    max_voxels: int
    result_ttl_hours: float
    max_steps: int = SCHEDULE_LENGTH


class ModelsResponse(BaseModel):
    """/v1/models: the loaded model, its device, downsample factor, anatomies, samplers and limits."""
    model: str
    device: str
    downsample: int
    anatomies: list[AnatomyInfo]
    samplers: list[str]
    default_steps: dict[str, int]
    tasks: list[str]
    reconstruct_available: bool
    limits: Limits
    hu_range: Optional[tuple[float, float]] = None  # HU of generated CT intensities 0 and 1 (model.yaml)


class RegistryModelInfo(BaseModel):
    """One model of the server machine's registry (no paths: they are the server's business)."""

    name: str
    kind: str                     # bundled, download, user
    description: str
    available: bool               # on disk and usable
    loaded: bool                  # the model this server runs
    disk_bytes: int


class AvailableModelsResponse(BaseModel):
    """/v1/models/available: the models of the server's registry and which one is loaded."""
    loaded: str
    models: list[RegistryModelInfo]


class HealthResponse(BaseModel):
    """/health: the server is up, its version, and whether requests need a token."""
    status: Literal["ok"] = "ok"
    version: str
    auth_required: bool
