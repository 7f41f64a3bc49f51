"""HTTP server: run generation and reconstruction jobs on a GPU machine for remote clients (3D Slicer).

``create_app(ServerConfig(...))`` builds the FastAPI app; ``meddiffusion serve`` runs it with uvicorn. FastAPI
is an optional dependency (``pip install meddiffusion[server]``), so nothing here is imported eagerly.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import MedDiffusionLib.server.security` works without FastAPI installed.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
