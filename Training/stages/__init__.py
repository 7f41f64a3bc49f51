"""Training stages: each module here with ``DESCRIPTION`` and ``run(cfg, env, resume)`` is a subcommand.

Adding a stage = adding a file (e.g. ``controlnet.py``); ``train.py`` discovers it by name. Optional hooks:
``add_arguments(parser)`` for stage-specific flags and ``apply_arguments(cfg, args)`` to fold them into cfg.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def stage_names() -> list[str]:
    """Modules of this package that are not private helpers (no import needed, so one broken stage can't
    take the others down)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_stage(name: str) -> ModuleType:
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "run", None)):
        raise AttributeError(f"training stage '{name}' has no run(cfg, env, resume) function")
    return module
