"""`meddiffusion generate`: sample a synthetic volume and write it (plus an optional PNG preview)."""
from __future__ import annotations

import argparse
import warnings

from ..options import GenerateOptions
from .common import TqdmProgress, add_model_args, add_option, load_bundle_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a synthetic CT/MR volume",
                       description="Generate a synthetic 3D volume of one anatomy. Sizes are voxels X x Y x Z.")
    p.add_argument("--anatomy", required=True, help="e.g. ct-chest-abdomen (see `meddiffusion anatomies`)")
    p.add_argument("--size", help="output size XxYxZ (default: the anatomy's first size)")
    for name in ("sampler", "steps", "seed"):
        add_option(p, GenerateOptions, name)
    add_option(p, GenerateOptions, "hu_range", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--out", required=True, help="output volume (.nrrd, .nii.gz, .nii, .mha)")
    p.add_argument("--preview", metavar="PNG", help="also write three orthogonal mid-slices as PNG")
    p.add_argument("--decode-budget-gb", type=float,
                   help="memory budget of one decoding tile (default 6 on CPU, 3 on GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from ..io.atomic import check_writable
    from ..io.preview import save_preview
    from ..io.volumes import write_volume
    from ..pipelines.generate import GenerationPipeline

    # Refused before the model loads; the pipeline checks again against the model (grid, anatomy, schedule).
    GenerateOptions(anatomy=args.anatomy, size_xyz=args.size, sampler=args.sampler, steps=args.steps, seed=args.seed,
                    hu_range=args.hu_range).validate()
    check_writable(args.out)
    if args.preview:
        check_writable(args.preview)
    bundle = load_bundle_from_args(args)
    pipe = GenerationPipeline(bundle, args.device, decode_budget_gb=args.decode_budget_gb)
    bar = TqdmProgress(not args.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pipe(args.anatomy, args.size, args.sampler, args.steps, args.seed,
                          tuple(args.hu_range) if args.hu_range else None, progress=bar)
        finally:
            bar.close()
    for w in caught:
        print(f"meddiffusion: warning: {w.message}")
    write_volume(result.image, args.out)
    if args.preview:
        save_preview(args.preview, sitk.GetArrayFromImage(result.image), result.image.GetSpacing())
    print(f"wrote {args.out}: {result.anatomy}, {'x'.join(map(str, result.size_xyz))} voxels, "
          f"seed {result.seed}, {result.sampler} {result.steps} steps, {result.elapsed_s:.1f} s")
    return 0
