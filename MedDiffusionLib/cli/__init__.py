"""`meddiffusion` command line: one module per command group, each thin over the pipelines."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ..errors import MedDiffusionError

# Each module has register(subparsers); imported lazily inside so `--help` stays fast.
COMMAND_MODULES = ("generate", "models", "reconstruct", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The `meddiffusion` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="meddiffusion", description="3D MedDiffusion: generate and reconstruct "
                                     "3D CT/MRI volumes with the Patch-Volume autoencoder and BiFlowNet.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (a library error is printed as one line: status 2)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedDiffusionError as exc:
        print(f"meddiffusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meddiffusion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
