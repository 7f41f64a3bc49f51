"""Qt-free logic of the MedDiffusion Slicer module: MRML volume glue, parameter node, jobs on a job server.

Everything here imports with slicer-core alone (no Slicer application, no Qt), so the same code is tested
headlessly in CI and runs inside Slicer. Only MedDiffusionLib's torch-free modules (options, progress, results)
are imported at start-up, the rest lazily; torch never is (jobs run in the job server's process).
"""
from .logic import BusyError, MedDiffusionLogic, apply_display_preset
from .parameters import MedDiffusionParameterNode, MedDiffusionParameters

__all__ = [
    "BusyError",
    "MedDiffusionLogic",
    "MedDiffusionParameterNode",
    "MedDiffusionParameters",
    "apply_display_preset",
]
