"""Shortcuts through `pipelines/decode.py` for memory measurements of very large decodes (benchmarks only).

Tiles run one after another and free everything but their output core (written into a host buffer that
`decode_latent` zero-fills up front, so its pages count from the start), so a decode's peak memory is set by its
largest tile, not by how many tiles there are; and a statistics pass (which stops at the GroupNorm it measures)
never holds more than the final pass over the same tile. `memory_only()` therefore runs each distinct tile shape
once and skips the statistics passes (neutral statistics instead): the same allocations at a fraction of the time.
The decoded values are meaningless under it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator
from unittest import mock

import torch

from MedDiffusionLib.pipelines import decode

_all_tiles = decode._tiles


def one_tile_per_shape(spatial: tuple[int, ...], core: int, halo: int) -> list:
    """The decoder's tiles, one per distinct window shape."""
    seen: dict[tuple[int, ...], Any] = {}
    for window, tile_core in _all_tiles(spatial, core, halo):
        seen.setdefault(tuple(w.stop - w.start for w in window), (window, tile_core))
    return list(seen.values())


@contextlib.contextmanager
def memory_only() -> Iterator[None]:
    instances: list[decode._GlobalGroupNorms] = []
    init, run = decode._GlobalGroupNorms.__init__, decode._run

    def recording_init(self: decode._GlobalGroupNorms, norms: list) -> None:
        init(self, norms)
        instances.append(self)

    def skipping_run(stages: list, h: torch.Tensor) -> torch.Tensor:
        if instances and instances[-1].measure is not None:
            raise decode._StopForward
        return run(stages, h)

    def neutral_finish(self: decode._GlobalGroupNorms) -> None:
        norm = self.norms[self.measure]
        shape, device = (1, norm.num_groups), norm.weight.device
        self.stats[self.measure] = (torch.zeros(shape, device=device), torch.ones(shape, device=device))
        self.measure, self.sums = None, None

    with mock.patch.object(decode, "_tiles", one_tile_per_shape), mock.patch.object(decode, "_run", skipping_run), \
            mock.patch.object(decode._GlobalGroupNorms, "__init__", recording_init), \
            mock.patch.object(decode._GlobalGroupNorms, "finish_measure", neutral_finish):
        yield
