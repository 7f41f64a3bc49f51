"""Argument groups and helpers shared by the commands."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..options import TaskOptions
from ..progress import ProgressInfo

if TYPE_CHECKING:  # for annotations only: the functions below import these lazily
    from tqdm import tqdm

    from ..checkpoints.bundle import ModelBundle


def _choice(text: str) -> str:
    return text.strip().lower()


def add_option(parser: Any, options: type[TaskOptions], name: str, *flags: str, **overrides: Any) -> None:
    """An argument for option ``name`` of ``options`` (GenerateOptions, ReconstructOptions) with the type,
    choices, default and help of the options object, so that the command line cannot drift from the library.
    Choices and bounds are checked by the options' ``validate`` (the same message as the server and pipelines)."""
    spec = options.spec(name)
    kw: dict[str, Any] = {"dest": name, "default": spec.default, "help": spec.help}
    if spec.choices:  # listed, not argparse choices: `validate` refuses with the message everywhere else uses
        kw.update(type=_choice, metavar="{" + ",".join(spec.choices) + "}")
    elif spec.kind in (int, float):
        kw["type"] = spec.kind
    if spec.default is not None:
        kw["help"] += f" (default {spec.default:g})" if isinstance(spec.default, float) else \
            f" (default {spec.default})"
    kw.update(overrides)
    parser.add_argument(*(flags or ("--" + name.replace("_", "-"),)), **kw)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the model options (--model, or --autoencoder with --denoiser, and --device) to ``parser``."""
    g = parser.add_argument_group("model (default: the bundled demo model)")
    g.add_argument("--model", metavar="NAME|DIR",
                   help="a model name (see `meddiffusion models list`, e.g. official-8x) or a bundle folder "
                   "(model.yaml + safetensors)")
    g.add_argument("--autoencoder", metavar="PATH", help="autoencoder checkpoint: the authors' .ckpt or ours")
    g.add_argument("--denoiser", metavar="PATH", help="BiFlowNet checkpoint: the authors' .pt or ours")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")


def load_bundle_from_args(args: argparse.Namespace) -> ModelBundle:
    """The model bundle the model options name (the demo model when none is given)."""
    from ..checkpoints.bundle import bundle_from_official, load_bundle
    from ..errors import InputError

    if args.autoencoder or args.denoiser:
        if not (args.autoencoder and args.denoiser):
            raise InputError("give both --autoencoder and --denoiser (or a --model folder)")
        if args.model:
            raise InputError("give either --model or --autoencoder/--denoiser, not both")
        return bundle_from_official(args.autoencoder, args.denoiser)
    return load_bundle(resolve_model_arg(args.model))


def resolve_model_arg(spec: Optional[str]) -> Optional[Path]:
    """``--model``: a registered name or a folder (None: the demo model) -> the bundle folder."""
    from ..registry.store import resolve_model

    return None if spec is None else resolve_model(spec)  # None: load_bundle explains a missing demo model


class TqdmProgress:
    """A tqdm bar per pipeline stage (sampling, decoding), fed by ProgressInfo callbacks."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Optional[tqdm[Any]] = None
        self.stage: Optional[str] = None

    def __call__(self, info: ProgressInfo) -> None:
        """Show ``info`` on the current stage's bar, opening a new bar when the stage changes."""
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bar
        if info.stage != self.stage or bar is None:
            self.close()
            self.stage = info.stage
            bar = self.bar = tqdm(total=info.total, desc=info.stage, unit="step", dynamic_ncols=True)
        bar.n = info.step
        bar.refresh()

    def close(self) -> None:
        """Close the open bar, if any."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
