"""Procedural 3D anatomical phantoms for the seven official anatomies (tests, demos, training smoke runs).

Each phantom is painted as a tissue label map from randomly perturbed ellipsoids, elliptic cylinders and tubes
(vessels, ribs, airways) on a smoothly warped coordinate grid, then mapped to intensities: CT in Hounsfield
units (air -1000, lung ~-850, fat ~-100, soft tissue 20-60, contrast-enhanced blood ~250, bone 300-1500) with
correlated Gaussian noise, MR in arbitrary positive units (T1, T2 or proton density) with a smooth bias field
and Rician noise. Shapes are defined in anatomical millimetres (LPS: +x patient left, +y posterior,
+z superior) and shrunk uniformly when the field of view is smaller than the body part, so even a 64^3
phantom shows the whole recognisable outline. Only numpy and SimpleITK are used (no scipy at run time).

``mr-knee`` is laid out as knee MR is acquired and as the official 8x40x40 latent implies: sagittal slices
(the Z axis runs left-right, rows run superior to inferior, columns anterior to posterior); the direction
matrix stays identity like every other phantom.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..catalog import OFFICIAL_ANATOMIES
from ..errors import InputError
from ._phantom_anatomy import BUILDERS
from ._phantom_canvas import TISSUES, Canvas, gaussian

__all__ = ["ANATOMIES", "MODALITY", "DEFAULT_SPACING", "make_phantom", "make_phantom_array", "tissue_names"]

# The official anatomies (catalog.py holds their table: names, modalities, spacings); one phantom each.
ANATOMIES: tuple[str, ...] = tuple(a.name for a in OFFICIAL_ANATOMIES)
MODALITY: dict[str, str] = {a.name: a.modality for a in OFFICIAL_ANATOMIES}
# Spacings (X, Y, Z) mm of the official training data, used when none is given.
DEFAULT_SPACING: dict[str, tuple[float, float, float]] = {a.name: a.spacing_xyz for a in OFFICIAL_ANATOMIES}


@dataclass(frozen=True)
class _Spec:
    builder: str  # key of BUILDERS
    contrast: str  # intensity table: "CT", "T1", "T2" or "PD"
    center: tuple[float, float, float]  # anatomical point (lr, ap, si) mm at the volume centre
    nominal: tuple[float, float, float]  # body-part extent (lr, ap, si) mm that the in-plane FOV should hold
    layout: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((2, 1), (1, 1), (0, 1))
    # layout[k] = (array axis in (Z, Y, X), sign) carrying anatomical axis k = lr, ap, si.


_SAGITTAL = ((0, 1), (2, 1), (1, -1))  # lr along Z, ap along X (columns), si along -Y (rows, top = superior)
_SPECS: dict[str, _Spec] = {
    "ct-head-neck": _Spec("head", "CT", (0.0, 0.0, -35.0), (165.0, 205.0, 300.0)),
    "mr-t1-brain": _Spec("head", "T1", (0.0, 0.0, 5.0), (165.0, 205.0, 200.0)),
    "mr-t2-brain": _Spec("head", "T2", (0.0, 0.0, 5.0), (165.0, 205.0, 200.0)),
    "ct-chest-abdomen": _Spec("torso", "CT", (0.0, 0.0, 0.0), (350.0, 255.0, 500.0)),
    "mr-abdomen": _Spec("torso", "T2", (0.0, 0.0, -70.0), (350.0, 255.0, 300.0)),
    "ct-legs": _Spec("legs", "CT", (0.0, 5.0, 30.0), (390.0, 230.0, 600.0)),
    "mr-knee": _Spec("knee", "PD", (0.0, 5.0, 0.0), (120.0, 150.0, 250.0), _SAGITTAL),
}

# Column of each contrast in TISSUES rows: (CT, CT contrast delta, T1, T2, PD, fine texture, coarse texture).
_COLUMN = {"CT": 0, "T1": 2, "T2": 3, "PD": 4}


def _check(anatomy: str, size_xyz: Sequence[int], spacing_xyz: Sequence[float] | None
           ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if anatomy not in _SPECS:
        raise InputError(f"unknown anatomy '{anatomy}'; valid: {', '.join(ANATOMIES)}")
    if len(size_xyz) != 3 or any(int(n) < 4 or int(n) != n for n in size_xyz):
        raise InputError(f"phantom size must be three integers >= 4 (X, Y, Z), got {tuple(size_xyz)}")
    spacing = DEFAULT_SPACING[anatomy] if spacing_xyz is None else tuple(float(s) for s in spacing_xyz)
    if len(spacing) != 3 or any(not (s > 0 and np.isfinite(s)) for s in spacing):
        raise InputError(f"phantom spacing must be three positive numbers (X, Y, Z) mm, got {spacing_xyz}")
    return (int(size_xyz[0]), int(size_xyz[1]), int(size_xyz[2])), spacing


def _gauss(arr: np.ndarray, sigma_zyx: Sequence[float]) -> np.ndarray:
    """Gaussian blur with per-axis sigma in voxels (SimpleITK keeps scipy out of the run-time dependencies)."""
    out = gaussian(sitk.GetImageFromArray(arr), list(reversed(sigma_zyx)))
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def _intensities(canvas: Canvas, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Label map -> intensity with per-subject tissue values and fine/coarse tissue texture."""
    table = np.array([row for _name, row in TISSUES], dtype=np.float32)
    col = _COLUMN[contrast]
    base = table[:, col].copy()
    if contrast == "CT":
        # Contrast phase drawn per subject: none, or a venous/arterial-like enhancement of perfused tissues.
        enhance = 0.0 if rng.random() < 0.4 else rng.uniform(0.6, 1.25)
        base += enhance * table[:, 1]
        base += rng.normal(0.0, 1.0, base.shape).astype(np.float32) * np.minimum(12.0, 0.06 * np.abs(base))
        base[0] = -1000.0  # air stays air
        fine, coarse = table[:, 5], table[:, 6]
    else:
        base *= rng.uniform(0.92, 1.08, base.shape).astype(np.float32)
        fine, coarse = table[:, 7] * base, table[:, 8] * base
    lab = canvas.labels
    out = base[lab]
    out += fine[lab] * canvas.field("tex_fine", 0.0)
    out += coarse[lab] * canvas.field("tex_coarse", 6.0)
    return out


def _finish_ct(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    vol = _gauss(vol, (0.55, 0.55, 0.55))  # partial volume / system blur
    noise = rng.standard_normal(vol.shape).astype(np.float32)
    noise = _gauss(noise, (0.35, 0.7, 0.7))  # CT noise is correlated in-plane by the reconstruction kernel
    noise *= rng.uniform(10.0, 18.0) / max(float(noise.std()), 1e-6)
    return np.clip(np.rint(vol + noise), -1024.0, 3071.0).astype(np.float32)


def _finish_mr(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    vol = _gauss(vol, (0.5, 0.5, 0.5))
    # Receive-coil bias: a smooth multiplicative field, exp of a random low-order polynomial (+-10..25 %).
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in vol.shape]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    c = rng.normal(0.0, 1.0, 7) * rng.uniform(0.05, 0.12)
    log_bias = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * x + c[6] * y * y
    vol = vol * np.exp(log_bias).astype(np.float32)
    sigma = rng.uniform(0.012, 0.03) * float(np.percentile(vol, 99.5))
    real = vol + sigma * rng.standard_normal(vol.shape).astype(np.float32)
    imag = sigma * rng.standard_normal(vol.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)  # Rician magnitude


def _build(anatomy: str, size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float],
           seed: int) -> tuple[np.ndarray, np.ndarray]:
    spec = _SPECS[anatomy]
    canvas = Canvas(size_xyz, spacing_xyz, spec.layout, spec.center, spec.nominal, seed)
    BUILDERS[spec.builder](canvas, spec.contrast == "CT")
    rng = np.random.default_rng([int(seed), 7919])  # intensity/noise stream, independent of the shapes
    vol = _intensities(canvas, spec.contrast, rng)
    vol = _finish_ct(vol, rng) if spec.contrast == "CT" else _finish_mr(vol, rng)
    return vol, canvas.labels


def make_phantom(anatomy: str, size_xyz: Sequence[int] = (64, 64, 64),
                 spacing_xyz: Sequence[float] | None = None, seed: int = 0) -> sitk.Image:
    """A float32 phantom image of ``anatomy`` with size (X, Y, Z), spacing (X, Y, Z) mm (default: the
    anatomy's official spacing), identity direction and an origin that centres the volume on (0, 0, 0).

    CT values are Hounsfield units (integers in the int16 range), MR values arbitrary positive units.
    Deterministic for a given ``seed``; different seeds vary shape, size, intensities, contrast and noise.
    """
    size, spacing = _check(anatomy, size_xyz, spacing_xyz)
    vol, _labels = _build(anatomy, size, spacing, int(seed) % 2 ** 63)  # any int; numpy seeds must be >= 0
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(-(n - 1) / 2.0 * s for n, s in zip(size, spacing)))
    return img


def make_phantom_array(anatomy: str, shape_zxy: Sequence[int] = (64, 64, 64),
                       spacing_xyz: Sequence[float] | None = None, seed: int = 0) -> np.ndarray:
    """Like ``make_phantom`` but returns the network-order (Z, X, Y) float32 array."""
    if len(shape_zxy) != 3:
        raise InputError(f"shape must be (Z, X, Y), got {tuple(shape_zxy)}")
    size = (int(shape_zxy[1]), int(shape_zxy[2]), int(shape_zxy[0]))
    size, spacing = _check(anatomy, size, spacing_xyz)
    vol, _labels = _build(anatomy, size, spacing, int(seed) % 2 ** 63)
    return np.ascontiguousarray(vol.transpose(0, 2, 1))


def tissue_names() -> tuple[str, ...]:
    """Tissue class names indexed by label value (the label maps built by ``_build``)."""
    return tuple(name for name, _row in TISSUES)
