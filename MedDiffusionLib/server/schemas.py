"""Request and response models of the HTTP API (pydantic); field names are the wire format."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

Sampler = Literal["ddpm", "ddim", "dpmpp"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp")
MAX_STEPS = 1000  # the diffusion schedule's length


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a field name is an error, not a silent default

    anatomy: str = Field(min_length=1, max_length=64)
    size_xyz: Optional[tuple[int, int, int]] = Field(None, description="voxels X, Y, Z; default: the anatomy's "
                                                     "first trained size")
    sampler: Sampler = "dpmpp"
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    hu_range: Optional[tuple[float, float]] = Field(None, description="CT only: HU of intensities 0 and 1")

    @field_validator("size_xyz")
    @classmethod
    def _positive(cls, v: Optional[tuple[int, int, int]]) -> Optional[tuple[int, int, int]]:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every side must be a positive number of voxels")
        return v

    @field_validator("hu_range")
    @classmethod
    def _increasing(cls, v: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if v is not None and not v[0] < v[1]:
            raise ValueError("must be two increasing numbers (low, high)")
        return v


class ReconstructParams(BaseModel):
    """The form fields sent with the uploaded volume."""
    model_config = ConfigDict(extra="forbid")

    task: str = Field("sparse-ct", min_length=1, max_length=64)
    anatomy: Optional[str] = Field(None, max_length=64, description="default: the first of the task's modality")
    views: int = Field(30, ge=1, le=2000)
    acceleration: float = Field(8, ge=1, le=64)
    mask: Literal["gaussian", "poisson"] = "gaussian"
    simulate: bool = True
    sampler: Sampler = "dpmpp"
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    data_consistency: bool = True


class AnatomyInfo(BaseModel):
    name: str
    class_index: int
    modality: str
    description: str = ""
    sizes_xyz: list[tuple[int, int, int]]
    spacing_xyz: tuple[float, float, float]


class Limits(BaseModel):
    max_queue: int
    max_upload_mb: float
    max_voxels: int
    result_ttl_hours: float
    max_steps: int = MAX_STEPS


class ModelsResponse(BaseModel):
    model: str
    device: str
    downsample: int
    anatomies: list[AnatomyInfo]
    samplers: list[str]
    default_steps: dict[str, int]
    tasks: list[str]
    reconstruct_available: bool
    limits: Limits


class RegistryModelInfo(BaseModel):
    """One model of the server machine's registry (no paths: they are the server's business)."""

    name: str
    kind: str                     # bundled, download, user
    description: str
    available: bool               # on disk and usable
    loaded: bool                  # the model this server runs
    disk_bytes: int


class AvailableModelsResponse(BaseModel):
    loaded: str
    models: list[RegistryModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    auth_required: bool


def iso(ts: Optional[float]) -> Optional[datetime]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class JobStatus(BaseModel):
    id: str
    kind: str
    state: JobState
    progress: float = Field(ge=0.0, le=1.0)
    stage: Optional[str] = None
    step: Optional[int] = None
    total: Optional[int] = None
    eta_s: Optional[float] = None
    queue_position: Optional[int] = None
    error: Optional[str] = None
    created: datetime
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    expires: Optional[datetime] = None
    params: dict[str, Any] = {}
    outputs: list[str] = []
    info: dict[str, Any] = {}
