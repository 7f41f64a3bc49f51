"""Check that the Python packages MedDiffusionLib needs are importable; inside Slicer, offer to install them.

Slicer ships numpy and SimpleITK; torch comes from the PyTorch extension (it picks the right CUDA/CPU wheel for
the machine), the small pure-Python packages from pip. Headless (tests, CLI) nothing is installed: a clear error
names what is missing and how to get it.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence

__all__ = [
    "LOCAL_REQUIREMENTS",
    "REMOTE_REQUIREMENTS",
    "MissingDependencies",
    "missing_packages",
    "check_dependencies",
    "ensure_dependencies",
]

_log = logging.getLogger(__name__)

# (import name, pip requirement). Mirrors pyproject's [project] dependencies.
LOCAL_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("numpy", "numpy>=1.23"),
    ("SimpleITK", "SimpleITK>=2.2"),
    ("torch", "torch>=2.2"),
    ("einops", "einops>=0.6"),
    ("safetensors", "safetensors>=0.4"),
    ("yaml", "PyYAML>=6.0"),
    ("tqdm", "tqdm>=4.60"),
)
# The remote client is standard-library HTTP; it only needs to read and write images.
REMOTE_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("numpy", "numpy>=1.23"),
    ("SimpleITK", "SimpleITK>=2.2"),
)

try:
    from MedDiffusionLib.errors import MedDiffusionError as _Base
except ImportError:  # the check must work even when the library itself cannot be imported
    _Base = RuntimeError  # type: ignore[misc,assignment]


class MissingDependencies(_Base):  # type: ignore[valid-type,misc]
    """Some required packages cannot be imported; the message says which and how to install them."""

    def __init__(self, missing: Sequence[tuple[str, str]], detail: str = "") -> None:
        self.missing = list(missing)
        names = ", ".join(module for module, _ in self.missing)
        pips = " ".join(f'"{req}"' for _, req in self.missing)
        message = f"MedDiffusion needs Python packages that are not installed: {names}. "
        message += detail or f"Install them with: python -m pip install {pips}"
        super().__init__(message)


def requirements_for(backend: str) -> tuple[tuple[str, str], ...]:
    return REMOTE_REQUIREMENTS if backend == "remote" else LOCAL_REQUIREMENTS


def missing_packages(requirements: Sequence[tuple[str, str]] = LOCAL_REQUIREMENTS) -> list[tuple[str, str]]:
    """The (module, requirement) pairs whose module cannot be found. Uses find_spec: no heavy import (torch)."""
    missing = []
    for module, requirement in requirements:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken half-installed package
            found = False
        if not found:
            missing.append((module, requirement))
    return missing


def check_dependencies(backend: str = "local",
                       requirements: Sequence[tuple[str, str]] | None = None) -> None:
    """Raise MissingDependencies naming every missing package (headless use; nothing is installed)."""
    missing = missing_packages(requirements if requirements is not None else requirements_for(backend))
    if missing:
        raise MissingDependencies(missing)


def _in_slicer_app() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app")


def _install_torch_with_pytorch_extension() -> bool:
    """Install torch through the PyTorch extension (it knows the CUDA version). False if unavailable/declined."""
    try:
        import PyTorchUtils  # provided by the PyTorch extension (slicer.modules.pytorchutils)
    except ImportError:
        return False
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        return True
    # Shows its own confirmation dialog; returns None when declined or failed.
    return torch_logic.installTorch(askConfirmation=True) is not None


def ensure_dependencies(backend: str = "local",
                        confirm: Callable[[str], bool] | None = None,
                        requirements: Sequence[tuple[str, str]] | None = None) -> None:
    """Make sure the packages for `backend` import. Inside Slicer, ask, then install (PyTorch extension for
    torch, pip for the rest); headless, raise MissingDependencies. Raises if anything is still missing.
    """
    reqs = tuple(requirements if requirements is not None else requirements_for(backend))
    missing = missing_packages(reqs)
    if not missing:
        return
    if not _in_slicer_app():
        raise MissingDependencies(missing)

    import slicer

    if confirm is None:
        def confirm(text: str) -> bool:
            return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle="MedDiffusion"))

    names = ", ".join(module for module, _ in missing)
    if not confirm(f"MedDiffusion needs these Python packages: {names}.\n\n"
                   "Install them now? This downloads packages from the internet and can take several minutes."):
        raise MissingDependencies(missing, "Installation was declined.")

    if any(module == "torch" for module, _ in missing):
        if not _install_torch_with_pytorch_extension():
            raise MissingDependencies(
                [m for m in missing if m[0] == "torch"],
                "Install the 'PyTorch' extension from the Extensions Manager (it installs the right torch for "
                "this computer), restart Slicer and try again.")
    others = [requirement for module, requirement in missing if module != "torch"]
    if others:
        with slicer.util.WaitCursor():
            slicer.util.pip_install(" ".join(f'"{r}"' for r in others))
    importlib.invalidate_caches()  # newly installed packages become findable in this session
    still = missing_packages(reqs)
    if still:
        raise MissingDependencies(still, "Automatic installation did not succeed; see the Python console.")
