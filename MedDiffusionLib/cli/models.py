"""`meddiffusion anatomies` and `meddiffusion convert`: what a model knows, and official -> own format."""
from __future__ import annotations

import argparse

from .common import add_model_args, load_bundle_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("anatomies", help="list the anatomies, sizes and spacings a model knows")
    add_model_args(p)
    p.set_defaults(func=run_anatomies)
    c = sub.add_parser("convert", help="convert an authors' checkpoint to this project's safetensors format",
                       description="Reads an authors' autoencoder (.ckpt) or BiFlowNet (.pt) file without running "
                       "pickled code and writes safetensors weights with the configuration in its metadata.")
    c.add_argument("input", help="the authors' checkpoint")
    c.add_argument("output", help="output .safetensors file")
    c.set_defaults(func=run_convert)


def run_anatomies(args: argparse.Namespace) -> int:
    bundle = load_bundle_from_args(args)
    print(f"model: {bundle.name} (downsample {bundle.downsample}x)")
    print(f"{'class':>5}  {'name':<18} {'mod':<3}  {'sizes X x Y x Z (voxels)':<34} spacing X,Y,Z mm")
    for a in bundle.catalog:
        sizes = ", ".join("x".join(map(str, s)) for s in a.volume_sizes_xyz(bundle.downsample))
        spacing = ",".join(f"{v:g}" for v in a.spacing_xyz)
        print(f"{a.class_index:>5}  {a.name:<18} {a.modality:<3}  {sizes:<34} {spacing}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoints.official import convert_official

    kind = convert_official(args.input, args.output)
    print(f"wrote {args.output} ({kind})")
    return 0
