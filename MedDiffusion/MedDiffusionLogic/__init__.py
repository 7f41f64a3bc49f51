"""Qt-free logic of the MedDiffusion Slicer module: MRML volume glue, parameter node, background jobs.

Everything here imports with slicer-core alone (no Slicer application, no Qt), so the same code is tested
headlessly in CI and runs inside Slicer. MedDiffusionLib (and torch) are imported lazily, only when a job runs.
"""
from .logic import BusyError, JobState, MedDiffusionLogic, apply_display_preset
from .parameters import MedDiffusionParameterNode, MedDiffusionParameters

__all__ = [
    "BusyError",
    "JobState",
    "MedDiffusionLogic",
    "MedDiffusionParameterNode",
    "MedDiffusionParameters",
    "apply_display_preset",
]
