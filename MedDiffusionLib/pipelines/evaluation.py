"""Honest reconstruction metrics and the method-comparison loop behind ``meddiffusion evaluate`` and the benchmark.

Every score compares a reconstruction with the fully sampled input on the input's own grid: CT on the display
window [-1000, 1000] HU (both volumes clipped to it, data range 2000), MR on the input's [min, max]. A simulated
acquisition needs the fully sampled input, so scores exist only when simulating.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..metrics import psnr, ssim3d
from . import recon_settings as rules

__all__ = ["CT_WINDOW_HU", "native_scores", "MethodScores", "compare_methods", "format_table"]

CT_WINDOW_HU = (-1000.0, 1000.0)


def native_scores(output: sitk.Image, reference: sitk.Image, modality: str
                  ) -> tuple[float, float, tuple[float, float]]:
    """(PSNR dB, SSIM, window) of ``output`` against ``reference`` on the reference's grid.

    Args:
        output: the volume to score, same size as ``reference``.
        reference: the ground truth (CT in HU).
        modality: 'CT': both clipped to `CT_WINDOW_HU`; anything else: the window is the reference's min..max.

    Returns:
        (PSNR in dB, 3D SSIM, (low, high) window the data range was taken from).

    Raises:
        InputError: the sizes differ.
    """
    if output.GetSize() != reference.GetSize():
        raise InputError(f"cannot score a {output.GetSize()} volume against a {reference.GetSize()} reference")
    out = sitk.GetArrayFromImage(output).astype(np.float32)
    ref = sitk.GetArrayFromImage(reference).astype(np.float32)
    if modality == "CT":
        lo, hi = CT_WINDOW_HU
        out, ref = np.clip(out, lo, hi), np.clip(ref, lo, hi)
    else:
        lo, hi = float(ref.min()), float(ref.max())
    data_range = max(hi - lo, 1e-6)
    return psnr(out, ref, data_range), ssim3d(out, ref, data_range), (lo, hi)


@dataclass
class MethodScores:
    """Per-volume PSNR, SSIM and seconds of one method."""
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def mean(self, what: str) -> float:
        """Mean of ``what`` ("psnr", "ssim" or "seconds"); NaN when empty."""
        values = getattr(self, what)
        return float(np.mean(values)) if values else math.nan

    def std(self, what: str) -> float:
        """Sample standard deviation of ``what``; 0 for fewer than two volumes."""
        values = getattr(self, what)
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare_methods(run: Callable[..., Any], images: Sequence[sitk.Image], task: str,
                    methods: Optional[Sequence[str]] = None, log: Optional[Callable[[str], None]] = None,
                    **options: Any) -> dict[str, MethodScores]:
    """Reconstruct every image with every method (``run(image, method=..., **options)`` returns a
    ``ReconstructionResult`` with simulate=True) -> scores per method; the conventional baseline first."""
    applicable = [m for m in rules.METHODS if task in rules.METHOD_TASKS[m]]
    methods = list(methods) if methods else applicable
    for m in methods:
        rules.check_method(m, task)
    scores = {m: MethodScores() for m in methods}
    for i, image in enumerate(images):
        for m in methods:
            r = run(image, method=m, simulate=True, **options)
            scores[m].psnr.append(float(r.psnr))
            scores[m].ssim.append(float(r.ssim))
            scores[m].seconds.append(float(r.elapsed_s))
            if log is not None:
                log(f"  volume {i + 1}/{len(images)} {m:<12} PSNR {r.psnr:6.2f} dB  SSIM {r.ssim:.3f}  "
                    f"{r.elapsed_s:6.1f} s")
    return scores


def format_table(scores: dict[str, MethodScores]) -> str:
    """The comparison as a text table: mean +- std of PSNR, SSIM and time per method."""
    lines = [f"{'method':<12} {'PSNR (dB)':>16} {'SSIM':>16} {'time (s)':>9}"]
    for name, s in scores.items():
        lines.append(f"{name:<12} {s.mean('psnr'):>8.2f} +- {s.std('psnr'):<5.2f} {s.mean('ssim'):>8.3f} +- "
                     f"{s.std('ssim'):<5.3f} {s.mean('seconds'):>9.1f}")
    return "\n".join(lines)
