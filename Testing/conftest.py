"""Shared test fixtures: where the authors' reference outputs live, small deterministic settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def find_reference_dir() -> Path | None:
    """The authors' fixtures: $MEDDIFFUSION_REFERENCE, else ../shared/reference beside the repository."""
    env = os.environ.get("MEDDIFFUSION_REFERENCE")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "reference"]:
        if (cand / "fixtures").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    ref = find_reference_dir()
    if ref is None:
        pytest.skip("authors' reference fixtures not found (set MEDDIFFUSION_REFERENCE)")
    return ref


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
