"""Anatomy builders for the procedural phantoms: which shapes, where, in which painting order.

Coordinates are anatomical millimetres (lr: +patient left, ap: +posterior, si: +superior) of an adult; the
canvas shrinks them to the field of view. Every size and position is jittered through the canvas random
helpers (``c.j``: relative, ``c.n``: absolute, ``c.u``: uniform), so each seed is a different "subject".
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

from ._phantom_canvas import Canvas, Vec, rotation

BONE = ("cortical", "cancellous", "marrow")


def _bone(c: Canvas, center: Vec, radii: Vec, rot: Vec = (0, 0, 0), shell: float = 2.0, cartilage: float = 0.0,
          inside: Optional[Sequence[str]] = None) -> None:
    """Ellipsoidal bone: optional cartilage cap, cortical shell, cancellous (trabecular) core."""
    _bones(c, [(center, radii, rot, shell, cartilage)], inside=inside)


def _bones(c: Canvas, parts: Sequence[tuple[Any, ...]], inside: Optional[Sequence[str]] = None,
           extra_cortical: Sequence[Callable[[], None]] = ()) -> None:
    """Union of ellipsoidal bone parts (center, radii, rot, shell, cartilage): cartilage caps, then every
    cortical shell, then every cancellous core, so overlapping parts show no internal cortical walls.
    ``extra_cortical`` are callables painting more cortical parts (shafts) before the cores."""
    for ctr, r, rot, _shell, cart in parts:
        if cart:
            c.ellipsoid("cartilage", ctr, np.asarray(r, float) + cart, rot, inside=inside)
    ins = None if inside is None else tuple(inside) + ("cartilage",)
    for ctr, r, rot, _shell, _cart in parts:
        c.ellipsoid("cortical", ctr, r, rot, inside=ins)
    for paint in extra_cortical:
        paint()
    for ctr, r, rot, shell, _cart in parts:
        c.ellipsoid("cancellous", ctr, np.asarray(r, float) - shell, rot, inside=("cortical", "cancellous"))


def _spine(c: Canvas, top: float, levels: list[tuple[float, float, float, float]],
           ap_of: Callable[[float], float], cord_end: float) -> list[tuple[float, float, float]]:
    """Vertebrae from ``top`` downwards; levels = (body height, disc, body radius, canal radius).
    Returns (si centre, ap of body centre, body radius) per vertebra, for ribs."""
    si, out, canal_pts, canal_r = top, [], [], []
    for h, disc, rb, rc in levels:
        h, rb = c.j(h, 0.04), c.j(rb, 0.05)
        mid = si - h / 2
        ap = ap_of(mid)
        c.cylinder("cortical", (0, ap, si - h), (0, ap, si), (rb * 1.2, rb), power=2.3)
        c.cylinder("cancellous", (0, ap, si - h + 1.2), (0, ap, si - 1.2), (rb * 1.2 - 1.6, rb - 1.6), power=2.3)
        c.cylinder("disc", (0, ap, si - h - disc), (0, ap, si - h), (rb * 1.15, rb * 0.95), power=2.3)
        cap = ap + rb + rc + 1.0
        c.cylinder("cortical", (0, cap, mid - h * 0.35), (0, cap, mid + h * 0.35), (rc + 4.5, rc + 4.0))
        c.cylinder("cortical", (0, cap + rc, mid), (0, cap + rc + rb * 1.6, mid - h * 0.7), (2.8, 4.5))
        for side in (-1, 1):
            c.tube("cortical", [(side * (rc + 2), cap - rc * 0.3, mid + 2),
                                (side * (rc + rb * 1.5), cap + 2, mid + 3)], [4.0, 3.0])
        canal_pts.append((0, cap, mid))
        canal_r.append(rc)
        out.append((mid, ap, rb))
        si -= h + disc
    c.tube("csf", canal_pts, canal_r)
    cord = [(p, r) for p, r in zip(canal_pts, canal_r) if p[2] > cord_end]
    if len(cord) > 1:
        c.tube("cord", [p for p, _ in cord], [r * 0.5 for _, r in cord])
    return out


# --------------------------------------------------------------------------- head and neck


def head(c: Canvas, ct: bool) -> None:
    s = c.j(1.0, 0.05)
    rh = (c.n(3), c.n(2), c.n(3))
    S = lambda *v: np.asarray(v, float) * s  # noqa: E731 - local shorthand for "scaled by head size"
    cc, cr = S(c.n(1), c.n(2), 20), S(c.j(70, .04), c.j(88, .04), c.j(70, .04))
    pc, pr = S(0, 40, -35), S(52, 38, 30) * c.j(1.0, 0.04)
    fossae = [(cc, cr, 1), (pc, pr, 2)] + [(S(sd * 40, -5, -20), S(26, 38, 26), 3 + sd) for sd in (-1, 1)]
    # Neck and face soft tissue first; the cranium paints over their upper parts.
    nr = S(c.j(55, .06), c.j(60, .06))
    fc, fr = S(0, -35, -60), S(c.j(56, .05), 58, 55)
    c.layered([("skin", 0.0), ("fat", -2.5 * s)], [("cylinder", dict(p0=S(0, 8, -320), p1=S(0, 18, -60), r0=nr)),
                                                  ("ellipsoid", dict(c=fc, r=fr, rot=rh, lobe=.03))])
    c.cylinder("muscle", S(0, 8, -320), S(0, 18, -60), nr - c.u(6, 12) * s)
    c.ellipsoid("muscle", fc + S(0, 10, -5), fr * 0.78, rh, inside=("fat",))
    c.ellipsoid("skin", S(0, -97, -45), S(9, 12, 22), (-20, 0, 0))  # nose
    c.ellipsoid("air", S(0, -99, -62), S(6, 6, 5), inside=("skin",))  # nostrils opening
    # Scalp and skull: each layer over the union of cranium, posterior and temporal fossae (shells).
    c.layered([(t, dr * s) for t, dr in (("skin", 7.5), ("fat", 5.0), ("cortical", 0.0), ("cancellous", -1.8),
                                         ("cortical", -4.8), ("csf", -6.5))],
              [("ellipsoid", dict(c=ctr, r=rad, rot=rh, lobe=0.02, key=key)) for ctr, rad, key in fossae])
    # Brain: cerebellum (folia), cerebrum and temporal lobes (gyri from the zero-set of a smooth field).
    folia, gyri = c.field("folia", 2.2), c.field("gyri", 4.0)
    c.ellipsoid("gm", pc, pr - 9 * s, rh, lobe=0.02, key=2, inside=("csf",))
    c.ellipsoid("wm", pc + S(0, -4, 2), (pr - 9 * s) * (0.5, 0.5, 0.45), rh, perturb=0.35 * (np.abs(folia) - 0.8),
                inside=("gm",))
    c.replace("gm", "csf", np.abs(folia) < 0.13)
    for ctr, rad, key in fossae[:1] + fossae[2:]:
        c.ellipsoid("gm", ctr, rad - 9 * s, rh, lobe=0.02, key=key, inside=("csf", "gm", "wm"))
    wm_perturb = 0.2 * (np.abs(gyri) - 0.8)
    c.ellipsoid("wm", cc + S(0, 0, -3), (cr - 9 * s) * (0.8, 0.82, 0.76), rh, perturb=wm_perturb, inside=("gm",))
    for sd in (-1, 1):
        c.ellipsoid("wm", S(sd * 40, -5, -18), S(14, 26, 14), rh, perturb=wm_perturb, inside=("gm",))
    c.replace("gm", "csf", np.abs(gyri) < 0.2)
    br = cr - 9 * s
    top = (br[2] + 18 * s) / 2  # interhemispheric fissure: above the corpus callosum, full depth at the poles
    for ctr, rad in ((cc + (0, 0, top), (0.9 * s, br[1] * 1.05, br[2] - top + 2 * s)),
                     (cc + (0, -br[1] * 0.8, 0), (0.9 * s, br[1] * 0.3, br[2] * 0.9)),
                     (cc + (0, br[1] * 0.8, 0), (0.9 * s, br[1] * 0.3, br[2] * 0.9))):
        c.ellipsoid("csf", ctr, rad, rh, inside=("gm", "wm"))
    for off, rad in (((10, 8, -8), (8, 14, 9)), ((13, -16, 2), (5.5, 9, 9)), ((24, -4, -10), (5.5, 15, 11))):
        for sd in (-1, 1):  # thalamus, caudate head, putamen
            c.ellipsoid("deep_gm", cc + S(sd * off[0], off[1], off[2]), S(*rad) * c.j(1, .05), rh,
                        inside=("wm", "gm", "csf"))
    vs = c.u(0.75, 1.4)  # ventricle size varies strongly between subjects (age, atrophy)
    for sd in (-1, 1):  # lateral ventricles: frontal horn, body, atrium, temporal horn
        pts = [cc + S(sd * x * vs ** 0.5, y, z) for x, y, z in ((10, -30, 4), (12, -14, 10), (14, 8, 12),
                                                                (18, 28, 4), (24, 34, -12), (30, 16, -28))]
        c.tube("csf", pts, np.array([6.5, 7, 6.5, 7.5, 5, 3]) * vs * s, inside=("wm", "gm", "deep_gm"))
    c.ellipsoid("csf", cc + S(0, 2, -14), S(1.8 * vs, 13, 8), rh, inside=("wm", "gm", "deep_gm"))
    c.cylinder("wm", cc + S(0, 10, -18), S(0, 24, -75), S(12, 11), S(9, 9),
               inside=("csf", "gm", "wm", "cortical", "cancellous", "muscle", "deep_gm"))  # brainstem
    c.ellipsoid("csf", pc + S(0, -14, 8), S(5, 3.5, 6), inside=("wm", "gm"))  # fourth ventricle
    # Orbits: bony walls, fat, globe (vitreous), lens, optic nerve.
    for sd in (-1, 1):
        oc = S(sd * 31, -64, -25)
        c.ellipsoid("cortical", oc, S(18.8, 25.5, 16.8), (0, 0, sd * 10))
        c.ellipsoid("fat", oc, S(17, 24, 15.5), (0, 0, sd * 10))
        eye = S(sd * 31, -72, -25) + c.n(0.8, 3)
        c.tube("wm", [eye, S(sd * 12, -30, -27)], 2.4 * s, inside=("fat",))
        c.ellipsoid("skin", eye, S(12.5, 12.5, 12.5))
        c.ellipsoid("vitreous", eye, S(11.5, 11.5, 11.5))
        c.ellipsoid("lens", eye + S(0, -9, 0), S(4.5, 2, 4.5))
    # Sinuses and nasal cavity (air with a thin mucosa and bony walls), mastoid air cells.
    for ctr, rad in ((S(0, -84, 14), S(13, 6, 10)), (S(0, -28, -40), S(12, 12, 10)),
                     (S(-26, -55, -55), S(15, 18, 17)), (S(26, -55, -55), S(15, 18, 17)),
                     (S(0, -68, -52), S(10, 24, 18))):
        c.ellipsoid("cortical", ctr, rad + 3 * s)
        c.ellipsoid("soft", ctr, rad + 1.2 * s)
        c.ellipsoid("air", ctr, rad * c.j(1, .08), lobe=0.1)
    c.cylinder("cartilage", S(0, -90, -52), S(0, -45, -52), S(0.9, 14))  # nasal septum
    for sd in (-1, 1):
        mc = S(sd * 55, 22, -42)
        c.ellipsoid("cancellous", mc, S(12, 15, 12))
        for _ in range(6):
            c.ellipsoid("air", mc + c.n(6 * s, 3), S(2.5, 2.5, 2.5) * c.u(0.6, 1.3), inside=("cancellous",))
    # Jaws, teeth, tongue, airway.
    arc = [(np.sin(a) * 44, -22 - np.cos(a) * 52) for a in np.linspace(-1.35, 1.35, 9)]
    c.tube("cortical", [S(x, y, -98) for x, y in arc], 7 * s)
    c.tube("cancellous", [S(x, y, -98) for x, y in arc], 3.5 * s)
    for sd in (-1, 1):
        c.tube("cortical", [S(sd * 44, 0, -98), S(sd * 48, 4, -55)], [7 * s, 5 * s])  # ramus to TMJ
    c.ellipsoid("cortical", S(0, -52, -70), S(20, 24, 3))  # hard palate
    for z, rr in ((-76, 1.0), (-88, 0.93)):
        for a in np.linspace(-1.25, 1.25, 14):
            c.ellipsoid("teeth", S(np.sin(a) * 38 * rr, -22 - np.cos(a) * 46 * rr, z), S(3.5, 3.5, 5))
    c.ellipsoid("muscle", S(0, -38, -84), S(24, 30, 11), inside=("muscle", "fat"))  # tongue
    c.tube("air", [S(0, -40, -55), S(0, -8, -62), S(0, 2, -100), S(0, -10, -140), S(0, -24, -185),
                   S(0, -26, -320)], [8 * s, 7 * s, 7 * s, 6 * s, 8 * s, 9 * s])
    # Neck: cervical spine, vessels, glands, sternocleidomastoids.
    _spine(c, -62 * s, [(13 * s, 4 * s, 9 * s, 7 * s)] * 7 + [(17 * s, 5 * s, 12 * s, 7.5 * s)] * 3,
           lambda z: 22 * s - 0.05 * (z + 60 * s), cord_end=-1e9)
    for sd in (-1, 1):
        c.cylinder("muscle", S(sd * 50, 20, -50), S(sd * 18, -42, -280), S(9, 7), inside=("fat", "muscle"))
        c.tube("blood", [S(sd * 20, -8, -320), S(sd * 22, -4, -150), S(sd * 28, 10, -60)], 3.8 * s)
        c.tube("blood", [S(sd * 30, -2, -320), S(sd * 32, 4, -150), S(sd * 36, 16, -55)], 5.0 * s)
        c.ellipsoid("gland", S(sd * 16, -28, -245), S(8, 10, 22))  # thyroid lobes
        c.ellipsoid("soft", S(sd * 46, 2, -68), S(12, 15, 18), inside=("fat", "muscle"))  # parotids
        c.ellipsoid("soft", S(sd * 32, -40, -108), S(10, 12, 9), inside=("fat", "muscle"))  # submandibular


# --------------------------------------------------------------------------- chest and abdomen


def torso(c: Canvas, ct: bool) -> None:
    rl, ra = c.j(160, .07), c.j(112, .07)
    ft = c.u(8, 30)  # subcutaneous fat thickness
    wl, wa = rl - ft - 12, ra - 0.8 * ft - 12  # inner body-wall radii (ribs lie here)
    body = c.field("body", 40.0) * 0.02
    if ct:  # patient couch under the back (straight: not warped)
        cy = ra + c.u(9, 13)
        c.cylinder("couch", (0, cy, -600), (0, cy, 500), (230, 9), power=8, warp=False)
        c.cylinder("foam", (0, cy, -600), (0, cy, 500), (225, 6), power=8, warp=False)
    belly = c.u(0, 25)
    # Body wall: skin, subcutaneous fat, muscle, then the (fat-filled) body cavity; the belly bulges in front.
    c.layered([("skin", 0.0), ("fat", -2.5), ("muscle", -ft), ("fat", -ft - 12)],
              [("cylinder", dict(p0=(0, 0, -600), p1=(0, 0, 500), r0=(rl, ra), power=2.4, perturb=body)),
               ("ellipsoid", dict(c=(0, -ra * 0.35, -160), r=(rl * 0.85, ra * 0.65 + belly, 170)))])
    for sd in (-1, 1):  # pectoral muscles
        c.ellipsoid("muscle", (sd * 70, -wa - 2, 180), (60, 12, 70), (0, 0, -sd * 15), inside=("fat", "muscle"))

    def ap_of(z: float) -> float:  # thoracic kyphosis and lumbar lordosis
        return wa - 60 + 12 * np.exp(-((z - 150) / 150) ** 2) - 10 * np.exp(-((z + 120) / 100) ** 2)

    levels = [(18 + i * 0.6, 4 + i * 0.2, 15 + i * 0.35, 8.0) for i in range(12)] + [(27, 9, 22, 9.0)] * 5
    verts = _spine(c, 320, levels, ap_of, cord_end=-35)
    for sd in (-1, 1):  # paraspinal (erector spinae) muscles hugging the posterior elements
        for (z0, ap0, rb0), (z1, ap1, rb1) in zip(verts[:-1], verts[1:]):
            grow = 1.0 + 0.5 * (z1 < -40)
            c.cylinder("muscle", (sd * (rb0 * 0.6 + 20), ap0 + rb0 + 28, z0), (sd * (rb1 * 0.6 + 20), ap1 + rb1 + 28, z1),
                       (19 * grow, 17), ext=0.1, inside=("fat", "muscle"))
    # Ribs from the thoracic vertebrae around to the front; upper ribs end in costal cartilage at the sternum.
    for i, (zm, ap, rb) in enumerate(verts[:12]):
        w = 0.55 + 0.45 * min(1.0, i / 5)
        end = -70 if i < 7 else (-40 if i < 9 else (0 if i < 10 else 25))
        drop = c.u(35, 60)
        for sd in (-1, 1):
            ph = np.deg2rad(np.linspace(80, end, 9))
            pts = [(sd * wl * w * np.cos(p), wa * w * np.sin(p) + (1 - w) * 40,
                    zm + 8 - drop * (80 - np.rad2deg(p)) / 150) for p in ph]
            pts = [(sd * (rb + 8), ap + 6, zm + 4)] + pts
            c.tube("cortical", pts, 5.0, inside=("fat", "muscle"))
            c.tube("cancellous", pts, 2.6, inside=("cortical",))
            if i < 9:
                p2 = np.deg2rad(np.linspace(end, -88, 4))
                cart = [(sd * wl * w * np.cos(p), wa * w * np.sin(p) + (1 - w) * 40,
                         pts[-1][2] + 12 * (k / 3) * (1 if i > 6 else 0.3)) for k, p in enumerate(p2)]
                c.tube("cartilage", cart, 4.5, inside=("fat", "muscle"))
    top, bot = verts[1][0], verts[8][0]
    c.cylinder("cortical", (0, -wa + 4, bot), (0, -wa + 2, top), (16, 7))
    c.cylinder("cancellous", (0, -wa + 4, bot + 2), (0, -wa + 2, top - 2), (13, 4.5))
    for sd in (-1, 1):
        c.tube("cortical", [(sd * 14, -wa, top + 10), (sd * 80, -wa + 8, top + 28), (sd * 150, -10, top + 40)], 7)
        _bone(c, (sd * (wl - 15), wa + 5, verts[4][0]), (48, 6, 75), (0, 0, sd * 35), shell=2.5,
              inside=("fat", "muscle"))  # scapula
    # Lungs with vessel and airway trees, then diaphragm domes cutting their bases.
    for sd, zc in ((-1, 150), (1, 145)):
        c.ellipsoid("lung", (sd * wl * 0.5, 5, zc), (wl * c.j(0.49, .04), wa * 0.88, 170), lobe=0.06,
                    inside=("fat",))
    c.ellipsoid("fat", (0, -wa * 0.3, 140), (22, wa * 0.6, 150), inside=("lung",))  # anterior mediastinum
    c.tube("soft", [(0, -12, 340), (0, 0, 240), (0, 12, 150)], 12.0)  # trachea wall
    c.tube("air", [(0, -12, 340), (0, 0, 240), (0, 12, 150)], 9.0)
    for sd in (-1, 1):
        hil = np.array([sd * 42, 8.0, 125.0])
        c.tube("soft", [(0, 12, 150), hil], 8.0)
        c.tube("air", [(0, 12, 150), hil], 6.0)
        for d in ((sd, 0.2, 0.9), (sd, -0.6, 0.3), (sd, -0.3, -0.4), (sd * 0.6, 0.3, -0.9), (sd, 0.8, -0.2),
                  (sd * 0.5, 0.9, 0.6)):
            c.branch_tree("blood", hil, d, c.u(30, 42), 5.0, 5, inside=("lung",))
        c.branch_tree("air", hil, (sd, -0.5, -0.3), 35, 3.5, 3, inside=("lung",))
    # Peripheral vessels: curves where two smooth random fields both cross zero (cheap vessel-like network).
    eps = min(0.15, 0.1 * max(1.0, min(c.vox_mm) / 1.5))  # thicker on coarse grids, capped (~1.5 % of lung)
    c.replace("lung", "blood", (np.abs(c.field("lv1", 7.0)) < eps) & (np.abs(c.field("lv2", 7.0)) < eps))
    for sd, ztop in ((-1, 30.0), (1, 15.0)):
        ctr, rad = (sd * 60, 5, ztop - 110), np.array([wl * 0.78, wa * 1.1, 110])
        c.ellipsoid("fat", ctr, rad, inside=("lung",))
        c.ellipsoid("muscle", ctr, rad + 5, inside=("lung",))
    # Heart (pericardial fat, myocardium, chambers), great vessels, oesophagus.
    hc = np.array([25 + c.n(5), -wa * 0.25 + c.n(4), 60 + c.n(8)])
    rot = (c.n(5), 20 + c.n(5), 35 + c.n(8))  # apex points left, anterior and down
    hr, R = c.j(np.array([52.0, 44, 56]), .07), rotation(rot)
    c.ellipsoid("fat", hc, hr + 6, rot, inside=("lung", "fat"))
    c.ellipsoid("myocardium", hc, hr, rot, inside=("fat", "lung"))
    for off, rad in (((14, 4, -8), (0.42, 0.45, 0.55)), ((-18, -10, 0), (0.38, 0.3, 0.6)),
                     ((0, 26, 24), (0.5, 0.35, 0.32)), ((-30, 5, 14), (0.36, 0.42, 0.4))):
        c.ellipsoid("blood", hc + R @ np.asarray(off, float), hr * rad, rot, inside=("myocardium",))
    vessel_ok = ("fat", "lung", "muscle", "myocardium", "soft", "liver", "bowel")
    asc: list[Vec] = [hc + (-15, 10, 35), (8, -5, 150), (2, 8, 190), (14, 35, 178)]
    desc: list[Vec] = [(18, ap_of(z) - 26, z) for z in (150, 60, -30, -120, -210, -300)]
    c.tube("blood", asc + desc, [15, 15, 13, 12, 12, 11, 11, 10, 10, 10], inside=vessel_ok)
    c.tube("blood", [hc + (-25, -30, 25), (0, -18, 115), (-42, 8, 120)], [13, 12, 9], inside=vessel_ok)
    c.tube("blood", [(0, -18, 115), (42, 8, 120)], [12, 9], inside=vessel_ok)
    c.tube("blood", [(-22, -12, 260), (-20, -12, 100), hc + (-35, 0, 20)], 9.0, inside=vessel_ok)  # SVC
    c.tube("soft", [(4, ap_of(300) - 24, 320), (8, ap_of(60) - 24, 60), (45, -10, -10)], 7.0, inside=vessel_ok)
    # Upper abdomen: liver (with portal/hepatic veins), gallbladder, stomach, spleen, pancreas, kidneys.
    lc = np.array([-55 + c.n(6), -8 + c.n(5), -40 + c.n(8)])
    c.ellipsoid("liver", lc, c.j(np.array([92.0, 86, 72]), .08), (c.n(6), c.n(6), c.n(8)), lobe=0.07,
                inside=("fat",))
    c.ellipsoid("liver", (15, -wa * 0.45, -20), c.j(np.array([55.0, 30, 35]), .1), lobe=0.1, inside=("fat",))
    for d in ((-1, -0.2, 0.3), (-0.6, 0.4, -0.2), (0.5, -0.5, 0.2)):
        c.branch_tree("blood", (-25, 10, -50), d, 35, 6.0, 3, inside=("liver",))
    c.ellipsoid("csf", (-45, -wa * 0.55, -75), c.j(np.array([14.0, 16, 30]), .15), (20, 0, 0),
                inside=("liver", "fat"))
    sc = (55 + c.n(6), -20, -20 + c.n(8))
    c.ellipsoid("soft", sc, (42, 38, 55), (0, 0, -30), inside=("fat",))
    c.ellipsoid("bowel", sc, (38, 34, 51), (0, 0, -30), inside=("soft",))
    c.ellipsoid("air", (sc[0], sc[1] - 28, sc[2] + 10), (30, 14, 25), inside=("bowel",))
    c.ellipsoid("spleen", (88, 45, -25 + c.n(8)), c.j(np.array([26.0, 50, 48]), .12), (0, 0, 20), lobe=.05,
                inside=("fat",))
    c.tube("pancreas", [(-10, 10, -85), (25, 20, -75), (60, 35, -60), (80, 45, -50)], [14, 12, 10, 8],
           inside=("fat",))
    kid = c.field("kidney", 5.0) * 0.25
    for sd in (-1, 1):
        kc = np.array([sd * 70, ap_of(-90) - 8, -95 - (12 if sd < 0 else 0)]) + c.n(3, 3)
        kr, krot = c.j(np.array([27.0, 24, 52]), .07), (-15, sd * 12, -sd * 25)
        c.ellipsoid("kidney", kc, kr, krot, inside=("fat",))
        c.ellipsoid("medulla", kc, kr * (0.62, 0.58, 0.78), krot, perturb=kid, inside=("kidney",))
        hil = kc + (-sd * 14, -4, 0)
        c.ellipsoid("fat", hil, (10, 10, 26), krot, inside=("kidney", "medulla"))
        c.ellipsoid("csf", hil + (-sd * 3, 0, 0), (6, 6, 11), krot, inside=("fat", "kidney", "medulla"))
        c.tube("blood", [hil, (sd * 12, ap_of(-90) - 24, -90)], 4.0, inside=("fat",))
        c.cylinder("muscle", (sd * 28, ap_of(-60) - 10, -60), (sd * 55, ap_of(-400) - 30, -420), (10, 10), (28, 26),
                   inside=("fat",))  # psoas
    c.tube("blood", [(-22, ap_of(-350) - 24, -350), (-22, 20, -60), hc + (-30, 0, -10)], 11.0, inside=vessel_ok)
    # Pelvis: sacrum below L5 and the iliac wings with iliacus muscles.
    zs = verts[-1][0] - 60
    pelvis = [((0, ap_of(zs) + 12, zs), c.j(np.array([44.0, 18, 50]), .05), (-30, 0, 0), 3.0, 0.0)]
    pelvis += [((sd * 95, ap_of(zs) - 5, zs - 10), c.j(np.array([50.0, 12, 55]), .06), (0, 0, -sd * 40), 3.0, 0.0)
               for sd in (-1, 1)]
    _bones(c, pelvis, inside=("fat", "muscle", "bowel", "soft", "disc"))
    for sd in (-1, 1):
        c.ellipsoid("muscle", (sd * 82, ap_of(zs) - 25, zs - 10), (42, 14, 50), (0, 0, -sd * 40), inside=("fat",))
    # Bowel: colon frame with air, small bowel loops below.
    colon = [(-95, 10, -330), (-98, 0, -130), (-80, -wa * 0.5, -120), (0, -wa * 0.7, -150), (80, -wa * 0.5, -110),
             (95, 15, -90), (95, 20, -330)]
    c.tube("soft", colon, 22, inside=("fat",))
    c.tube("bowel", colon, 19, inside=("soft",))
    for i in range(len(colon) - 1):
        if c.rng.random() < 0.6:
            c.tube("air", colon[i:i + 2], c.u(8, 16), inside=("bowel",))
    for _ in range(8):
        p = np.array([c.u(-70, 70), c.u(-wa * 0.6, 10), c.u(-330, -150)])
        pts = [p]
        for _k in range(5):
            p = p + c.n(25, 3)
            pts.append(p)
        c.tube("soft", pts, 12.5, inside=("fat",))
        c.tube("bowel", pts, 10, inside=("soft",))


# --------------------------------------------------------------------------- legs and knee


def _leg(c: Canvas, sd: int, x0: float, ct: bool) -> None:
    """One leg from mid-thigh to ankle, knee joint line at si 0; ``sd`` +1 left / -1 right (lateral side)."""
    rt, rk, rc = c.j(np.array([78.0, 80]), .08), c.j(np.array([50.0, 53]), .05), c.j(np.array([30.0, 32]), .06)
    segs = [((x0 + sd * 25, 0, 480), (x0, 3, 40), rt, rk * 1.02), ((x0, 3, 40), (x0, 5, -60), rk * 1.02, rk * 0.95),
            ((x0, 5, -60), (x0 - sd * 5, 0, -450), rk * 0.95, rc)]
    ft = c.u(6, 18)
    calf_c, calf_r = np.array([x0, 22, -140]), c.j(np.array([44.0, 40, 110]), .06)
    shapes = [("cylinder", dict(p0=p0, p1=p1, r0=r0, r1=r1, ext=0.03)) for p0, p1, r0, r1 in segs]
    c.layered([("skin", 0.0), ("fat", -2.0), ("muscle", -ft)], [shapes[0], shapes[2], ("ellipsoid", dict(c=calf_c, r=calf_r))])
    c.layered([("skin", 0.0), ("fat", -2.0)], [shapes[1]])  # around the knee: tendons and fat, little muscle
    for _ in range(3):  # fascial septa between muscle groups (thigh, calf)
        for z0, z1, ctr in ((470, 60, x0 + sd * 12), (-80, -440, x0)):
            a = c.u(0, np.pi)
            c.cylinder("fat", (ctr, 5, z1), (ctr, 5, z0), (1.0, 90), ref=(np.cos(a), np.sin(a), 0), inside=("muscle",))
    c.replace("muscle", "fat", c.field("marbling", 2.0) > 2.4)
    for gm in (-1, 1):  # gastrocnemius heads behind the knee
        c.ellipsoid("muscle", (x0 + gm * 17, 36, -45), (15, 16, 55), inside=("fat",))
    # Femur: cartilage-capped condyles, metaphysis, bowed shaft with fatty marrow; intercondylar notch.
    fx = x0 + c.n(2)
    shaft = ((fx + sd * 6, 6, 60), (fx + sd * 28, 10, 480))
    condyles = [((fx + gm * 20, 14, 20), c.j(np.array([17.0, 27, 22]), .04), (0, 0, 0), 2.0, 2.5) for gm in (-1, 1)]
    _bones(c, condyles + [((fx, 8, 48), (30, 26, 34), (0, 0, 0), 2.5, 0.0)],
           extra_cortical=[lambda: c.cylinder("cortical", *shaft, (14, 14), (15, 15), bend=(0, -6))])
    c.ellipsoid("fat", (fx, 32, 6), (7, 14, 14), inside=BONE + ("cartilage",))
    c.cylinder("marrow", (fx + sd * 8, 6, 72), shaft[1], (8, 8), (9, 9), bend=(0, -6),
               inside=("cortical", "cancellous"))
    # Patella with cartilage, quadriceps and patellar tendons, fat pad, suprapatellar bursa.
    pc = (fx + sd * 3, -46, 38)
    c.ellipsoid("cartilage", (pc[0], -41, 38), (20, 8, 20))
    _bone(c, pc, c.j(np.array([23.0, 10, 23]), .05), shell=1.8)
    c.cylinder("ligament", (fx, -44, 14), (fx, -30, -62), (13, 3.5))
    c.cylinder("ligament", (fx, -46, 62), (fx, -36, 140), (18, 4))
    c.ellipsoid("fat", (fx, -25, 0), (20, 13, 16), inside=("fat", "muscle", "csf"))
    c.ellipsoid("csf", (fx, -28, 66), (24, 3.5 * c.u(0.5, 1.8), 24), inside=("fat", "muscle"))
    # Tibia (cartilage on the plateau, metaphysis, shaft, tuberosity) and fibula.
    tx = x0 + c.n(2)
    tshaft = ((tx - sd * 2, 4, -50), (tx - sd * 6, 0, -450))
    c.cylinder("cartilage", (tx, 8, -7), (tx, 8, -4.5), (35, 25), power=2.5)
    _bones(c, [((tx, 7, -32), (36, 26, 30), (0, 0, 0), 2.5, 0.0), ((tx, -14, -62), (10, 8, 16), (0, 0, 0), 2.0, 0.0)],
           extra_cortical=[lambda: c.cylinder("cortical", (tx, 8, -28), (tx, 8, -7), (38, 28), (37, 27), power=2.5),
                           lambda: c.cylinder("cortical", *tshaft, (17, 15), (12, 11), power=2.4)])
    c.cylinder("cancellous", (tx, 8, -30), (tx, 8, -9), (35.5, 25.5), (34.5, 24.5), power=2.5,
               inside=("cortical", "cancellous"))
    c.cylinder("marrow", (tx - sd * 2, 4, -75), tshaft[1], (10, 8), (7, 6), power=2.4,
               inside=("cortical", "cancellous"))
    c.ellipsoid("csf", (x0, 8, -3), (40, 28, 1.5 * c.u(0.5, 2)), inside=("fat", "muscle", "ligament"))  # joint
    _bone(c, (tx + sd * 32, 24, -36), (11, 11, 12), shell=2.0)
    c.cylinder("cortical", (tx + sd * 32, 24, -40), (tx + sd * 34, 14, -450), (8, 8), (6, 6))
    c.cylinder("marrow", (tx + sd * 32, 24, -50), (tx + sd * 34, 14, -440), (4, 4), (3, 3))
    # Menisci (C-shaped wedges on each plateau), cruciate ligaments.
    for gm in (-1, 1):
        ang = np.linspace(0.3, 2 * np.pi - 0.3, 10) + (0 if gm > 0 else np.pi)
        pts = [(tx + gm * 20 + 15 * np.cos(a), 8 + 21 * np.sin(a), -4) for a in ang]
        c.tube("ligament", pts, 3.2, inside=("fat", "muscle", "csf", "cartilage", "skin"))
    c.tube("ligament", [(fx + sd * 9, 30, 14), (tx - sd * 2, -4, -5)], 4.0, inside=("fat", "csf", "cartilage"))
    c.tube("ligament", [(fx - sd * 8, 20, 16), (tx, 30, -12)], 4.5, inside=("fat", "csf", "cartilage"))
    # Vessels: femoral -> popliteal -> tibial arteries with the veins alongside; great saphenous vein.
    art = [(x0 - sd * 20, -25, 480), (x0 - sd * 20, -5, 300), (x0 - sd * 10, 25, 150), (x0, 42, 60),
           (x0, 40, -10), (x0, 36, -70), (x0 - sd * 10, 26, -200), (x0 - sd * 15, 20, -450)]
    ok = ("fat", "muscle", "csf", "ligament")
    c.tube("blood", art, 4.0, inside=ok)
    c.tube("blood", [np.add(p, (sd * 5, 7, 0)) for p in art], 5.5, inside=ok)
    c.tube("blood", [(x0, 36, -70), (x0 + sd * 14, -5, -95), (x0 + sd * 12, -12, -450)], 2.5, inside=ok)
    c.tube("blood", [(x0 - sd * (rt[0] - 6), 0, 480), (x0 - sd * (rk[0] - 5), 10, 0), (x0 - sd * 26, 5, -450)],
           3.0, inside=("fat",))


def legs(c: Canvas, ct: bool) -> None:
    if ct:
        cy = c.u(86, 92)
        c.cylinder("couch", (0, cy, -600), (0, cy, 600), (230, 9), power=8, warp=False)
        c.cylinder("foam", (0, cy, -600), (0, cy, 600), (225, 6), power=8, warp=False)
    gap = c.u(78, 95)
    for sd in (-1, 1):
        _leg(c, sd, sd * gap, ct)


def knee(c: Canvas, ct: bool) -> None:
    _leg(c, 1, 0.0, ct)


BUILDERS: dict[str, Callable[[Canvas, bool], None]] = {"head": head, "torso": torso, "legs": legs, "knee": knee}
