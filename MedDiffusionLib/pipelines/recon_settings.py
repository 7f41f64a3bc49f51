"""The reconstruction methods and every rule that sets their weights and iteration counts (one place).

Methods (``--method``): ``fbp`` (sparse-view CT) / ``zero-filled`` (MRI) are the conventional reconstructions;
``sart`` (CT) is ordered-subsets SART; ``tv`` is total-variation regularised least squares (PDHG); ``diffusion``
samples the model's ControlNet-guided prior at the model's resolution, brings it to the scan's grid and solves the
data-consistency problem there (``physics.solvers``), with DDS-style CG guidance during sampling.

Rules (not tuned per case; the README's benchmark table shows what they give on real scans and phantoms):
  * The data term is the ramp-whitened, normalised ||R^(1/2)(A x - y)||^2 / ||R^(1/2) A||^2 (see
    ``physics.solvers``), so the weights below mean the same for every grid size and view count.
  * TV weight: ``TV_BASE[task]`` times the undersampling relative to a reference (CT: sqrt(60 / views); MRI:
    sqrt(R / 4)), times (1 + noise) for simulated low-dose CT (noise = sqrt(1e5 / photons)): fewer measurements
    or more noise leave more to the regulariser.
  * Prior weight lam in ``lam ||x - prior||^2``: ``PRIOR_WEIGHT``; the prior comes from a coarse model grid, so
    it only decides what the measurements leave open (null space, noise), never what they determine.
  * Debiasing after TV: TV pulls small low-contrast structures towards their surroundings (a 12 mm +100 HU lesion
    kept ~70 % of its contrast at 30 views). Every TV solve (``tv`` and the final solve of ``diffusion``) is
    followed by ``DEBIAS_CG_ITERS`` CG iterations on ||A x - y||^2 + mu ||x - x_TV||^2 with
    mu = ``DEBIAS_WEIGHT`` times the square of the TV weight's noise factor (the noise variance grows as
    1 / photons): the measurements restore the contrast they determine, while the anchor keeps what TV removed
    where they are silent (streaks, aliasing) or noisy (at 1e3 photons a linear factor brought back enough
    noise to cost 1.5 dB; the square costs < 0.2 dB against no debiasing). Measured
    on the benchmark's cases it raised the kept lesion contrast at 30 views from 69 % to 88 % and PSNR by
    0.2-0.7 dB (CT), and changed nothing on MRI (TV there already fits the samples).
  * Iterations: ``SART_ITERS`` passes; ``TV_ITERS`` PDHG iterations (warm-started from FBP / zero-filled, or from
    the prior); ``DC_CG_ITERS`` CG iterations for the final solve without TV, ``TV_WARM_CG_ITERS`` when TV follows
    (the CG then only warm-starts PDHG: on the benchmark's head CT at 30 and 60 views, 5, 10 and 20 warm-start
    iterations ended within 0.03 dB of each other after TV, while each one costs a projection and a backprojection
    of the whole volume); ``GUIDE_CG_ITERS`` per guidance.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from ..catalog import Anatomy, Catalog
from ..errors import InputError
from ..options import DEFAULT_METHOD, METHOD_TASKS, METHODS  # the one list of choices (options.py)

if TYPE_CHECKING:  # the client imports the method list: keep this module free of SimpleITK and torch
    import SimpleITK as sitk

__all__ = ["METHODS", "DEFAULT_METHOD", "METHOD_TASKS", "baseline_method", "check_method", "tv_weight",
           "debias_weight", "PRIOR_WEIGHT", "SART_ITERS", "TV_ITERS", "DC_CG_ITERS", "TV_WARM_CG_ITERS",
           "DEBIAS_CG_ITERS", "GUIDE_CG_ITERS", "GUIDE_TIMES", "choose_anatomy"]


TV_BASE: dict[str, float] = {"sparse-ct": 3e-3, "mri": 3e-3}
PRIOR_WEIGHT = 1e-3
SART_ITERS = 10
TV_ITERS = 60
DC_CG_ITERS = 20
TV_WARM_CG_ITERS = 5
DEBIAS_WEIGHT = 1e-2
DEBIAS_CG_ITERS = 5
GUIDE_CG_ITERS = 3
GUIDE_TIMES = 4  # latent guidance corrections per sampling run (every steps // 4 steps)


def baseline_method(task: str) -> str:
    """The conventional reconstruction of ``task``: what 'degraded' means."""
    return "fbp" if task == "sparse-ct" else "zero-filled"


def check_method(method: str, task: str) -> str:
    """The method's canonical name; InputError if it is unknown or does not apply to ``task``."""
    m = str(method).strip().lower()
    if m not in METHODS:
        raise InputError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if task not in METHOD_TASKS[m]:
        allowed = [k for k, tasks in METHOD_TASKS.items() if task in tasks]
        raise InputError(f"method '{m}' does not apply to task '{task}'; choose one of {', '.join(allowed)}")
    return m


def _noise_factor(photons: Optional[float]) -> float:
    """1 + sqrt(1e5 / photons) for simulated low-dose CT, 1 without noise."""
    return 1.0 + math.sqrt(1e5 / float(photons)) if photons else 1.0


def tv_weight(task: str, views: int = 60, acceleration: float = 4.0, photons: Optional[float] = None) -> float:
    """The TV weight beta of the rule in the module docstring.

    Args:
        task: 'sparse-ct' or 'mri'.
        views: sparse-ct: projection angles (fewer: larger weight).
        acceleration: mri: undersampling factor R (larger: larger weight).
        photons: sparse-ct: incident photons per ray, or None without noise (fewer photons: larger weight).

    Returns:
        beta, relative to the normalised data term of `physics.solvers.tv_pdhg`.
    """
    if task == "sparse-ct":
        return TV_BASE[task] * math.sqrt(60.0 / max(1, int(views))) * _noise_factor(photons)
    return TV_BASE[task] * math.sqrt(max(1.0, float(acceleration)) / 4.0)


def debias_weight(photons: Optional[float] = None) -> float:
    """The anchor weight mu of the debiasing CG after TV (module docstring): more noise, closer to the TV result."""
    return DEBIAS_WEIGHT * _noise_factor(photons) ** 2


# Anatomy from the scan when none is named: in-plane field of view (mm) decides, per modality.
_CT_HEAD_MAX_FOV = 300.0     # a head fits in ~250 mm; chest / abdomen scans use 320-500 mm
_MR_KNEE_MAX_FOV = 200.0     # knee coils: 120-180 mm; brain: 200-260 mm
_MR_BRAIN_MAX_FOV = 300.0    # abdomen: 300-450 mm


def choose_anatomy(catalog: Catalog, modality: str, image: "sitk.Image") -> tuple[Anatomy, str]:
    """(anatomy, why) for a scan of ``modality`` from its in-plane field of view, among the model's anatomies.

    Args:
        catalog: the model's anatomies.
        modality: 'CT' or 'MR'.
        image: the scan; its in-plane field of view is max(X size * X spacing, Y size * Y spacing) in mm.

    Returns:
        The anatomy the field-of-view thresholds above pick (CT: head-neck or chest-abdomen; MR: knee, T1 brain
        or abdomen; the modality's first anatomy when the model lacks that one) and the reason in words.

    Raises:
        InputError: the model has no anatomy of ``modality``.
    """
    choices = catalog.by_modality(modality)
    if not choices:
        raise InputError(f"the model has no {modality} anatomy")
    size, spacing = image.GetSize(), image.GetSpacing()
    fov = max(size[0] * spacing[0], size[1] * spacing[1])
    if modality == "CT":
        wanted = ["ct-head-neck"] if fov <= _CT_HEAD_MAX_FOV else ["ct-chest-abdomen"]
        rule = f"CT, in-plane field of view {fov:.0f} mm {'<=' if fov <= _CT_HEAD_MAX_FOV else '>'} " \
               f"{_CT_HEAD_MAX_FOV:.0f} mm"
    else:
        if fov <= _MR_KNEE_MAX_FOV:
            wanted, bound = ["mr-knee"], f"<= {_MR_KNEE_MAX_FOV:.0f}"
        elif fov <= _MR_BRAIN_MAX_FOV:
            wanted, bound = ["mr-t1-brain", "mr-t2-brain"], f"in ({_MR_KNEE_MAX_FOV:.0f}, {_MR_BRAIN_MAX_FOV:.0f}]"
        else:
            wanted, bound = ["mr-abdomen"], f"> {_MR_BRAIN_MAX_FOV:.0f}"
        rule = f"MR, in-plane field of view {fov:.0f} mm {bound} mm"
    names = {a.name: a for a in choices}
    for name in wanted:
        if name in names:
            return names[name], f"{rule} (pass --anatomy to override)"
    return choices[0], f"{rule}, but the model has no {' / '.join(wanted)}: its first {modality} anatomy " \
                       f"(pass --anatomy to override)"
