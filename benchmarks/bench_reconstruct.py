"""Reconstruction benchmark on real scans and native-resolution phantoms: every method on the scan's own grid.

    pip install -e .[bench]                     # nilearn (MNI152 T1 template) and scikit-image (SART reference)
    apt-get install invesalius-examples         # the head CT (Debian / Ubuntu package)
    flock <lock> python benchmarks/bench_reconstruct.py [--quick] [--timing]

Cases: sparse-view CT at 30 and 60 views of the invesalius head CT (its own 256 x 256 grid at 0.96 mm, the central
32 of its 108 slices) and of a head CT phantom; MRI at R = 4 and 8 with 2D Poisson-disc masks (sigpy) of the MNI152
T1 template (its own 1 mm grid, the central 32 slices) and of a T1 brain phantom; then, model-free only, the same
MRI cases with the CLI's default 1D variable-density line masks. ``--slices N`` / ``--quick`` (8) take thinner
slabs. Each case inserts a 12 mm lesion-like sphere (CT: +100 HU in soft tissue; MR: +50 % of the bright-tissue
level) and reports how much of its contrast (mean inside - mean of a surrounding shell) survives.
Methods: the conventional reconstruction (FBP / zero-filled), SART (10 ordered-subset passes), scikit-image's
``iradon_sart`` with 10 iterations on its own projector (the model-free reference), TV, the diffusion method, the
diffusion method without TV in the final solve (prior + CG only), and the prior alone (no data consistency). PSNR /
SSIM are on the input grid against the input (CT window [-1000, 1000] HU). ``--timing`` (or ``--timing-only``) runs
``meddiffusion reconstruct`` on a 512 x 512 x 64 head CT (the invesalius scan's middle 64 slices resampled to 512^2)
at 30 views with the diffusion method in a fresh process and reports wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import math
import os
import plistlib
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.checkpoints.bundle import load_bundle  # noqa: E402
from MedDiffusionLib.data.phantoms import make_phantom  # noqa: E402
from MedDiffusionLib.pipelines.evaluation import native_scores  # noqa: E402
from MedDiffusionLib.pipelines.reconstruct import ReconstructionPipeline  # noqa: E402

INVESALIUS = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")  # where the Debian package puts it
SLAB = 32
LESION_MM = 12.0


def _slab(arr_zyx: np.ndarray, n: int) -> np.ndarray:
    z0 = max(0, arr_zyx.shape[0] // 2 - n // 2)
    return np.ascontiguousarray(arr_zyx[z0:z0 + n])


def slab_image(img: sitk.Image, n: int) -> sitk.Image:
    out = sitk.GetImageFromArray(_slab(sitk.GetArrayFromImage(img), n))
    out.SetSpacing(img.GetSpacing())
    return out


def invesalius_head(path: Path, slices: int) -> Optional[sitk.Image]:
    """The head CT of the invesalius-examples package: a gzipped tar with main.plist and raw int16 matrix.dat."""
    if not path.is_file():
        return None
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        shape = tuple(int(v) for v in meta["matrix"]["shape"])
        if meta["matrix"]["dtype"] != "int16" or math.prod(shape) * 2 != members["matrix.dat"].size:
            raise SystemExit(f"{path}: unexpected matrix {meta['matrix']}")
        raw = tar.extractfile(members["matrix.dat"]).read()
    arr = np.frombuffer(raw, dtype=np.int16).reshape(shape)  # (z, y, x)
    img = sitk.GetImageFromArray(_slab(arr, slices))
    img.SetSpacing(tuple(float(s) for s in meta["spacing"]))
    return img


def mni_t1(slices: int) -> Optional[sitk.Image]:
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        return None
    nii = load_mni152_template(resolution=1)
    arr = np.asarray(nii.get_fdata(), dtype=np.float32).transpose(2, 1, 0) * 1000.0  # (x, y, z) -> (z, y, x)
    img = sitk.GetImageFromArray(_slab(arr, slices))
    img.SetSpacing(tuple(float(s) for s in nii.header.get_zooms()[:3]))
    return img


def add_lesion(img: sitk.Image, delta: float, centre_frac=(0.5, 0.38, 0.55)
               ) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A 12 mm sphere of +delta at a fixed relative position -> (image, inside mask, shell mask)."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    sx, sy, sz = img.GetSpacing()
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in arr.shape), indexing="ij")
    cz, cy, cx = (f * (n - 1) for f, n in zip(centre_frac, arr.shape))
    r = np.sqrt(((z - cz) * sz) ** 2 + ((y - cy) * sy) ** 2 + ((x - cx) * sx) ** 2)
    sphere = r <= LESION_MM / 2
    arr[sphere] += delta
    out = sitk.GetImageFromArray(arr.astype(sitk.GetArrayViewFromImage(img).dtype))
    out.CopyInformation(img)
    inside = r <= LESION_MM / 2 - 1.5
    shell = (r >= LESION_MM / 2 + 2.0) & (r <= LESION_MM / 2 + 5.0)
    return out, inside, shell


def contrast(img: sitk.Image, inside: np.ndarray, shell: np.ndarray) -> float:
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    return float(a[inside].mean() - a[shell].mean())


def skimage_sart(img: sitk.Image, views: int, iters: int = 10) -> sitk.Image:
    """scikit-image's SART (its own projector, default relaxation 0.15), slice by slice, in HU.

    skimage's geometry reconstructs only the disc inscribed in its square image; a head CT has headrest and skin
    in the corners, so every slice is zero-padded to the square whose inscribed disc holds the whole slice, and the
    result is cropped back (zeroing the corners instead cost ~4 dB at 60 views)."""
    from skimage.transform import iradon_sart, radon

    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    u = np.clip(arr / 1000.0 + 1.0, 0.0, None)
    h, w = u.shape[1:]
    m = int(math.ceil(math.hypot(h, w))) + 2
    top, left = (m - h) // 2, (m - w) // 2
    theta = np.arange(views) * 180.0 / views
    out = np.zeros_like(arr)
    for k in range(u.shape[0]):
        padded = np.zeros((m, m))
        padded[top:top + h, left:left + w] = u[k]
        sino = radon(padded, theta=theta, circle=True)
        x = iradon_sart(sino, theta=theta)
        for _ in range(iters - 1):
            x = iradon_sart(sino, theta=theta, image=x)
        out[k] = (x[top:top + h, left:left + w] - 1.0) * 1000.0
    res = sitk.GetImageFromArray(np.clip(np.rint(out), -32768, 32767).astype(np.int16))
    res.CopyInformation(img)
    return res


def run_case(pipe, name: str, img: sitk.Image, task: str, level: dict, lesion_delta: float,
             with_skimage: bool, steps: Optional[int], model_free_only: bool = False) -> list[dict]:
    modality = "CT" if task == "sparse-ct" else "MR"
    img, inside, shell = add_lesion(img, lesion_delta)
    truth_contrast = contrast(img, inside, shell)
    base = "fbp" if task == "sparse-ct" else "zero-filled"
    runs = [(base, dict(method=base)), ("sart", dict(method="sart"))] if task == "sparse-ct" else \
        [(base, dict(method=base))]
    runs += [("tv", dict(method="tv"))]
    if not model_free_only:
        runs += [("diffusion", dict(method="diffusion")), ("diffusion, no TV", dict(method="diffusion", tv_weight=0.0)),
                 ("prior only", dict(method="diffusion", data_consistency=False))]
    rows = []
    for label, kw in runs:
        t = time.perf_counter()
        r = pipe(img, task=task, seed=0, steps=steps, **level, **kw)
        rows.append(dict(case=name, method=label, psnr=r.psnr, ssim=r.ssim, seconds=time.perf_counter() - t,
                         lesion=100.0 * contrast(r.image, inside, shell) / truth_contrast, anatomy=r.anatomy))
        print(f"  {name:<40} {label:<18} {r.psnr:6.2f} dB  SSIM {r.ssim:.3f}  lesion {rows[-1]['lesion']:5.0f} %  "
              f"{rows[-1]['seconds']:6.1f} s", flush=True)
    if with_skimage:
        t = time.perf_counter()
        ref = skimage_sart(img, level["views"])
        p, s, _ = native_scores(ref, img, modality)
        rows.append(dict(case=name, method="skimage SART x10", psnr=p, ssim=s, seconds=time.perf_counter() - t,
                         lesion=100.0 * contrast(ref, inside, shell) / truth_contrast, anatomy=None))
        print(f"  {name:<40} {'skimage SART x10':<18} {p:6.2f} dB  SSIM {s:.3f}  lesion {rows[-1]['lesion']:5.0f} %",
              flush=True)
    return rows


def head_ct_512(path: Path, slices: int = 64) -> Optional[sitk.Image]:
    """The invesalius head CT (256 x 256 at 0.96 mm) as a 512 x 512 x ``slices`` volume: the middle slices, each
    resampled to 0.48 mm in plane by linear interpolation (real anatomy on a clinical 512^2 matrix)."""
    head = invesalius_head(path, slices)
    if head is None:
        return None
    sx, sy, sz = head.GetSpacing()
    grid = sitk.Image(512, 512, head.GetSize()[2], sitk.sitkInt16)
    grid.SetSpacing((sx / 2, sy / 2, sz))
    grid.SetOrigin((head.GetOrigin()[0] - sx / 4, head.GetOrigin()[1] - sy / 4, head.GetOrigin()[2]))
    return sitk.Resample(head, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)


def timing(model: Optional[str], steps: Optional[int], invesalius: Path) -> None:
    """512 x 512 x 64 head CT at 30 views, diffusion method, end to end through the CLI in a fresh process."""
    import json
    import tempfile

    img = head_ct_512(invesalius)
    if img is None:
        raise SystemExit(f"invesalius head CT not found at {invesalius} (apt-get install invesalius-examples)")
    with tempfile.TemporaryDirectory(prefix="meddiffusion-timing-") as folder:
        src, out, report = (Path(folder) / name for name in ("head512.nrrd", "recon.nrrd", "run.json"))
        sitk.WriteImage(img, str(src), True)
        cmd = [sys.executable, "-m", "MedDiffusionLib", "reconstruct", "--task", "sparse-ct", "--views", "30",
               "--input", str(src), "--out", str(out), "--seed", "0", "--json", str(report), "--quiet"]
        cmd += (["--model", model] if model else []) + (["--steps", str(steps)] if steps else [])
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - t
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child: the CLI
        r = json.loads(report.read_text())
    shown = " ".join(c if not c.startswith(folder) else Path(c).name for c in cmd[1:])
    print(f"TIMING 512x512x64 head CT (invesalius, 0.48 x 0.48 x 1.5 mm), 30 views, diffusion "
          f"({r.get('sampler')} {r.get('steps')} steps, anatomy {r.get('anatomy')}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} after the run: {wall:.0f} s wall, peak RSS {peak_gb:.2f} GB, "
          f"PSNR {r.get('psnr', float('nan')):.2f} dB (FBP {r.get('degraded_psnr', float('nan')):.2f} dB)\n"
          f"  command: python {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model bundle folder (default: the bundled demo model)")
    ap.add_argument("--quick", action="store_true", help="8-slice slabs instead of 32 (a smaller, faster run)")
    ap.add_argument("--slices", type=int, help=f"slab thickness in slices (default {SLAB}; --quick: 8)")
    ap.add_argument("--steps", type=int, help="sampler steps (default: the sampler's default)")
    ap.add_argument("--invesalius", type=Path, default=INVESALIUS, help="the Cranium.inv3 file")
    ap.add_argument("--timing", action="store_true", help="also time the 512x512x64 case in a fresh process")
    ap.add_argument("--timing-only", action="store_true", help="only time the 512x512x64 case (the CLI, end to end)")
    args = ap.parse_args()
    if args.timing_only:
        timing(args.model, args.steps, args.invesalius)
        return
    slices = args.slices or (8 if args.quick else SLAB)
    if not 1 <= slices <= SLAB:
        raise SystemExit(f"--slices must be in [1, {SLAB}], got {slices}")
    pipe = ReconstructionPipeline(load_bundle(args.model), device="auto")
    cases = []
    head = invesalius_head(args.invesalius, slices)
    if head is None:
        print(f"invesalius head CT not found at {args.invesalius}: install it with "
              "`sudo apt-get install invesalius-examples` (Debian / Ubuntu) or pass --invesalius PATH")
    mni = mni_t1(slices)
    if mni is None:
        print("nilearn is not installed: `pip install -e .[bench]` adds the MNI152 T1 template")
    ct_phantom = slab_image(sitk.Cast(make_phantom("ct-head-neck", (256, 256, SLAB), (0.96, 0.96, 1.5), 10_001),
                                      sitk.sitkInt16), slices)
    mr_phantom = slab_image(make_phantom("mr-t1-brain", (232, 232, SLAB), (1.0, 1.0, 1.0), 10_002), slices)
    mr_delta = 0.5 * float(np.percentile(sitk.GetArrayViewFromImage(mr_phantom), 99.5))
    # Real scans first, one level of each task before the second (partial runs still cover both tasks).
    poisson = dict(mask="poisson")
    for level in (0, 1):
        views, accel = (30, 60)[level], (4, 8)[level]
        if head is not None:
            cases.append((f"head CT (invesalius), {views} views", head, "sparse-ct", dict(views=views), 100.0))
        if mni is not None:
            cases.append((f"MNI152 T1, R={accel} Poisson disc", mni, "mri", dict(acceleration=accel, **poisson),
                          500.0))
    for level in (0, 1):
        views, accel = (30, 60)[level], (4, 8)[level]
        cases.append((f"head CT phantom, {views} views", ct_phantom, "sparse-ct", dict(views=views), 100.0))
        cases.append((f"T1 brain phantom, R={accel} Poisson disc", mr_phantom, "mri",
                      dict(acceleration=accel, **poisson), mr_delta))
    # The CLI's default MRI mask (1D variable-density lines, coherent aliasing): model-free rows only, to show
    # how much the mask decides.
    lines = [(f"{name}, R={a} 1D lines", im, "mri", dict(acceleration=a, mask="gaussian"), d)
             for name, im, d in (("MNI152 T1", mni, 500.0), ("T1 brain phantom", mr_phantom, mr_delta))
             if im is not None for a in (4, 8)]

    rows = []
    with_skimage = True
    if with_skimage:
        try:
            import skimage  # noqa: F401
        except ImportError:
            print("scikit-image is not installed: `pip install -e .[bench]` adds the SART reference")
            with_skimage = False
    start = time.perf_counter()
    for name, img, task, level, delta in cases:
        rows += run_case(pipe, name, img, task, level, delta, with_skimage and task == "sparse-ct", args.steps)
    for name, img, task, level, delta in lines:
        rows += run_case(pipe, name, img, task, level, delta, False, args.steps, model_free_only=True)
    print(f"\n{slices}-slice slabs, model {pipe.bundle.name}, {pipe.device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, {time.perf_counter() - start:.0f} s in all\n")
    print("| case | method | PSNR (dB) | SSIM | lesion contrast kept | time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lesion']:.0f} % | "
              f"{r['seconds']:.1f} |")
    print("\nTargets (diffusion method): >= 3 dB above FBP / zero-filling, >= SART (ours and scikit-image's), "
          "lesion contrast within 20 %")
    for name in dict.fromkeys(r["case"] for r in rows):
        got = {r["method"]: r for r in rows if r["case"] == name}
        if "diffusion" not in got:
            base = got["zero-filled"]
            print(f"  {name} (model-free only): TV {got['tv']['psnr'] - base['psnr']:+.2f} dB vs zero-filled, "
                  f"lesion {got['tv']['lesion']:.0f} %")
            continue
        d = got["diffusion"]
        base = got.get("fbp") or got["zero-filled"]
        checks = [f"{d['psnr'] - base['psnr']:+.2f} dB vs {'FBP' if 'fbp' in got else 'zero-filled'} "
                  f"({'ok' if d['psnr'] - base['psnr'] >= 3 else 'MISSED'})"]
        for ref_name in ("sart", "skimage SART x10"):
            if ref_name in got:
                diff = d["psnr"] - got[ref_name]["psnr"]
                checks.append(f"{diff:+.2f} dB vs {ref_name} ({'ok' if diff >= 0 else 'MISSED'})")
        checks.append(f"lesion {d['lesion']:.0f} % ({'ok' if abs(d['lesion'] - 100) <= 20 else 'MISSED'})")
        checks.append(f"prior alone {got['prior only']['psnr']:.2f} dB, TV alone {got['tv']['psnr']:.2f} dB")
        print(f"  {name}: " + "; ".join(checks))
    if args.timing:
        cmd = [sys.executable, __file__, "--timing-only", "--invesalius", str(args.invesalius)] + \
              (["--model", args.model] if args.model else []) + \
              (["--steps", str(args.steps)] if args.steps else [])
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
