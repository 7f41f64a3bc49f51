"""`meddiffusion generate`: one synthetic volume (--out), or a dataset of many (--count, --out-dir; also under
torchrun, one process per GPU). The dataset rules live in pipelines/batch.py."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import TYPE_CHECKING, Any, Optional

from ..options import GenerateOptions
from .common import TqdmProgress, add_model_args, add_option, load_bundle_from_args

if TYPE_CHECKING:
    from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    """Register `meddiffusion generate`."""
    p = sub.add_parser("generate", help="generate synthetic CT/MR volumes (one, or a dataset with a manifest)",
                       description="Generate synthetic 3D volumes. Sizes are voxels X x Y x Z. With --count and "
                       "--out-dir it makes a dataset: a mix of anatomies (NAME:WEIGHT) and sizes, per-volume seeds "
                       "derived from --seed, a manifest.csv, resumable; under `torchrun --nproc_per_node=G` the "
                       "volumes are shared out over the G processes (one GPU each).")
    p.add_argument("--anatomy", required=True, nargs="+", metavar="NAME[:WEIGHT]",
                   help="e.g. ct-chest-abdomen (see `meddiffusion anatomies`); a dataset takes several, "
                   "optionally weighted: ct-legs:2 mr-knee:1")
    p.add_argument("--size", nargs="+", metavar="XxYxZ",
                   help="output size (default: the anatomy's first size); a dataset cycles through several")
    for name in ("sampler", "steps"):
        add_option(p, GenerateOptions, name)
    add_option(p, GenerateOptions, "seed", help=GenerateOptions.spec("seed").help + "; for a dataset the base "
               "seed every volume's own seed is derived from (a resumed dataset keeps its own)")
    add_option(p, GenerateOptions, "hu_range", type=float, nargs=2, metavar=("LOW", "HIGH"))
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output volume (.nrrd, .nii.gz, .nii, .mha)")
    out.add_argument("--out-dir", metavar="DIR", help="dataset folder (with --count): volumes, manifest.csv, run.json")
    p.add_argument("--count", type=int, help="number of volumes in the dataset (with --out-dir)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="dataset: latents of one size sampled together per denoiser call (faster on a GPU; 1 keeps "
                   "every file identical to a single `generate --seed` of its manifest seed)")
    p.add_argument("--format", default=".nrrd", help="dataset: volume file suffix (default .nrrd; e.g. .nii.gz)")
    p.add_argument("--preview", metavar="PNG", help="also write three orthogonal mid-slices as PNG (with --out)")
    p.add_argument("--decode-budget-gb", type=float,
                   help="memory budget of the tiled decode's activations (default: pipelines.decode."
                        "default_budget_gb, by device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`meddiffusion generate`: one volume, or a dataset with --count."""
    from ..errors import InputError

    # Refused before the model loads; the pipeline checks again against the model (grid, anatomy, schedule).
    for anatomy in args.anatomy:
        for size in args.size or [None]:
            GenerateOptions(anatomy=anatomy.partition(":")[0], size_xyz=size, sampler=args.sampler, steps=args.steps,
                            seed=args.seed, hu_range=args.hu_range).validate()
    if args.out_dir is not None:
        return run_dataset(args)
    if args.count is not None:
        raise InputError("--count makes a dataset: give --out-dir DIR instead of --out")
    if len(args.anatomy) != 1 or ":" in args.anatomy[0] or (args.size and len(args.size) != 1):
        raise InputError("--out writes one volume: give one --anatomy and at most one --size (or use --count "
                         "and --out-dir for a dataset)")
    return run_single(args)


def _print_warnings(caught: list) -> None:
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"meddiffusion: warning: {message}")


def run_single(args: argparse.Namespace) -> int:
    """Generate one volume and write it (and an optional PNG preview); returns the exit status."""
    import SimpleITK as sitk

    from ..io.atomic import check_writable
    from ..io.preview import save_preview
    from ..io.volumes import write_volume
    from ..pipelines.generate import GenerationPipeline

    check_writable(args.out)
    if args.preview:
        check_writable(args.preview)
    bundle = load_bundle_from_args(args)
    pipe = GenerationPipeline(bundle, args.device, decode_budget_gb=args.decode_budget_gb)
    bar = TqdmProgress(not args.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = pipe(args.anatomy[0], args.size[0] if args.size else None, args.sampler, args.steps, args.seed,
                          tuple(args.hu_range) if args.hu_range else None, progress=bar)
        finally:
            bar.close()
    _print_warnings(caught)
    write_volume(result.image, args.out)
    if args.preview:
        save_preview(args.preview, sitk.GetArrayFromImage(result.image), result.image.GetSpacing())
    print(f"wrote {args.out}: {result.anatomy}, {'x'.join(map(str, result.size_xyz))} voxels, "
          f"seed {result.seed}, {result.sampler} {result.steps} steps, {result.elapsed_s:.1f} s")
    return 0


class VolumeBar:
    """tqdm over volumes (fractions while a batch samples), so the ETA is for the whole shard."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Optional[tqdm[Any]] = None

    def __call__(self, done: float, total: int) -> None:
        """Show ``done`` of ``total`` volumes (fractional while a batch samples)."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="volumes", unit="vol", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        """Close the bar, if one was opened."""
        if self.bar is not None:
            self.bar.close()


def run_dataset(args: argparse.Namespace) -> int:
    """Generate (or resume) a dataset of --count volumes with its manifest; torchrun splits it across ranks."""
    from pathlib import Path

    from ..catalog import parse_size
    from ..errors import InputError
    from ..pipelines.batch import DatasetFolder, generate_dataset, make_spec
    from ..pipelines.common import resolve_seed
    from ..pipelines.distributed import init_world
    from ..pipelines.generate import GenerationPipeline

    if args.count is None:
        raise InputError("--out-dir makes a dataset: give --count N")
    if args.preview:
        raise InputError("--preview is for one volume (--out); a dataset has no preview")
    root = Path(args.out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"--out-dir '{root}' exists and is not a folder")
    if not root.parent.is_dir():
        raise InputError(f"the folder holding --out-dir '{root}' does not exist")
    sizes = [parse_size(s) for s in args.size or ()]
    world = init_world(args.device)
    try:
        seed: Optional[int] = args.seed
        if seed is None:  # rank 0 decides, so every rank plans the same dataset
            saved = DatasetFolder(root).saved_base_seed()
            seed = world.from_main(resolve_seed(None) if saved is None else saved)
        bundle = load_bundle_from_args(args)
        pipe = GenerationPipeline(bundle, world.device, decode_budget_gb=args.decode_budget_gb)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = make_spec(pipe, args.anatomy, args.count, seed, sizes, args.sampler, args.steps, args.batch_size,
                             tuple(args.hu_range) if args.hu_range else None, args.format)
        if world.is_main:
            _print_warnings(caught)
        bar = VolumeBar(world.is_main and not args.quiet)
        try:
            report = generate_dataset(pipe, spec, root, world, progress=bar)
        finally:
            bar.close()
    finally:
        world.close()
    rate = report.generated / report.elapsed_s * 3600 if report.generated else 0.0
    where = f" (rank {world.rank} of {world.world_size})" if world.distributed else ""
    print(f"generated {report.generated} volume(s) on {pipe.device}{where} in {report.elapsed_s:.1f} s, "
          f"{rate:.0f} volumes/hour", file=sys.stderr if not world.is_main else sys.stdout)
    if report.manifest is not None:
        print(f"dataset {root}: {report.total} volumes ({report.skipped} were already complete), base seed "
              f"{spec.base_seed}, model {spec.model_id}; manifest {report.manifest}")
    return 0
