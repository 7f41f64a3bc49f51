"""Check that the Python packages the jobs need are installed in versions that work; inside Slicer, offer to
install them after ONE confirmation that lists everything.

Slicer ships numpy and SimpleITK; torch comes from the PyTorch extension (PyTorchUtils picks the CUDA/CPU wheel
for the machine) with our version requirement, the small pure-Python packages from pip. A package that is
present but too old counts as missing. Headless (tests, CLI) nothing is installed: a clear error names what is
missing and how to get it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
from collections.abc import Callable, Sequence

__all__ = [
    "LOCAL_REQUIREMENTS",
    "REMOTE_REQUIREMENTS",
    "TORCH_REQUIREMENT",
    "MissingDependencies",
    "missing_packages",
    "check_dependencies",
    "ensure_dependencies",
    "consent_text",
]

_log = logging.getLogger(__name__)

TORCH_REQUIREMENT = ">=2.2"
# (import name, pip requirement "dist>=version"). Mirrors pyproject's [project] dependencies and the server extra.
LOCAL_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("numpy", "numpy>=1.23"),
    ("SimpleITK", "SimpleITK>=2.2"),
    ("torch", "torch" + TORCH_REQUIREMENT),
    ("einops", "einops>=0.6"),
    ("safetensors", "safetensors>=0.4"),
    ("yaml", "PyYAML>=6.0"),
    ("tqdm", "tqdm>=4.60"),
    ("huggingface_hub", "huggingface_hub>=0.30"),  # downloading the published models (Models section)
    # The local backend runs jobs in a `meddiffusion serve` child process (local_server.py).
    ("fastapi", "fastapi>=0.110"),
    ("uvicorn", "uvicorn>=0.27"),
    ("python_multipart", "python-multipart>=0.0.9"),
)
# The remote client is standard-library HTTP plus numpy.
REMOTE_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("numpy", "numpy>=1.23"),
    ("SimpleITK", "SimpleITK>=2.2"),
)

try:
    from MedDiffusionLib.errors import MedDiffusionError as _Base
except ImportError:  # the check must work even when the library itself cannot be imported
    _Base = RuntimeError  # type: ignore[misc,assignment]


class MissingDependencies(_Base):  # type: ignore[valid-type,misc]
    """Some required packages are missing or too old; the message says which and how to install them."""

    def __init__(self, missing: Sequence[tuple[str, str]], detail: str = "") -> None:
        self.missing = list(missing)
        names = ", ".join(module for module, _ in self.missing)
        pips = " ".join(f'"{req}"' for _, req in self.missing)
        message = f"MedDiffusion needs Python packages that are not installed (or too old): {names}. "
        message += detail or f"Install them with: python -m pip install {pips}"
        super().__init__(message)


def _split(requirement: str) -> tuple[str, str]:
    """'PyYAML>=6.0' -> ('PyYAML', '6.0'); no minimum -> ('name', '')."""
    name, _, minimum = requirement.partition(">=")
    return name.strip(), minimum.strip()


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '0.0.20' -> (0, 0, 20). Pre-release tags are ignored (they sort as equal)."""
    parts = []
    for piece in re.split(r"[.+-]", text):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def installed_version(requirement: str) -> str | None:
    """The installed version of the requirement's distribution, or None."""
    try:
        return importlib.metadata.version(_split(requirement)[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(module: str, requirement: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):  # a broken half-installed package
        return False
    minimum = _split(requirement)[1]
    if not minimum:
        return True
    version = installed_version(requirement)
    if version is None:  # importable without metadata (e.g. a source tree on sys.path): trust it
        return True
    return _version_tuple(version) >= _version_tuple(minimum)


def missing_packages(requirements: Sequence[tuple[str, str]] = LOCAL_REQUIREMENTS) -> list[tuple[str, str]]:
    """The (module, requirement) pairs not importable or older than required (no heavy import: torch is not
    imported, its version comes from the installed metadata)."""
    return [(module, requirement) for module, requirement in requirements if not satisfied(module, requirement)]


def requirements_for(backend: str) -> tuple[tuple[str, str], ...]:
    return REMOTE_REQUIREMENTS if backend == "remote" else LOCAL_REQUIREMENTS


def check_dependencies(backend: str = "local", requirements: Sequence[tuple[str, str]] | None = None) -> None:
    """Raise MissingDependencies naming every missing package (headless use; nothing is installed)."""
    missing = missing_packages(requirements if requirements is not None else requirements_for(backend))
    if missing:
        raise MissingDependencies(missing)


def consent_text(missing: Sequence[tuple[str, str]]) -> str:
    """The single confirmation: every package, the version wanted, what is installed now, and how."""
    lines = []
    for module, requirement in missing:
        have = installed_version(requirement)
        how = "PyTorch extension (picks the CUDA or CPU build)" if module == "torch" else "pip"
        lines.append(f"  \u2022 {requirement}  (installed: {have or 'none'}; via {how})")
    return ("MedDiffusion needs these Python packages in Slicer's Python:\n\n" + "\n".join(lines) +
            "\n\nInstall them now? This downloads packages from the internet (PyTorch is about 2 GB with CUDA) and "
            "can take several minutes. Slicer may need a restart afterwards.")


def _in_slicer_app() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app")


def _install_torch(requirement: str) -> None:
    """Install (or upgrade) torch through the PyTorch extension, without its own confirmation: ours was given."""
    try:
        import PyTorchUtils  # provided by the PyTorch extension (slicer.modules.pytorchutils)
    except ImportError:
        raise MissingDependencies([("torch", requirement)],
                                  "Install the 'PyTorch' extension from the Extensions Manager (it installs the right "
                                  "torch for this computer), restart Slicer and try again.") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled() and installed_version(requirement) is not None:
        logic.uninstallTorch()  # present but too old
    minimum = _split(requirement)[1]
    if logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={minimum}" if minimum else None) is None:
        raise MissingDependencies([("torch", requirement)], "The PyTorch extension could not install torch; see "
                                  "the Python console.")


def ensure_dependencies(backend: str = "local", confirm: Callable[[str], bool] | None = None,
                        requirements: Sequence[tuple[str, str]] | None = None,
                        install_torch: Callable[[str], None] | None = None,
                        pip_install: Callable[[str], None] | None = None) -> None:
    """Make sure the packages for `backend` are installed in working versions. Inside Slicer (or when
    `confirm` is given), ask once, then install: the PyTorch extension for torch, pip for the rest. Headless
    without `confirm`, raise MissingDependencies. Raises if anything is still missing afterwards."""
    reqs = tuple(requirements if requirements is not None else requirements_for(backend))
    missing = missing_packages(reqs)
    if not missing:
        return
    if confirm is None:
        if not _in_slicer_app():
            raise MissingDependencies(missing)
        import slicer

        def confirm(text: str) -> bool:
            return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle="MedDiffusion"))

    if not confirm(consent_text(missing)):
        raise MissingDependencies(missing, "Installation was declined.")
    if install_torch is None:
        install_torch = _install_torch
    if pip_install is None:
        import slicer

        def pip_install(requirements_text: str) -> None:
            with slicer.util.WaitCursor():
                slicer.util.pip_install(requirements_text)

    for module, requirement in missing:
        if module == "torch":
            install_torch(requirement)
    others = [requirement for module, requirement in missing if module != "torch"]
    if others:
        pip_install(" ".join(f'"{r}"' for r in others))  # one pip run; upgrades what is too old
    importlib.invalidate_caches()  # newly installed packages become findable in this session
    still = missing_packages(reqs)
    if still:
        raise MissingDependencies(still, "Automatic installation did not succeed; see the Python console.")
