"""`meddiffusion anatomies`, `convert` and `models`: what a model knows, official -> own format, models by name."""
from __future__ import annotations

import argparse
from types import FrameType
from typing import TYPE_CHECKING, Any, Optional

from .common import add_model_args, load_bundle_from_args

if TYPE_CHECKING:  # for annotations only: the commands import the registry lazily
    from ..registry.pull import PullEvent, PullPlan


def register(sub: argparse._SubParsersAction) -> None:
    """Register `meddiffusion anatomies` and `meddiffusion convert`."""
    p = sub.add_parser("anatomies", help="list the anatomies, sizes and spacings a model knows")
    add_model_args(p)
    p.set_defaults(func=run_anatomies)
    c = sub.add_parser("convert", help="convert an authors' checkpoint to this project's safetensors format",
                       description="Reads an authors' autoencoder (.ckpt) or BiFlowNet (.pt) file without running "
                       "pickled code and writes safetensors weights with the configuration in its metadata.")
    c.add_argument("input", help="the authors' checkpoint")
    c.add_argument("output", help="output .safetensors file")
    c.set_defaults(func=run_convert)
    register_models_group(sub)


def run_anatomies(args: argparse.Namespace) -> int:
    """`meddiffusion anatomies`: print the model's anatomies with their sizes and spacings."""
    bundle = load_bundle_from_args(args)
    print(f"model: {bundle.name} (downsample {bundle.downsample}x)")
    print(f"{'class':>5}  {'name':<18} {'mod':<3}  {'sizes X x Y x Z (voxels)':<34} spacing X,Y,Z mm")
    for a in bundle.catalog:
        sizes = ", ".join("x".join(map(str, s)) for s in a.volume_sizes_xyz(bundle.downsample))
        # A trained size may have its own spacing (the official chest/abdomen CT): then one per size, in order.
        per_size = [a.spacing_for(s) for s in a.latent_sizes] if a.spacings_xyz else [a.spacing_xyz]
        spacing = "; ".join(",".join(f"{v:g}" for v in sp) for sp in per_size)
        print(f"{a.class_index:>5}  {a.name:<18} {a.modality:<3}  {sizes:<34} {spacing}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """`meddiffusion convert`: an official checkpoint to our safetensors format."""
    from ..checkpoints.any_format import convert_official

    kind = convert_official(args.input, args.output)
    print(f"wrote {args.output} ({kind})")
    return 0


# ---------------------------------------------------------------------------------- `meddiffusion models`
# The model registry (MedDiffusionLib/registry): list, pull, add, remove. Kept apart from `convert` above.
def register_models_group(sub: argparse._SubParsersAction) -> None:
    """Register `meddiffusion models` (list, pull, add, remove)."""
    from ..registry.known import KNOWN_MODELS  # light: no torch, no network

    m = sub.add_parser("models", help="list, download, add and remove models (use them with --model NAME)",
                       description="Models by name: the bundled demo, the authors' published models (downloaded "
                       "from the Hugging Face Hub and converted once to safetensors) and your own. Downloads honour "
                       "HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE; converted models live in "
                       "$MEDDIFFUSION_MODELS_DIR (default ~/.cache/meddiffusion/models).")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = msub.add_parser("list", help="every model: what it is, size, downloaded or not, where, disk use")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_models_list)
    pl = msub.add_parser("pull", help="download a published model and convert it (asks before downloading)")
    pl.add_argument("name", help=" or ".join(m.name for m in KNOWN_MODELS))
    pl.add_argument("--yes", "-y", action="store_true", help="do not ask before downloading")
    pl.add_argument("--dry-run", action="store_true", help="only show what would be downloaded, and its size")
    pl.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    pl.add_argument("--revision", help="a branch, tag or commit of the Hub repository (default: main)")
    pl.add_argument("--autoencoder-file", metavar="PATH", help="the autoencoder's file in the repository, when "
                    "its name does not tell")
    pl.add_argument("--denoiser-file", metavar="PATH", help="the BiFlowNet's file in the repository")
    pl.add_argument("--no-keep-download", dest="keep_download", action="store_false",
                    help="delete the authors' original files from the Hugging Face cache after conversion")
    pl.add_argument("--progress-file", metavar="FILE", help="also write progress as JSON to FILE (for GUIs)")
    pl.add_argument("--quiet", action="store_true", help="no progress bar")
    pl.set_defaults(func=run_models_pull)
    rm = msub.add_parser("remove", help="delete a downloaded model, or forget one of yours")
    rm.add_argument("name")
    rm.add_argument("--keep-download", action="store_true",
                    help="keep the authors' original files in the Hugging Face cache")
    rm.set_defaults(func=run_models_remove)
    ad = msub.add_parser("add", help="register your own model under a name",
                         description="NAME PATH: a bundle folder (model.yaml + safetensors), used where it is. "
                         "NAME AUTOENCODER DENOISER: two network files (ours or the authors' .ckpt/.pt), converted "
                         "once into the models folder.")
    ad.add_argument("name")
    ad.add_argument("paths", nargs="+", metavar="PATH")
    ad.add_argument("--description", default="", help="shown by `models list`")
    ad.add_argument("--replace", action="store_true", help="replace a model of yours with the same name")
    ad.set_defaults(func=run_models_add)


def run_models_list(args: argparse.Namespace) -> int:
    """`meddiffusion models list`: known and added models, whether downloaded, and their sizes."""
    import json

    from ..registry import human_bytes, list_models

    entries = list_models()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    print(f"{'name':<14} {'kind':<9} {'status':<15} {'size':>9} {'cache':>9}  where / what")
    for e in entries:
        if e.available:
            status, size = "ready", human_bytes(e.disk_bytes)
        elif e.kind == "download":
            status, size = "not downloaded", f"~{human_bytes(e.download_estimate)}"
        else:
            status, size = "missing", "-"
        cache = human_bytes(e.download_bytes) if e.download_bytes else "-"
        print(f"{e.name:<14} {e.kind:<9} {status:<15} {size:>9} {cache:>9}  {e.path or '-'}")
        print(f"{'':<14} {e.description}")
    total = sum(e.disk_bytes + e.download_bytes for e in entries if e.kind != "bundled")
    print(f"disk use of downloaded and added models: {human_bytes(total)} (size: the model; cache: the "
          "authors' original files kept in the Hugging Face cache)")
    return 0


class _ProgressSink:
    """Progress of a pull: a JSON file for GUIs (throttled, written atomically), the terminal otherwise."""

    def __init__(self, path: "str | None") -> None:
        self.path = path
        self.last = 0.0
        self.stage = ""

    def write(self, state: str, **fields: Any) -> None:
        if not self.path:
            return
        import json
        import os
        import time

        from ..io.atomic import atomic_write_text

        now = time.monotonic()
        if state == "running" and fields.get("stage") == self.stage and now - self.last < 0.25:
            return
        self.last, self.stage = now, fields.get("stage", self.stage)
        atomic_write_text(self.path, json.dumps({"state": state, "pid": os.getpid(), **fields}))

    def __call__(self, event: PullEvent) -> None:
        self.write("running", stage=event.stage, file=event.file, done_bytes=event.done_bytes,
                   total_bytes=event.total_bytes, message=event.message)
        if event.stage != "download" and event.message:
            print(f"meddiffusion: {event.message}", flush=True)


def _consent(plan: PullPlan, assume_yes: bool) -> bool:
    import sys

    from ..errors import InputError
    from ..registry import human_bytes

    if assume_yes or plan.download_bytes == 0:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise InputError(f"downloading {human_bytes(plan.download_bytes)} needs your consent: run again with "
                         "--yes (there is no terminal to ask on)")
    answer = input(f"Download {human_bytes(plan.download_bytes)}? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def run_models_pull(args: argparse.Namespace) -> int:
    """`meddiffusion models pull`: download and convert a known model (asks before downloading)."""
    import json
    import signal

    from ..errors import MedDiffusionError
    from ..registry import execute_pull, model_entry, plan_pull

    sink = _ProgressSink(args.progress_file)
    entry = model_entry(args.name)
    if entry.kind == "download" and entry.available:
        print(f"{args.name} is already downloaded: {entry.path}")
        sink.write("done", stage="done", message=f"{args.name} is already downloaded", path=str(entry.path))
        return 0

    def on_term(signum: int, frame: Optional[FrameType]) -> None:  # a GUI's Cancel: unwind so that partial files and folders are removed
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        sink.write("running", stage="listing", message=f"looking up {args.name}")
        plan = plan_pull(args.name, args.revision, args.autoencoder_file, args.denoiser_file)
        if args.dry_run:
            if args.json:
                print(json.dumps(plan.to_dict(), indent=2))
            else:
                print("\n".join(plan.describe()))
            sink.write("planned", stage="planned", plan=plan.to_dict())
            return 0
        print("\n".join(plan.describe()), flush=True)
        if not _consent(plan, args.yes):
            print("nothing downloaded")
            sink.write("cancelled", stage="cancelled", message="declined")
            return 1
        dest = execute_pull(plan, progress=sink, show_bar=not args.quiet, keep_download=args.keep_download)
    except KeyboardInterrupt:
        sink.write("cancelled", stage="cancelled", message="cancelled")
        raise
    except MedDiffusionError as exc:
        sink.write("error", stage="error", message=str(exc))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    sink.write("done", stage="done", message=f"{args.name} ready", path=str(dest))
    print(f"{args.name} ready: {dest}\nuse it with --model {args.name}")
    return 0


def run_models_remove(args: argparse.Namespace) -> int:
    """`meddiffusion models remove`: delete a model's files (or forget a folder that was added in place)."""
    from ..registry import human_bytes, remove_model

    r = remove_model(args.name, keep_download=args.keep_download)
    if r.kept_folder is not None:
        print(f"forgot {r.name} (its folder {r.kept_folder} was left as it is)")
    else:
        print(f"removed {r.name}: freed {human_bytes(r.freed_bundle + r.freed_download)}"
              + (f" ({human_bytes(r.freed_download)} of it from the Hugging Face cache)" if r.freed_download else ""))
    return 0


def run_models_add(args: argparse.Namespace) -> int:
    """`meddiffusion models add`: register a bundle folder or a pair of checkpoints under a name."""
    from ..registry import add_model

    folder = add_model(args.name, args.paths, args.description, replace=args.replace)
    print(f"added {args.name}: {folder}\nuse it with --model {args.name}")
    return 0
