"""The training loop every stage shares: DDP, precision, EMA, resumable data order, checkpoints, logging.

A stage builds its networks and optimizers, registers them with a ``Trainer``, calls ``resume()`` and then
``fit(step_fn)``. Checkpoints (see ``checkpointing.py``) are written atomically by rank 0 every N steps.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from MedDiffusionLib.errors import InputError
from MedDiffusionLib.io.atomic import atomic_write_text
from MedDiffusionLib.pipelines.distributed import WorldInfo
from Training.checkpointing import (CHECKPOINT_FORMAT, CheckpointManager, load_checkpoint, rng_state,  # noqa: F401
                                  seed_all, set_rng_state)

log = logging.getLogger("meddiffusion.train")
DUMP_ENV = "MEDDIFFUSION_TRAIN_DUMP"  # tests: every rank writes hashes of its final weights here


# --------------------------------------------------------------------------- distributed


def sync_buffers(module: nn.Module, env: WorldInfo) -> None:
    """Copy rank 0's buffers (codebook, BatchNorm stats) to every rank so saved states agree."""
    if env.distributed:
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def wrap_ddp(module: nn.Module, env: WorldInfo, find_unused: bool = False) -> nn.Module:
    if not env.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights, updated every ``update_every`` steps.

    Before ``warmup_steps`` the average is a plain copy (the authors' recipe: an early average of random
    weights is useless). Buffers are always copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, update_every: int = 10, warmup_steps: int = 2000):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.update_every, self.warmup_steps = float(decay), int(update_every), int(warmup_steps)

    @classmethod
    def from_config(cls, model: nn.Module, section: Mapping[str, Any], decay: float = 0.995, update_every: int = 10,
                    warmup_steps: int = 2000) -> "EMA":
        """From a config's ``ema`` section; the keyword arguments are the stage's defaults."""
        return cls(model, float(section.get("decay", decay)), int(section.get("update_every", update_every)),
                   int(section.get("warmup_steps", warmup_steps)))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``step`` counts completed optimizer steps (1 after the first)."""
        if step % self.update_every != 0:
            return
        if step < self.warmup_steps:
            self.model.load_state_dict(model.state_dict())
            return
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd)


# --------------------------------------------------------------------------- resumable data order


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch order depends only on (seed, epoch) and can start mid-epoch.

    Yields ``(index, sample_seed)``: datasets seed their augmentation with ``sample_seed`` (derived from
    seed, epoch and the global position), so a resumed run sees exactly the samples it would have seen.
    Small datasets are repeated so that every rank gets at least ``min_per_rank`` samples per epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True,
                 min_per_rank: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        n = len(dataset)  # type: ignore[arg-type]
        self.repeats = max(1, -(-min_per_rank * num_replicas // n))
        self.offset = 0

    def set_position(self, epoch: int, offset: int) -> None:
        self.set_epoch(epoch)
        self.offset = int(offset)

    def _order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        parts = [torch.randperm(n, generator=g) if self.shuffle else torch.arange(n) for _ in range(self.repeats)]
        order = torch.cat(parts).tolist()
        total = -(-len(order) // self.num_replicas) * self.num_replicas
        return order + order[: total - len(order)]  # pad so every rank has the same count

    def per_rank(self) -> int:
        return -(-len(self.dataset) * self.repeats // self.num_replicas)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        positions = range(self.rank, len(order), self.num_replicas)
        for k, pos in enumerate(positions):
            if k < self.offset:
                continue
            seed = int(np.random.SeedSequence([self.seed, self.epoch, pos]).generate_state(1)[0])
            yield order[pos], seed

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.offset)


class StatefulLoader:
    """An endless stream of batches that remembers (epoch, samples consumed) for exact resumption."""

    def __init__(self, dataset: Dataset, batch_size: int, env: WorldInfo, seed: int = 0, num_workers: int = 0,
                 shuffle: bool = True, collate_fn: Callable | None = None) -> None:
        self.dataset, self.batch_size, self.env = dataset, int(batch_size), env
        self.sampler = ResumableSampler(dataset, env.world_size, env.rank, seed, shuffle, min_per_rank=batch_size)
        self.num_workers, self.collate_fn, self.seed = int(num_workers), collate_fn, seed
        self.epoch, self.consumed = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def __iter__(self) -> Iterator[Any]:
        while True:
            self.sampler.set_position(self.epoch, self.consumed)
            # A private generator keeps DataLoader from drawing its base seed from the global RNG, which
            # would make a resumed run's random stream differ from an uninterrupted one.
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                num_workers=self.num_workers, collate_fn=self.collate_fn,
                                pin_memory=self.env.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.seed + self.epoch))
            for batch in loader:
                self.consumed += self.batch_size
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0


# --------------------------------------------------------------------------- scalars


class ScalarLogger:
    """Rank-0 scalars to ``scalars.csv`` (long format: step, tag, value) and TensorBoard when installed."""

    def __init__(self, folder: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "scalars.csv"
        new = not self.csv_path.exists()
        self._fh = open(self.csv_path, "a", newline="")
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(["step", "wall_time", "tag", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception as exc:  # tensorboard not installed: CSV only
                log.info("TensorBoard logging off (%s)", exc)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for tag, value in scalars.items():
            self._csv.writerow([step, f"{now:.3f}", tag, f"{value:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(tag, value, step)
        self._fh.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def state_hashes(modules: dict[str, nn.Module]) -> dict[str, str]:
    """sha256 of every tensor of each module's state_dict (DDP test: ranks must agree bit for bit)."""
    out = {}
    for name, m in modules.items():
        h = hashlib.sha256()
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


# --------------------------------------------------------------------------- the run folder


def claim_run_folder(out_dir: str | os.PathLike[str], resume: bool, overwrite: bool, delete: bool = True) -> int:
    """Refuse (InputError) to start a new run in a folder holding an earlier run's checkpoints, unless the run
    resumes it or ``overwrite`` is set; with ``overwrite`` (and ``delete``) those checkpoints are deleted so that
    the new run's are the ones kept. Returns how many were deleted."""
    found = CheckpointManager(Path(out_dir) / "checkpoints").list()
    if not found or resume:
        return 0
    if not overwrite:
        raise InputError(f"'{out_dir}' already holds checkpoints of an earlier run (newest: {found[-1][1].name}); "
                         "pass --resume to continue that run, --overwrite to start over and replace it, or choose "
                         "another output folder (--out)")
    if not delete:
        return 0
    for _, path in found:
        with contextlib.suppress(OSError):
            path.unlink()
    return len(found)


# --------------------------------------------------------------------------- the loop


StepFn = Callable[[Any, int], dict[str, Any]]  # scalars: floats or 0-d tensors


class Trainer:
    """Owns the step counter, precision, gradient scaling/clipping, EMA updates, checkpoints and logs."""

    def __init__(self, cfg: dict[str, Any], stage: str, env: WorldInfo, out_dir: str | os.PathLike[str]) -> None:
        t = cfg.get("train", {})
        self.cfg, self.stage, self.env, self.out_dir = cfg, stage, env, Path(out_dir)
        self.seed = int(cfg.get("seed", 0))
        self.max_steps = int(t.get("max_steps", 1000))
        self.ckpt_every = int(t.get("checkpoint_every", 1000))
        self.log_every = max(1, int(t.get("log_every", 50)))
        self.grad_clip = float(t.get("grad_clip") or 0.0)
        self.precision = self._resolve_precision(str(t.get("precision", "auto")))
        self.step = 0
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, tuple[EMA, nn.Module]] = {}
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", int(t.get("keep_checkpoints", 3)))
        self.loader: StatefulLoader | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
        self._stepped = False
        self.checkpoint_hooks: list[Callable[[int], None]] = []  # called on every rank after each save
        # An earlier run's checkpoints are only continued (resume()) or, when asked, replaced; config.yaml and
        # the weights are written once fit() has made sure which (see claim_run_folder).
        self.overwrite = bool(cfg.get("overwrite", False))
        self._resumed = False
        self._claimed = False
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scalars = ScalarLogger(self.out_dir / "logs", enabled=env.is_main,
                                    tensorboard=bool(t.get("tensorboard", True)))

    # -- precision
    def _resolve_precision(self, p: str) -> str:
        cuda = self.env.device.type == "cuda"
        if p == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        if p not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got '{p}'")
        if p == "fp16" and not cuda:
            return "fp32"  # fp16 autocast needs a GPU; CPU stays fp32 unless bf16 is asked for explicitly
        return p

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    # -- registration
    def add_model(self, name: str, model: nn.Module) -> None:
        self.models[name] = model

    def add_optimizer(self, name: str, opt: torch.optim.Optimizer) -> None:
        self.optimizers[name] = opt

    def add_ema(self, name: str, ema: EMA, source: nn.Module) -> None:
        self.emas[name] = (ema, source)

    def make_loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0, **kw: Any) -> StatefulLoader:
        self.loader = StatefulLoader(dataset, batch_size, self.env, self.seed, num_workers, **kw)
        return self.loader

    # -- optimisation
    def optimize(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
        """Backward (scaled for fp16), clip, step, zero grads; returns the pre-clip gradient norm (or 0)."""
        self.scaler.scale(loss).backward()
        norm = 0.0
        if self.grad_clip > 0:
            self.scaler.unscale_(opt)
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        self._stepped = True
        return norm

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        rngs = [rng_state()]
        if self.env.distributed:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step, "world_size": self.env.world_size,
            "models": {n: m.state_dict() for n, m in self.models.items()},
            "ema": {n: e.state_dict() for n, (e, _) in self.emas.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(), "rng": rngs,
            "data": self.loader.state_dict() if self.loader is not None else {},
            "config": json.loads(json.dumps(self.cfg)),
        }

    def save_checkpoint(self) -> Path | None:
        for m in list(self.models.values()) + [e.model for e, _ in self.emas.values()]:
            sync_buffers(m, self.env)
        state = self.state()  # collective (RNG gather): every rank calls it
        path = self.ckpt.save(state, self.step) if self.env.is_main else None
        self.env.barrier()
        if path is not None:
            log.info("saved checkpoint %s", path)
        for hook in self.checkpoint_hooks:
            hook(self.step)
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> bool:
        """Load the newest checkpoint (or ``path``) into the registered objects; False when there is none."""
        self._resumed = True
        if path is not None:
            found: tuple[dict[str, Any], Path] | None = (load_checkpoint(path), Path(path))
        else:
            found = self.ckpt.load_latest()
        if found is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt.folder)
            return False
        state, p = found
        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != self.stage:
            raise ValueError(f"'{p}' is not a '{self.stage}' training checkpoint")
        for n, m in self.models.items():
            m.load_state_dict(state["models"][n])
        for n, (e, _) in self.emas.items():
            e.load_state_dict(state["ema"][n])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if self.loader is not None and state.get("data"):
            self.loader.load_state_dict(state["data"])
        if len(state["rng"]) == self.env.world_size:
            self._pending_rng = state["rng"]
        else:
            log.warning("checkpoint written by %d processes, now %d: random streams are re-seeded",
                        len(state["rng"]), self.env.world_size)
        log.info("resumed from %s at step %d", p, self.step)
        return True

    # -- loop
    def fit(self, step_fn: StepFn, hooks: list[Callable[[int], None]] | None = None) -> None:
        """Run ``step_fn(batch, step)`` until ``max_steps``; ``step`` counts the steps completed before it."""
        from tqdm import tqdm

        if self.loader is None:
            raise RuntimeError("make_loader() must be called before fit()")
        self._claim()
        # Restore (or seed) the per-rank random streams last, right before the first batch.
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng[self.env.rank])
        else:
            seed_all(self.seed * 1000 + self.env.rank + self.step)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.env.is_main, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0, desc=self.stage)
        sums: dict[str, Any] = {}
        count, t0, last_saved = 0, time.time(), -1
        data = iter(self.loader)
        try:
            while self.step < self.max_steps:
                batch = next(data)
                scalars = step_fn(batch, self.step)
                if self._stepped and self.scaler.is_enabled():
                    self.scaler.update()
                self._stepped = False
                self.step += 1
                for ema, source in self.emas.values():
                    ema.update(source, self.step)
                for k, v in scalars.items():
                    # Tensors stay on the device until a log step: no GPU sync per scalar per step.
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                bar.update(1)
                if self.step % self.log_every == 0 or self.step == self.max_steps:
                    means = self._reduce({k: float(v) / count for k, v in sums.items()})
                    means["steps_per_s"] = count / max(time.time() - t0, 1e-9)
                    if self.env.is_main:
                        self.scalars.log(self.step, means)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k in ("loss", "steps_per_s")})
                    sums, count, t0 = {}, 0, time.time()
                for hook in hooks or []:
                    hook(self.step)
                if self.step % self.ckpt_every == 0 or self.step == self.max_steps:
                    self.save_checkpoint()
                    last_saved = self.step
        except KeyboardInterrupt:
            if not self.env.distributed and last_saved != self.step and self.step > 0:
                log.warning("interrupted: saving a checkpoint at step %d", self.step)
                self.save_checkpoint()
            raise
        finally:
            bar.close()
        self._dump_hashes()

    def _claim(self) -> None:
        """Before the first step: refuse to train over an earlier run unless resuming or overwriting, then
        write the resolved config beside the run (for reproducibility)."""
        if self._claimed:
            return
        stale = claim_run_folder(self.out_dir, self._resumed, self.overwrite, self.env.is_main)
        if stale:
            log.warning("--overwrite: deleted %d checkpoint(s) of the earlier run in %s", stale, self.ckpt.folder)
        if self.env.is_main:
            import yaml

            saved = {k: v for k, v in self.cfg.items() if k != "overwrite"}  # never re-arm it from a copy
            atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
        self.env.barrier()
        self._claimed = True

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if not self.env.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return {k: float(v) / self.env.world_size for k, v in zip(keys, t.tolist())}

    def _dump_hashes(self) -> None:
        folder = os.environ.get(DUMP_ENV)
        if not folder:
            return
        mods = dict(self.models)
        mods.update({f"ema.{n}": e.model for n, (e, _) in self.emas.items()})
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(folder) / f"{self.stage}_rank{self.env.rank}.json", json.dumps(state_hashes(mods)))

    def close(self) -> None:
        self.scalars.close()
