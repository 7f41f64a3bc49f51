"""Where this process stands in a torchrun job: rank, world size, its device, and the few collectives batch
generation needs (a barrier, rank 0's value for everyone). A plain `python` run is a world of one.

The same rules as Training's DDP setup (one GPU per rank from LOCAL_RANK, NCCL on GPU, gloo on CPU); the library
keeps its own copy because it must not import Training/.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError

# Ranks wait for each other only at the start and at the end of a run; the end waits for the slowest shard, which
# may be a long volume behind. torch's default (30 min) would abort a healthy run.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
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


def init_world(device: Optional[str] = "auto") -> WorldInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (if any) and pick this rank's device:
    'auto' and 'cuda' mean cuda:LOCAL_RANK under torchrun; an explicit 'cuda:N' or 'cpu' is kept."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    name = str(device or "auto").lower()
    use_cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if use_cuda and name in ("auto", "cuda"):
        if world > 1 and local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): start at "
                             "most one process per GPU (torchrun --nproc_per_node)")
        name = f"cuda:{local}" if world > 1 else name
    info = WorldInfo(rank, world, local, name)
    if world > 1 and not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(torch.device(name if ":" in name else "cuda:0"))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)
        info.owns_group = True
    return info
