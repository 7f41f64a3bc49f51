"""`meddiffusion reconstruct` (sparse-view CT / accelerated MRI) and `meddiffusion evaluate` (method comparison).

Both work on the scan's own grid; the method list, defaults and rules live in ``pipelines.recon_settings``."""
from __future__ import annotations

import argparse
import json
import warnings
from typing import TYPE_CHECKING, Any

from ..options import METHODS, TASKS, ReconstructOptions
from .common import TqdmProgress, add_model_args, add_option, load_bundle_from_args

if TYPE_CHECKING:  # for annotations only: the commands import the pipeline lazily
    import SimpleITK as sitk

    from ..pipelines.reconstruct import ReconstructionPipeline
    from ..results import ReconstructionResult

# Evaluation phantoms use seeds from here on; training phantom seeds stay below it (see Training/configs).
EVAL_SEED_BASE = 10_000


def _add_physics_args(p: argparse.ArgumentParser) -> None:
    add_option(p, ReconstructOptions, "task", required=True)
    add_option(p, ReconstructOptions, "anatomy")
    add_option(p, ReconstructOptions, "views")
    add_option(p, ReconstructOptions, "noise_photons", metavar="N")
    for name in ("acceleration", "mask", "sampler", "steps", "dc_every"):
        add_option(p, ReconstructOptions, name)
    add_option(p, ReconstructOptions, "tv_weight", metavar="BETA")
    p.add_argument("--decode-budget-gb", type=float, help="memory budget of one decoding tile")
    p.add_argument("--controlnet", metavar="PATH", help="use this ControlNet file for --task (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Register `meddiffusion reconstruct` and `meddiffusion evaluate`."""
    p = sub.add_parser("reconstruct", help="reconstruct sparse-view CT or undersampled MRI",
                       description="Reconstruct a volume on its own grid. By default the input is a fully sampled "
                       "volume and the measurements are simulated from it (for evaluation and demos); with "
                       "--already-degraded the input is the FBP / zero-filled image itself.")
    p.add_argument("--input", required=True, help="input volume (.nrrd, .nii.gz, .nii, .mha or a DICOM folder)")
    p.add_argument("--out", required=True, help="reconstruction output (.nrrd, .nii.gz, .nii, .mha)")
    add_option(p, ReconstructOptions, "method")
    p.add_argument("--degraded-out", metavar="PATH", help="also write the FBP / zero-filled volume")
    p.add_argument("--already-degraded", action="store_true",
                   help="the input is an FBP / zero-filled image: nothing is simulated")
    p.add_argument("--no-data-consistency", action="store_true",
                   help="diffusion: the prior only (brought to the native grid), no data consistency")
    add_option(p, ReconstructOptions, "seed")
    p.add_argument("--json", metavar="PATH", help="also write the run's settings and metrics as JSON")
    _add_physics_args(p)
    p.set_defaults(func=run_reconstruct)

    e = sub.add_parser("evaluate", help="PSNR/SSIM of every reconstruction method on volumes or phantoms",
                       description="Simulate the acquisition from fully sampled volumes at their own resolution "
                       "(--input, any size) or from held-out synthetic phantoms (seeds from 10000 on, never used "
                       "for training; --size / --spacing) and print PSNR/SSIM (mean +- std) of each method "
                       "against the input on its grid (CT on the window [-1000, 1000] HU).")
    e.add_argument("--input", nargs="+", metavar="PATH", help="fully sampled volumes to evaluate on")
    e.add_argument("--methods", nargs="+", choices=METHODS, help="methods to compare (default: all of the task's)")
    e.add_argument("--count", type=int, default=3, help="number of phantoms without --input (default 3)")
    e.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=(96, 96, 16),
                   help="phantom size in voxels (default 96 96 16)")
    e.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="phantom spacing in mm (default: a 240 mm field of view, 3 mm slices)")
    e.add_argument("--seed", type=int, default=0, help="first sampling seed; volume i uses seed + i (default 0)")
    e.add_argument("--json", metavar="PATH", help="also write the per-method metrics as JSON")
    _add_physics_args(e)
    e.set_defaults(func=run_evaluate)


def _pipeline(args: argparse.Namespace) -> ReconstructionPipeline:
    from ..checkpoints.any_format import load_any_controlnet
    from ..pipelines.reconstruct import ReconstructionPipeline

    bundle = load_bundle_from_args(args)
    if args.controlnet:
        task = str(args.task).strip().lower()
        bundle.controlnets = {**bundle.controlnets, task: load_any_controlnet(args.controlnet)}
    return ReconstructionPipeline(bundle, args.device, decode_budget_gb=args.decode_budget_gb)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before the model loads (the pipeline checks again against the model)."""
    opts = _options(args)
    if hasattr(args, "method"):  # reconstruct; evaluate checks each of --methods against the task itself
        opts["method"] = args.method
    args.task = ReconstructOptions(**opts).validate().task


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(task=args.task, anatomy=args.anatomy, views=args.views, acceleration=args.acceleration,
                mask=args.mask, noise_photons=args.noise_photons, sampler=args.sampler, steps=args.steps,
                tv_weight=args.tv_weight, dc_every=args.dc_every)


def _run(pipe: ReconstructionPipeline, image: sitk.Image, bar: TqdmProgress, **kw: Any) -> ReconstructionResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pipe(image, progress=bar, **kw)
        finally:
            bar.close()
    for w in caught:
        print(f"meddiffusion: warning: {w.message}")
    return result


def _metrics_line(r: ReconstructionResult) -> str:
    parts = []
    if r.psnr is not None and r.metric_range is not None:  # set together by the pipeline
        lo, hi = r.metric_range
        window = "CT window [-1000, 1000] HU" if r.task == "sparse-ct" else f"range [{lo:g}, {hi:g}]"
        parts.append(f"on the input grid, {window}: PSNR {r.psnr:.2f} dB / SSIM {r.ssim:.3f} "
                     f"(degraded {r.degraded_psnr:.2f} dB / {r.degraded_ssim:.3f})")
    if r.residual is not None:
        parts.append(f"measurement residual {r.residual:.4f} (degraded {r.degraded_residual:.4f})")
    return "; ".join(parts)


def run_reconstruct(args: argparse.Namespace) -> int:
    """`meddiffusion reconstruct`: one volume on its own grid, written with its degraded input if asked."""
    from ..io.atomic import atomic_write_text, check_writable
    from ..io.volumes import read_volume, write_volume

    _check_args(args)
    outputs = [args.out] + [p for p in (args.degraded_out, args.json) if p]
    for path in outputs:
        check_writable(path)
    image = read_volume(args.input)  # InputError naming the file if it cannot be read
    pipe = _pipeline(args)
    result = _run(pipe, image, TqdmProgress(not args.quiet), method=args.method, simulate=not args.already_degraded,
                  seed=args.seed, data_consistency=not args.no_data_consistency, **_options(args))
    write_volume(result.image, args.out)
    if args.degraded_out and result.degraded is not None:
        write_volume(result.degraded, args.degraded_out)
    if args.json:
        atomic_write_text(args.json, json.dumps(result.info(), indent=1))
    if result.anatomy:
        print(f"anatomy {result.anatomy}: {result.anatomy_reason}")
    what = f"{result.views} views" if result.task == "sparse-ct" else f"R={result.acceleration:g} {result.mask}"
    sampling = f", {result.sampler} {result.steps} steps" if result.method == "diffusion" else ""
    print(f"wrote {args.out}: {result.task} ({what}), method {result.method}, seed {result.seed}{sampling}, "
          f"data consistency {'on' if result.data_consistency else 'off'}, {result.elapsed_s:.1f} s")
    line = _metrics_line(result)
    if line:
        print(line)
    if args.degraded_out:
        print(f"wrote {args.degraded_out}")
    return 0


def _eval_images(args: argparse.Namespace) -> list:
    from ..data.phantoms import ANATOMIES, make_phantom
    from ..errors import InputError
    from ..io.volumes import read_volume

    if args.input:
        return [read_volume(p) for p in args.input]
    if args.count < 1:
        raise InputError(f"--count must be at least 1, got {args.count}")
    modality = TASKS[args.task]
    anatomy = args.anatomy or ("ct-head-neck" if modality == "CT" else "mr-t1-brain")
    if anatomy not in ANATOMIES or not anatomy.startswith(modality.lower()):
        raise InputError(f"no {modality} phantom named '{anatomy}'; phantoms exist for "
                         f"{', '.join(a for a in ANATOMIES if a.startswith(modality.lower()))}")
    size = tuple(int(v) for v in args.size)
    if min(size) < 1:
        raise InputError(f"--size must be positive, got {size}")
    spacing = tuple(args.spacing) if args.spacing else (240.0 / size[0], 240.0 / size[1], 3.0)
    return [make_phantom(anatomy, size, spacing, EVAL_SEED_BASE + args.seed + i) for i in range(args.count)]


def run_evaluate(args: argparse.Namespace) -> int:
    """`meddiffusion evaluate`: every method on phantoms or given volumes; prints (and saves) the table."""
    from ..errors import InputError
    from ..io.atomic import atomic_write_text, check_writable
    from ..pipelines.evaluation import compare_methods, format_table

    _check_args(args)
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.json:
        check_writable(args.json)
    images = _eval_images(args)
    pipe = _pipeline(args)
    opts = _options(args)
    task = opts.pop("task")
    seeds = iter(range(args.seed, args.seed + 10**6))
    anatomies: list[str] = []  # the prior's anatomy per volume (diffusion runs only)

    def run(image: sitk.Image, **kw: Any) -> ReconstructionResult:
        result = _run(pipe, image, TqdmProgress(not args.quiet), task=task, seed=next(seeds), **opts, **kw)
        if result.anatomy is not None:
            if result.anatomy not in anatomies:  # the choice and its reason, as `reconstruct` prints them
                print(f"anatomy {result.anatomy}: {result.anatomy_reason}")
            anatomies.append(result.anatomy)
        return result

    scores = compare_methods(run, images, task, args.methods, log=None if args.quiet else print)
    what = f"{args.views} views" if task == "sparse-ct" else f"R={args.acceleration:g}, {args.mask} mask"
    window = "CT window [-1000, 1000] HU" if task == "sparse-ct" else "the input's range"
    print(f"\n{task} ({what}), {len(images)} volume(s) of {'x'.join(map(str, images[0].GetSize()))} voxels, "
          f"scored on the input grid ({window}); model {pipe.bundle.name}")
    print(format_table(scores))
    if args.json:
        report = {"task": task, "volumes": len(images), "seed": args.seed, "model": pipe.bundle.name,
                  "settings": opts, "anatomies": anatomies, "methods": {m: vars(s) for m, s in scores.items()}}
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0
