#!/usr/bin/env python
"""Headless training for every MedDiffusion stage.

    python Training/train.py {autoencoder,latents,denoiser,export,...} --config Training/configs/X.yaml \
        [--stage 1|2] [--resume | --overwrite] [--max-steps N] [--out DIR] [key.sub=value ...]

Multi-GPU: ``torchrun --nproc_per_node 8 Training/train.py denoiser --config ...`` (NCCL; gloo on CPU).
Subcommands are the modules of ``Training/stages`` (see its ``__init__``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make MedDiffusionLib and Training importable
    sys.path.insert(0, str(REPO))

from MedDiffusionLib.errors import InputError, MedDiffusionError  # noqa: E402
from Training.config import apply_overrides, load_config, set_key  # noqa: E402
from Training.stages import load_stage, stage_names  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train the 3D MedDiffusion networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name in stage_names():
        try:
            module = load_stage(name)
            help_text = getattr(module, "DESCRIPTION", name)
        except Exception as exc:  # a broken stage stays listed with the reason, the others keep working
            module, help_text = None, f"(unavailable: {exc})"
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="YAML config (Training/configs/*.yaml)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
        p.add_argument("--overwrite", action="store_true",
                       help="start a new run in an output folder that holds an earlier run's checkpoints, replacing "
                       "them (without it, or --resume, such a folder is refused)")
        p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
        p.add_argument("--out", default=None, help="output folder (overrides out_dir)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, values as YAML")
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
    return parser


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(int(os.environ.get("RANK", "0")))
    log = logging.getLogger("meddiffusion.train")
    from MedDiffusionLib.pipelines.distributed import init_world
    from Training.trainer import claim_run_folder

    env = None
    try:
        module = load_stage(args.command)
        cfg = apply_overrides(load_config(args.config), args.overrides)
        if args.max_steps is not None:
            set_key(cfg, "train.max_steps", int(args.max_steps))
        if args.out:
            cfg["out_dir"] = args.out
        if hasattr(module, "apply_arguments"):
            module.apply_arguments(cfg, args)
        if args.resume and args.overwrite:
            raise InputError("--resume and --overwrite contradict each other: continue the run or replace it")
        cfg["overwrite"] = bool(args.overwrite)
        if cfg.get("out_dir"):  # fail before any data is loaded; the Trainer checks again for stage defaults
            claim_run_folder(cfg["out_dir"], bool(args.resume), bool(args.overwrite), delete=False)
        if cfg.get("threads"):
            # CPU threads for torch ops; small networks on a shared machine run much faster on 1 thread.
            import torch

            torch.set_num_threads(int(cfg["threads"]))
        # torch's own 30 min for a collective: a training rank that waits longer than that is stuck
        env = init_world(str(cfg.get("device", "auto")), timeout=datetime.timedelta(minutes=30))
        result = module.run(cfg, env=env, resume=bool(args.resume))
        if env.is_main:
            print(json.dumps(result, indent=1, default=str))
        return 0
    except MedDiffusionError as exc:
        log.error("%s", exc)
        return 2
    finally:
        if env is not None:
            env.barrier()
            env.close()


if __name__ == "__main__":
    sys.exit(main())
