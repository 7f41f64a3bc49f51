"""Where this process stands in a torchrun job: rank, world size, its device, and the few collectives batch
generation and training need (a barrier, rank 0's value for everyone). A plain `python` run is a world of one.

One GPU per rank from LOCAL_RANK, NCCL on GPU, gloo on CPU. Training/ uses this too (its DDP setup is this one).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError
from .common import resolve_device

# Ranks wait for each other only at the start and at the end of a run; the end waits for the slowest shard, which
# may be a long volume behind. torch's default (30 min) would abort a healthy run.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class WorldInfo:
    """This process's place in the job; a default one is a single CPU process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes shared files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            torch.distributed.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (e.g. a randomly drawn base seed)."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not an integer") from None


def init_world(device: Optional[str] = "auto", timeout: datetime.timedelta = BARRIER_TIMEOUT) -> WorldInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (if any) and pick this rank's device
    (`resolve_device`'s rule): 'auto' and 'cuda' mean cuda:LOCAL_RANK under torchrun; an explicit 'cuda:N' or
    'cpu' is kept. ``timeout``: how long a collective may wait for the slowest rank."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    name = str(device or "auto").lower()
    dev = resolve_device(name)  # an unavailable CUDA request is a one-line error here
    if dev.type == "cuda" and name in ("auto", "cuda") and world > 1:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): start at "
                             "most one process per GPU (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
    info = WorldInfo(rank, world, local, dev)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev if dev.index is not None else torch.device("cuda", 0))
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        info.owns_group = True
    return info
