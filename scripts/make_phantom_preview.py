"""Save a PNG grid of phantom mid-slices: one row per anatomy, columns axial / coronal / sagittal.

Usage: python scripts/make_phantom_preview.py [out.png] [--size N] [--seed S]
Rows follow MedDiffusionLib.data.phantoms.ANATOMIES; CT is shown with a soft-tissue window, MR with
0..99.5th percentile. Superior is up in coronal/sagittal views, anterior up in axial views.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.data.phantoms import ANATOMIES, MODALITY, make_phantom  # noqa: E402
from MedDiffusionLib.io.preview import write_png  # noqa: E402

WINDOWS = {"ct-head-neck": (-160.0, 240.0), "ct-chest-abdomen": (-900.0, 500.0), "ct-legs": (-250.0, 450.0)}


def _square(sl: np.ndarray, row_mm: float, col_mm: float, tile: int) -> np.ndarray:
    """Nearest-neighbour resize to a tile x tile box keeping the physical aspect ratio (centred, padded)."""
    h_mm, w_mm = sl.shape[0] * row_mm, sl.shape[1] * col_mm
    k = tile / max(h_mm, w_mm)
    h, w = max(1, int(round(h_mm * k))), max(1, int(round(w_mm * k)))
    rows = np.minimum((np.arange(h) / h * sl.shape[0]).astype(int), sl.shape[0] - 1)
    cols = np.minimum((np.arange(w) / w * sl.shape[1]).astype(int), sl.shape[1] - 1)
    out = np.zeros((tile, tile), np.float32)
    out[(tile - h) // 2:(tile - h) // 2 + h, (tile - w) // 2:(tile - w) // 2 + w] = sl[rows][:, cols]
    return out


def preview_row(img: sitk.Image, window: tuple[float, float] | None, tile: int = 192) -> np.ndarray:
    vol = sitk.GetArrayFromImage(img)  # (Z, Y, X)
    sx, sy, sz = img.GetSpacing()
    z, y, _x = (n // 2 for n in vol.shape)
    lo, hi = window if window else (0.0, float(np.percentile(vol, 99.5)))
    # Sagittal through the column with the most tissue (the mid-plane falls between the legs).
    x = int(np.argmax((vol > lo + 0.25 * (hi - lo)).sum(axis=(0, 1))))
    views = [_square(vol[z], sy, sx, tile), _square(vol[::-1, y, :], sz, sx, tile),
             _square(vol[::-1, :, x], sz, sy, tile)]
    row = np.concatenate([np.pad(v, ((2, 2), (2, 2)), constant_values=lo) for v in views], axis=1)
    return (np.clip((row - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="phantoms.png")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anatomy", action="append", help="only these anatomies (repeatable)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.anatomy or ANATOMIES:
        t0 = time.perf_counter()
        img = make_phantom(name, (args.size,) * 3, seed=args.seed)
        print(f"{name:18s} {MODALITY[name]} {time.perf_counter() - t0:5.2f} s  spacing {img.GetSpacing()}")
        rows.append(preview_row(img, WINDOWS.get(name)))
    write_png(args.out, np.concatenate(rows, axis=0))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
