"""Checkpoint files and random-stream state: the pieces that make ``--resume`` exact and crash-safe.

Checkpoints hold only tensors and plain containers (``torch.load(weights_only=True)`` reads them) and are
written atomically (temporary file + rename), so a process killed mid-write leaves the previous one intact.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from MedDiffusionLib.io.atomic import atomic_write_path

log = logging.getLogger("meddiffusion.train")
CHECKPOINT_FORMAT = "meddiffusion-train/1"


# --------------------------------------------------------------------------- randomness


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors / plain values (weights_only-loadable)."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint safely (tensors and plain containers only)."""
    from MedDiffusionLib.checkpoints.torch_file import safe_torch_load

    # The project's own reader: torch's weights_only allow-list still lets a pickle allocate (bytearray(n)).
    return safe_torch_load(path)


class CheckpointManager:
    """``step_0001000.pt`` files written atomically; keeps the newest ``keep``; resume picks the newest loadable."""

    pattern = re.compile(r"^step_(\d+)\.pt$")

    def __init__(self, folder: Path, keep: int = 3) -> None:
        self.folder, self.keep = Path(folder), max(1, int(keep))

    def list(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := self.pattern.match(p.name))]
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:07d}.pt"
        with atomic_write_path(path) as tmp:
            torch.save(state, tmp)
        for _, old in self.list()[: -self.keep]:
            with contextlib.suppress(OSError):
                old.unlink()
        return path

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        for _, path in reversed(self.list()):
            try:
                return load_checkpoint(path), path
            except Exception as exc:  # truncated / corrupt file: fall back to the previous one
                log.warning("checkpoint '%s' is unreadable (%s); trying an older one", path, exc)
        return None
