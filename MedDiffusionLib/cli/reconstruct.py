"""`meddiffusion reconstruct` (sparse-view CT / accelerated MRI) and `meddiffusion evaluate` (phantom benchmark)."""
from __future__ import annotations

import argparse
import json
import math
import warnings
from typing import Any, Optional

from ..options import TASKS, ReconstructOptions
from .common import TqdmProgress, add_model_args, add_option, load_bundle_from_args

# Evaluation phantoms use seeds from here on; training phantom seeds stay below it (see Training/configs).
EVAL_SEED_BASE = 10_000


def _add_physics_args(p: argparse.ArgumentParser) -> None:
    add_option(p, ReconstructOptions, "task", required=True)
    add_option(p, ReconstructOptions, "anatomy")
    add_option(p, ReconstructOptions, "views")
    add_option(p, ReconstructOptions, "noise_photons", metavar="N")
    for name in ("acceleration", "mask", "sampler", "steps", "dc_weight", "dc_every"):
        add_option(p, ReconstructOptions, name)
    p.add_argument("--decode-budget-gb", type=float, help="memory budget of one decoding tile")
    p.add_argument("--controlnet", metavar="PATH", help="use this ControlNet file for --task (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct sparse-view CT or undersampled MRI",
                       description="Reconstruct a volume with the model's ControlNet for the task. By default the "
                       "input is a fully sampled volume and the measurements are simulated from it (for evaluation "
                       "and demos); with --already-degraded the input is the FBP / zero-filled image itself.")
    p.add_argument("--input", required=True, help="input volume (.nrrd, .nii.gz, .nii, .mha or a DICOM folder)")
    p.add_argument("--out", required=True, help="reconstruction output (.nrrd, .nii.gz, .nii, .mha)")
    p.add_argument("--degraded-out", metavar="PATH", help="also write the FBP / zero-filled volume")
    p.add_argument("--already-degraded", action="store_true",
                   help="the input is an FBP / zero-filled image: nothing is simulated")
    p.add_argument("--no-data-consistency", action="store_true", help="ControlNet prior only, no data consistency")
    add_option(p, ReconstructOptions, "seed")
    p.add_argument("--json", metavar="PATH", help="also write the run's settings and metrics as JSON")
    _add_physics_args(p)
    p.set_defaults(func=run_reconstruct)

    e = sub.add_parser("evaluate", help="PSNR/SSIM of FBP/zero-filled vs ControlNet (+ data consistency) on phantoms",
                       description="Reconstruct held-out synthetic phantoms (seeds from 10000 on, never used for "
                       "training) at the model's size and print PSNR/SSIM (mean +- std) of the conventional "
                       "reconstruction, the ControlNet alone, and the ControlNet with data consistency.")
    e.add_argument("--count", type=int, default=5, help="number of phantoms (default 5)")
    e.add_argument("--seed", type=int, default=0, help="first sampling seed; phantom i uses seed + i (default 0)")
    e.add_argument("--json", metavar="PATH", help="also write the per-phantom metrics and summary as JSON")
    _add_physics_args(e)
    e.set_defaults(func=run_evaluate)


def _pipeline(args: argparse.Namespace):
    from ..checkpoints.native import load_any_controlnet
    from ..pipelines.reconstruct import ReconstructionPipeline

    bundle = load_bundle_from_args(args)
    if args.controlnet:
        bundle.controlnets = {**bundle.controlnets, args.task: load_any_controlnet(args.controlnet)}
    return ReconstructionPipeline(bundle, args.device, decode_budget_gb=args.decode_budget_gb)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before the model loads (the pipeline checks again against the model)."""
    args.task = ReconstructOptions(**_options(args)).validate().task


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(task=args.task, anatomy=args.anatomy, views=args.views, acceleration=args.acceleration,
                mask=args.mask, noise_photons=args.noise_photons, sampler=args.sampler, steps=args.steps,
                dc_weight=args.dc_weight, dc_every=args.dc_every)


def _run(pipe, image, bar: TqdmProgress, **kw: Any):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pipe(image, progress=bar, **kw)
        finally:
            bar.close()
    for w in caught:
        print(f"meddiffusion: warning: {w.message}")
    return result


def _metrics_line(r) -> str:
    parts = []
    if r.psnr is not None:
        parts.append(f"PSNR {r.psnr:.2f} dB / SSIM {r.ssim:.3f} (degraded {r.degraded_psnr:.2f} dB / "
                     f"{r.degraded_ssim:.3f})")
    if r.residual is not None:
        parts.append(f"measurement residual {r.residual:.4f} (degraded {r.degraded_residual:.4f})")
    return "; ".join(parts)


def _summary(r) -> dict[str, Any]:
    return {k: v for k, v in vars(r).items() if k not in ("image", "degraded")}


def run_reconstruct(args: argparse.Namespace) -> int:
    from ..io.atomic import atomic_write_text, check_writable
    from ..io.volumes import read_volume, write_volume

    _check_args(args)
    outputs = [args.out] + [p for p in (args.degraded_out, args.json) if p]
    for path in outputs:
        check_writable(path)
    image = read_volume(args.input)  # InputError naming the file if it cannot be read
    pipe = _pipeline(args)
    result = _run(pipe, image, TqdmProgress(not args.quiet), simulate=not args.already_degraded, seed=args.seed,
                  data_consistency=not args.no_data_consistency, **_options(args))
    write_volume(result.image, args.out)
    if args.degraded_out and result.degraded is not None:
        write_volume(result.degraded, args.degraded_out)
    if args.json:
        atomic_write_text(args.json, json.dumps(_summary(result), indent=1, default=str))
    what = f"{result.views} views" if result.task == "sparse-ct" else f"R={result.acceleration:g} {result.mask}"
    print(f"wrote {args.out}: {result.task} ({what}), anatomy {result.anatomy}, seed {result.seed}, "
          f"{result.sampler} {result.steps} steps, data consistency {'on' if result.data_consistency else 'off'}, "
          f"{result.elapsed_s:.1f} s")
    line = _metrics_line(result)
    if line:
        print(line)
    if args.degraded_out:
        print(f"wrote {args.degraded_out}")
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _eval_anatomies(bundle, task: str, anatomy: Optional[str]) -> list:
    from ..data.phantoms import ANATOMIES
    from ..errors import InputError

    modality = TASKS[task]
    if anatomy:
        entry = bundle.catalog.get(anatomy)
        if entry.modality != modality:
            raise InputError(f"anatomy '{entry.name}' is {entry.modality}; task '{task}' needs a {modality} anatomy")
        entries = [entry]
    else:
        entries = [a for a in bundle.catalog.by_modality(modality) if a.name in ANATOMIES]
    missing = [a.name for a in entries if a.name not in ANATOMIES]
    if missing or not entries:
        raise InputError(f"no phantom generator for {', '.join(missing) or f'any {modality} anatomy of the model'}; "
                         f"phantoms exist for {', '.join(ANATOMIES)}")
    return entries


def run_evaluate(args: argparse.Namespace) -> int:
    from ..data.phantoms import make_phantom
    from ..errors import InputError
    from ..io.atomic import atomic_write_text, check_writable

    _check_args(args)
    if args.count < 1:
        raise InputError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.json:
        check_writable(args.json)
    pipe = _pipeline(args)
    entries = _eval_anatomies(pipe.bundle, args.task, args.anatomy)
    baseline = "FBP" if args.task == "sparse-ct" else "zero-filled"
    methods = {baseline: ("degraded_psnr", "degraded_ssim"), "ControlNet": ("psnr", "ssim"),
               "ControlNet + DC": ("psnr", "ssim")}
    scores: dict[str, dict[str, list[float]]] = {m: {"psnr": [], "ssim": []} for m in methods}
    samples = []
    opts = _options(args)
    opts.pop("anatomy")
    for i in range(args.count):
        entry = entries[i % len(entries)]
        phantom_seed, seed = EVAL_SEED_BASE + args.seed + i, args.seed + i
        size = entry.volume_sizes_xyz(pipe.bundle.downsample)[0]
        image = make_phantom(entry.name, size, entry.spacing_for(entry.latent_sizes[0]), phantom_seed)
        if not args.quiet:
            print(f"[{i + 1}/{args.count}] {entry.name} phantom seed {phantom_seed}, "
                  f"{'x'.join(map(str, size))} voxels")
        plain = _run(pipe, image, TqdmProgress(not args.quiet), anatomy=entry.name, seed=seed,
                     data_consistency=False, **opts)
        with_dc = _run(pipe, image, TqdmProgress(not args.quiet), anatomy=entry.name, seed=seed,
                       data_consistency=True, **opts)
        row = {"anatomy": entry.name, "phantom_seed": phantom_seed, "seed": seed}
        for name, result in ((baseline, plain), ("ControlNet", plain), ("ControlNet + DC", with_dc)):
            p_key, s_key = methods[name]
            scores[name]["psnr"].append(float(getattr(result, p_key)))
            scores[name]["ssim"].append(float(getattr(result, s_key)))
            row[name] = {"psnr": scores[name]["psnr"][-1], "ssim": scores[name]["ssim"][-1]}
        samples.append(row)

    what = f"{args.views} views" if args.task == "sparse-ct" else f"R={args.acceleration:g}, {args.mask} mask"
    steps = plain.steps
    print(f"\n{args.task} ({what}), {args.count} phantom(s): {', '.join(sorted({s['anatomy'] for s in samples}))}; "
          f"{args.sampler} {steps} steps; model {pipe.bundle.name}")
    print(f"{'method':<18} {'PSNR (dB)':>16} {'SSIM':>16}")
    summary: dict[str, Any] = {}
    for name in methods:
        pm, ps = _mean_std(scores[name]["psnr"])
        sm, ss = _mean_std(scores[name]["ssim"])
        summary[name] = {"psnr_mean": pm, "psnr_std": ps, "ssim_mean": sm, "ssim_std": ss}
        print(f"{name:<18} {pm:>8.2f} +- {ps:<5.2f} {sm:>8.3f} +- {ss:<5.3f}")
    if args.json:
        report = {"task": args.task, "count": args.count, "seed": args.seed, "model": pipe.bundle.name,
                  "settings": {**opts, "steps": steps}, "summary": summary, "samples": samples}
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0
