"""Painting engine for the procedural phantoms: a tissue label map, shape primitives, smooth noise fields.

Shapes are given in anatomical millimetres (lr, ap, si); each is evaluated only inside its bounding box on a
coordinate grid that is smoothly warped (so ellipsoids and cylinders do not look machine-made), and paints
its tissue label over what is there (optionally only over chosen tissues). Painting order builds anatomy:
outer structures first, inner ones last.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Optional, Union, overload

import numpy as np
import SimpleITK as sitk

# name, (CT HU, CT contrast delta, T1, T2, PD, texture fine, texture coarse, MR fine, MR coarse).
# MR values are arbitrary units (~0..1000); MR texture amplitudes are fractions of the tissue value.
TISSUES: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("air", (-1000, 0, 0, 0, 0, 0, 0, 0, 0)),
    ("lung", (-860, 0, 15, 15, 15, 30, 40, 0.3, 0.3)),
    ("fat", (-100, 0, 1000, 800, 950, 8, 6, 0.03, 0.04)),
    ("skin", (30, 0, 520, 450, 520, 6, 4, 0.03, 0.03)),
    ("muscle", (50, 10, 430, 280, 350, 6, 6, 0.04, 0.05)),
    ("soft", (40, 25, 520, 480, 480, 6, 6, 0.04, 0.05)),
    ("cortical", (1250, 0, 30, 25, 25, 120, 90, 0.3, 0.2)),
    ("cancellous", (300, 0, 720, 560, 760, 90, 40, 0.1, 0.05)),
    ("marrow", (-30, 0, 900, 700, 850, 15, 10, 0.05, 0.05)),
    ("csf", (8, 0, 160, 1000, 850, 4, 2, 0.03, 0.02)),
    ("gm", (38, 0, 560, 660, 600, 4, 3, 0.03, 0.03)),
    ("wm", (28, 0, 820, 460, 500, 4, 3, 0.03, 0.03)),
    ("deep_gm", (36, 0, 650, 560, 560, 4, 3, 0.03, 0.03)),
    ("blood", (42, 220, 200, 90, 150, 4, 2, 0.1, 0.05)),
    ("myocardium", (45, 70, 500, 330, 400, 5, 3, 0.03, 0.03)),
    ("liver", (58, 50, 600, 330, 450, 6, 5, 0.03, 0.04)),
    ("spleen", (48, 70, 450, 600, 550, 6, 4, 0.03, 0.03)),
    ("kidney", (35, 150, 500, 640, 600, 6, 4, 0.03, 0.03)),
    ("medulla", (30, 80, 400, 760, 620, 4, 3, 0.03, 0.03)),
    ("pancreas", (45, 60, 650, 450, 500, 8, 6, 0.05, 0.05)),
    ("bowel", (22, 10, 300, 720, 500, 12, 10, 0.1, 0.1)),
    ("cartilage", (110, 0, 480, 520, 650, 6, 4, 0.04, 0.03)),
    ("ligament", (90, 0, 60, 45, 60, 6, 4, 0.1, 0.1)),
    ("disc", (85, 0, 450, 720, 560, 6, 4, 0.04, 0.04)),
    ("vitreous", (10, 0, 150, 1000, 850, 3, 2, 0.02, 0.02)),
    ("lens", (90, 0, 520, 300, 400, 3, 2, 0.02, 0.02)),
    ("teeth", (2400, 0, 20, 20, 20, 150, 100, 0.2, 0.2)),
    ("gland", (100, 60, 560, 520, 520, 8, 5, 0.04, 0.04)),
    ("cord", (35, 0, 680, 480, 520, 4, 3, 0.03, 0.03)),
    ("couch", (150, 0, 0, 0, 0, 10, 5, 0, 0)),
    ("foam", (-750, 0, 0, 0, 0, 10, 5, 0, 0)),
)
T = {name: i for i, (name, _row) in enumerate(TISSUES)}  # tissue name -> label value

Vec = Union[Sequence[float], np.ndarray]  # a point or vector in mm (X, Y, Z)
MaskFn = Callable[[float], np.ndarray]


def gaussian(img: sitk.Image, sigma_xyz: Sequence[float]) -> sitk.Image:
    """Gaussian blur, sigma in voxels (X, Y, Z): a recursive (IIR) filter for wide kernels, whose cost does
    not grow with sigma, and a sampled kernel for narrow ones, where the recursive filter is inaccurate."""
    sig = [float(v) for v in sigma_xyz]
    if max(sig) <= 0:
        return img
    if min(sig) >= 1.0:
        spacing = img.GetSpacing()
        return sitk.SmoothingRecursiveGaussian(img, [v * sp for v, sp in zip(sig, spacing)])
    return sitk.DiscreteGaussian(img, variance=[v * v for v in sig], maximumKernelWidth=64, maximumError=0.01,
                                 useImageSpacing=False)


def smooth_noise(shape: Sequence[int], sigma_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise; wide kernels run on a coarser grid, then upsample."""
    shape = tuple(int(n) for n in shape)
    factor = [max(1, int(s / 1.5)) for s in sigma_vox]
    small = tuple(-(-n // f) + 1 for n, f in zip(shape, factor))
    img = gaussian(sitk.GetImageFromArray(rng.standard_normal(small).astype(np.float32)),
                   [s / f for s, f in zip(reversed(sigma_vox), reversed(factor))])
    if any(f > 1 for f in factor):
        img.SetSpacing([float(f) for f in reversed(factor)])
        ref = sitk.Image([int(n) for n in reversed(shape)], sitk.sitkFloat32)
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    arr = sitk.GetArrayFromImage(img)[: shape[0], : shape[1], : shape[2]]
    arr -= arr.mean()
    arr /= max(float(arr.std()), 1e-6)
    return arr.astype(np.float32, copy=False)


def rotation(deg: Vec) -> np.ndarray:
    """Rotation matrix from angles (degrees) about the lr, ap and si axes (applied in that order)."""
    a, b, c = np.deg2rad(np.asarray(deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Canvas:
    """Tissue label volume in SimpleITK array order (Z, Y, X) addressed in anatomical mm (lr, ap, si)."""

    def __init__(self, size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                 layout: Sequence[tuple[int, int]], center: Vec, nominal: Vec, seed: int,
                 warp_mm: float = 3.0) -> None:
        self.seed = int(seed)
        self.rng = np.random.default_rng([self.seed, 1])
        self.shape = (int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0]))
        spacing_zyx = (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
        self.axis = [int(a) for a, _s in layout]
        fov = [n * s for n, s in zip(self.shape, spacing_zyx)]
        # Uniform shrink so the in-plane field of view holds the body part; never enlarged beyond life size.
        fits = [fov[self.axis[k]] / nominal[k] for k in range(3) if self.axis[k] != 0]
        self.scale = min(fits + [1.0])
        self.vox_mm = [s / self.scale for s in spacing_zyx]  # anatomical mm per voxel along Z, Y, X
        self.coord: list[np.ndarray] = []
        for k, (a, sign) in enumerate(layout):
            n = self.shape[a]
            phys = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing_zyx[a]
            self.coord.append((sign * phys / self.scale + center[k]).astype(np.float32))
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        # Smooth warp: coordinate k is displaced by sums of long-wavelength sines of the other coordinates.
        self.disp: list[list[Optional[np.ndarray]]] = [[None] * 3 for _ in range(3)]
        for k in range(3):
            for j in range(3):
                if j != k:
                    amp = warp_mm * self.rng.uniform(0.3, 1.0)
                    wl, ph = self.rng.uniform(120.0, 260.0), self.rng.uniform(0, 2 * np.pi)
                    self.disp[k][j] = (amp * np.sin(2 * np.pi * self.coord[j] / wl + ph)).astype(np.float32)
        self.margin = 2.0 * warp_mm + max(self.vox_mm)
        self._fields: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ random helpers
    @overload
    def j(self, value: float, frac: float = 0.05) -> float: ...
    @overload
    def j(self, value: Vec, frac: float = 0.05) -> np.ndarray: ...

    def j(self, value: float | Vec, frac: float = 0.05) -> float | np.ndarray:
        """``value`` scaled by a random factor 1 + frac * N(0, 1) (clipped to +-2.5 sd), elementwise."""
        v = np.asarray(value, dtype=float)
        f = 1.0 + frac * np.clip(self.rng.standard_normal(v.shape), -2.5, 2.5)
        out = v * f
        return float(out) if out.ndim == 0 else out

    @overload
    def n(self, sd: float, k: None = None) -> float: ...
    @overload
    def n(self, sd: float, k: int) -> np.ndarray: ...

    def n(self, sd: float, k: int | None = None) -> float | np.ndarray:
        """Gaussian offset(s) with standard deviation ``sd`` (a vector of ``k`` when given)."""
        if k is None:
            return float(sd * np.clip(self.rng.standard_normal(), -2.5, 2.5))
        return sd * np.clip(self.rng.standard_normal(k), -2.5, 2.5)

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    # ------------------------------------------------------------------ fields
    def field(self, key: str, sigma_mm: float) -> np.ndarray:
        """Cached smooth noise (unit std); ``sigma_mm`` 0 means about one voxel (fine texture)."""
        if key not in self._fields:
            sig = [0.7 if sigma_mm <= 0 else sigma_mm / v for v in self.vox_mm]
            rng = np.random.default_rng([self.seed, 2, zlib.crc32(key.encode())])
            self._fields[key] = smooth_noise(self.shape, sig, rng)
        return self._fields[key]

    # ------------------------------------------------------------------ geometry
    def _box(self, lo: Vec, hi: Vec) -> tuple[slice, ...] | None:
        sl = [slice(0, 0)] * 3
        for k in range(3):
            c = self.coord[k]
            idx = np.nonzero((c >= lo[k] - self.margin) & (c <= hi[k] + self.margin))[0]
            if idx.size == 0:
                return None
            sl[self.axis[k]] = slice(int(idx[0]), int(idx[-1]) + 1)
        return tuple(sl)

    def _along(self, vec: np.ndarray, axis: int) -> np.ndarray:
        shape = [1, 1, 1]
        shape[axis] = -1
        return vec.reshape(shape)

    def _pts(self, sl: tuple[slice, ...], warp: bool = True) -> list[np.ndarray]:
        """Anatomical coordinates (lr, ap, si) of the voxels in box ``sl``, warped unless ``warp`` is False."""
        out = []
        for k in range(3):
            p = self._along(self.coord[k][sl[self.axis[k]]], self.axis[k])
            for j in range(3):
                d = self.disp[k][j]
                if d is not None and warp:
                    p = p + self._along(d[sl[self.axis[j]]], self.axis[j])
            out.append(p)
        return out

    def _paint(self, sl: tuple[slice, ...], mask: np.ndarray, tissue: str | int,
               inside: Sequence[str] | None = None, allowed: np.ndarray | None = None) -> None:
        view = self.labels[sl]
        mask = np.broadcast_to(mask, view.shape)
        if inside is not None:
            allowed = np.zeros(256, dtype=bool)
            allowed[[T[t] for t in inside]] = True
        if allowed is not None:
            mask = mask & allowed[view]
        view[mask] = T[tissue] if isinstance(tissue, str) else tissue

    def _lobes(self, key: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng if key is None else np.random.default_rng([self.seed, 3, key])
        v = rng.standard_normal((2, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, rng.uniform(1.5, 3.5, 2), rng.uniform(0, 2 * np.pi, 2)

    # ------------------------------------------------------------------ shape geometry
    # Each *_geom returns the bounding box and a function dr -> mask of the shape grown by dr mm, so nested
    # shells reuse one evaluation of coordinates, rotation and surface bumps.

    def _ellipsoid_geom(self, c: Vec, r: Vec, rot: Vec = (0, 0, 0), lobe: float = 0.0, key: int | None = None,
                        perturb: np.ndarray | None = None, pad: float = 0.0
                        ) -> tuple[tuple[slice, ...], MaskFn] | None:
        c, r, R = np.asarray(c, float), np.maximum(np.asarray(r, float), 1e-3), rotation(rot)
        grow = 1.0 + abs(lobe) + (0.0 if perturb is None else 0.6)
        half = np.sqrt((((R * (r[None, :] + pad)) ** 2).sum(1))) * grow
        sl = self._box(c - half, c + half)
        if sl is None:
            return None
        P = self._pts(sl)
        d = [P[k] - np.float32(c[k]) for k in range(3)]
        q = [sum(d[k] * np.float32(R[k, i]) for k in range(3)) for i in range(3)]  # local mm offsets
        lim = np.float32(1.0)
        if lobe:
            v, kk, ph = self._lobes(key)
            qn = [q[i] / np.float32(r[i]) for i in range(3)]
            norm = np.sqrt(qn[0] * qn[0] + qn[1] * qn[1] + qn[2] * qn[2]) + np.float32(1e-6)
            u1 = (qn[0] * v[0, 0] + qn[1] * v[0, 1] + qn[2] * v[0, 2]) / norm
            u2 = (qn[0] * v[1, 0] + qn[1] * v[1, 1] + qn[2] * v[1, 2]) / norm
            lim = lim + np.float32(lobe) * np.sin(kk[0] * u1 + ph[0]) * np.cos(kk[1] * u2 + ph[1])
        if perturb is not None:
            lim = lim + perturb[sl]
        lim2 = np.maximum(lim, 0) ** 2

        def mask(dr: float) -> np.ndarray:
            inv = [np.float32(1.0 / max(r[i] + dr, 1e-3)) for i in range(3)]
            return (q[0] * inv[0]) ** 2 + (q[1] * inv[1]) ** 2 + (q[2] * inv[2]) ** 2 < lim2

        return sl, mask

    def _cylinder_geom(self, p0: Vec, p1: Vec, r0: Vec, r1: Vec | None = None, ref: Vec = (1.0, 0.0, 0.0),
                       bend: Vec = (0.0, 0.0), power: float = 2.0, ext: float = 0.0,
                       perturb: np.ndarray | None = None, warp: bool = True, pad: float = 0.0
                       ) -> tuple[tuple[slice, ...], MaskFn] | None:
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        r0 = np.asarray(r0, float)
        r1 = r0 if r1 is None else np.asarray(r1, float)
        w = p1 - p0
        length = float(np.linalg.norm(w))
        if length < 1e-6:
            return None
        w /= length
        e1 = np.asarray(ref, float) - np.dot(ref, w) * w
        if np.linalg.norm(e1) < 1e-6:
            e1 = np.array([0.0, 1.0, 0.0]) - w[1] * w
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(w, e1)
        rad = float((max(r0.max(), r1.max()) + pad) * (1.4 if perturb is not None else 1.0) + np.abs(bend).max())
        sl = self._box(np.minimum(p0, p1) - rad - ext * length, np.maximum(p0, p1) + rad + ext * length)
        if sl is None:
            return None
        P = self._pts(sl, warp)
        d = [P[k] - np.float32(p0[k]) for k in range(3)]
        s = sum(d[k] * np.float32(w[k]) for k in range(3)) / np.float32(length)
        a = sum(d[k] * np.float32(e1[k]) for k in range(3))
        b = sum(d[k] * np.float32(e2[k]) for k in range(3))
        if bend[0] or bend[1]:
            bow = 4.0 * s * (1.0 - s)
            a, b = a - np.float32(bend[0]) * bow, b - np.float32(bend[1]) * bow
        sc = np.clip(s, 0.0, 1.0)
        ra = np.float32(r0[0]) + np.float32(r1[0] - r0[0]) * sc
        rb = np.float32(r0[1]) + np.float32(r1[1] - r0[1]) * sc
        lim = np.float32(1.0) if perturb is None else np.maximum(1.0 + perturb[sl], 0.0) ** power
        within = (s >= -ext) & (s <= 1.0 + ext)
        a, b = np.abs(a), np.abs(b)

        def mask(dr: float) -> np.ndarray:
            ga, gb = a / np.maximum(ra + np.float32(dr), 1e-3), b / np.maximum(rb + np.float32(dr), 1e-3)
            g = ga * ga + gb * gb if power == 2.0 else ga ** power + gb ** power
            return within & (g < lim)

        return sl, mask

    # ------------------------------------------------------------------ primitives
    def ellipsoid(self, tissue: str, c: Vec, r: Vec, rot: Vec = (0, 0, 0), lobe: float = 0.0,
                  key: int | None = None, perturb: np.ndarray | None = None,
                  inside: Sequence[str] | None = None) -> None:
        """Ellipsoid with semi-axes ``r`` rotated by ``rot`` degrees (about lr, ap, si); ``lobe`` bumps the
        surface (same ``key``, same bumps); ``perturb`` is a full-volume relative radius field."""
        geom = self._ellipsoid_geom(c, r, rot, lobe, key, perturb)
        if geom is not None:
            self._paint(geom[0], geom[1](0.0), tissue, inside)

    def cylinder(self, tissue: str, p0: Vec, p1: Vec, r0: Vec, r1: Vec | None = None,
                 ref: Vec = (1.0, 0.0, 0.0), bend: Vec = (0.0, 0.0), power: float = 2.0, ext: float = 0.0,
                 inside: Sequence[str] | None = None, perturb: np.ndarray | None = None,
                 warp: bool = True) -> None:
        """Elliptic (super-elliptic for ``power`` > 2) cylinder from p0 to p1 with cross-section radii ``r0``
        (along ``ref`` and the third axis) tapering to ``r1``, bowed by ``bend`` mm at mid-length.
        ``warp`` False keeps man-made objects (the CT couch) straight."""
        geom = self._cylinder_geom(p0, p1, r0, r1, ref, bend, power, ext, perturb, warp)
        if geom is not None:
            self._paint(geom[0], geom[1](0.0), tissue, inside)

    def layered(self, layers: Sequence[tuple[str, float]], shapes: Sequence[tuple[str, dict]]) -> None:
        """Nested shells over the union of ``shapes``: layers = (tissue, dr mm) from outside in; shapes =
        ("ellipsoid" | "cylinder", keyword arguments). Layer i of one shape may cover outer layers of the
        others but never their inner ones, so overlapping shapes merge into one smooth layered body."""
        tmp0 = 255 - len(layers)  # temporary labels above every tissue id
        pad = max(0.0, max(dr for _t, dr in layers))
        for kind, kwargs in shapes:
            geom = (self._ellipsoid_geom if kind == "ellipsoid" else self._cylinder_geom)(**kwargs, pad=pad)
            if geom is None:
                continue
            sl, mask = geom
            for i, (_tissue, dr) in enumerate(layers):
                allowed = np.ones(256, dtype=bool)
                allowed[tmp0 + i:] = False
                self._paint(sl, mask(dr), tmp0 + i, allowed=allowed)
        remap = np.arange(256, dtype=np.uint8)
        for i, (tissue, _dr) in enumerate(layers):
            remap[tmp0 + i] = T[tissue]
        self.labels[...] = remap[self.labels]

    def tube(self, tissue: str, pts: Sequence[Vec], radii: Vec | float,
             inside: Sequence[str] | None = None) -> None:
        """Round tube (chain of capsules) through ``pts`` with radius per point (vessels, airways, ribs)."""
        pts_arr = np.asarray(pts, float)
        rr = np.broadcast_to(np.asarray(radii, float), (len(pts_arr),))
        for i in range(len(pts_arr) - 1):
            a, b, ra, rb = pts_arr[i], pts_arr[i + 1], rr[i], rr[i + 1]
            seg = b - a
            L2 = float(seg @ seg)
            if L2 < 1e-9:
                continue
            rmax = max(ra, rb)
            sl = self._box(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
            if sl is None:
                continue
            P = self._pts(sl)
            d = [P[k] - np.float32(a[k]) for k in range(3)]
            t = np.clip(sum(d[k] * np.float32(seg[k]) for k in range(3)) / np.float32(L2), 0.0, 1.0)
            dist2 = sum((d[k] - t * np.float32(seg[k])) ** 2 for k in range(3))
            r = np.float32(ra) + np.float32(rb - ra) * t
            self._paint(sl, dist2 < r * r, tissue, inside)

    def replace(self, old: str, new: str, mask: np.ndarray) -> None:
        """Relabel voxels of tissue ``old`` where the full-volume ``mask`` holds (texture-driven detail)."""
        self.labels[(self.labels == T[old]) & mask] = T[new]

    def branch_tree(self, tissue: str, start: Vec, direction: Vec, length: float, radius: float,
                    depth: int, inside: Sequence[str] | None = None, spread: float = 0.6) -> None:
        """Randomly branching vessel/airway tree (each level: 2 children, shorter and thinner)."""
        stack = [(np.asarray(start, float), np.asarray(direction, float), length, radius, depth)]
        while stack:
            p, dvec, ln, rad, dep = stack.pop()
            dvec = dvec / np.linalg.norm(dvec)
            end = p + dvec * ln + self.rng.normal(0, 0.1 * ln, 3)
            self.tube(tissue, [p, end], [rad, rad * 0.8], inside=inside)
            if dep > 0:
                for _ in range(2):
                    nd = dvec + self.rng.normal(0, spread, 3)
                    # Thinnest branches stay about half a voxel wide so they survive coarse grids.
                    floor = max(0.6, 0.3 * min(self.vox_mm))
                    stack.append((end, nd, ln * self.u(0.6, 0.85), max(rad * 0.7, floor), dep - 1))
