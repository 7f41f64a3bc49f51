"""Synthetic datasets: many volumes into one folder with a manifest, resumable, sharded over torchrun ranks.

What makes a file reproducible is fixed by the *plan*, which depends only on the run's settings:

* item i gets its anatomy from a smooth weighted round-robin over the mix, its size from the anatomy's own
  cycle through the requested sizes, and its seed from ``item_seed(base_seed, i)``;
* items of one latent size are cut into batches of ``batch_size`` in index order. Batch mates share each
  denoiser call, which changes an item's floats at rounding level (CPU and GPU matrix kernels block by batch
  size), so the batch, not the item, is the unit of work: ranks get whole batches, and a resumed batch is
  sampled again whole (only its missing volumes are decoded and written).

So any rank count, any kill-and-resume, gives the same files bit for bit; with ``batch_size`` 1 every file is also
exactly what ``meddiffusion generate --seed <its seed>`` writes. A volume counts as done only when its entry
(``.entries/<file>.json``, written after the volume's atomic write) matches the plan and the file's size and
sha256; rank 0 merges the entries into ``manifest.csv`` once every rank has finished.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..io.atomic import atomic_write_text
from ..io.volumes import WRITABLE_SUFFIXES, write_volume
from .common import resolve_seed
from .distributed import WorldInfo
from .generate import GenerationPipeline, resolve_latent_size

SETTINGS_FILE = "run.json"
MANIFEST_FILE = "manifest.csv"
ENTRIES_DIR = ".entries"
MANIFEST_COLUMNS = ("file", "index", "anatomy", "modality", "size_xyz", "spacing_xyz", "seed", "sampler", "steps",
                    "hu_range", "batch_size", "model_id", "sha256")
MAX_COUNT = 10_000_000  # file names and the plan are built up front; this bounds their memory

# Called with (volumes finished on this rank, counting the running batch's fraction; volumes this rank will make).
VolumeProgress = Callable[[float, int], None]


# --------------------------------------------------------------------------- the plan


def parse_anatomy_mix(specs: Sequence[str]) -> list[tuple[str, Fraction]]:
    """'ct-legs' or 'ct-legs:2' -> (name, weight); weights are relative and default to 1.

    Args:
        specs: 'NAME' or 'NAME:WEIGHT' each; a weight may be a fraction ('1/3') or a decimal.

    Returns:
        (name, weight) in the given order; names are not yet checked against a catalog.

    Raises:
        InputError: no specs, a weight that is not a number or outside (0, 1e6], an empty name, or a name given
            twice (case-insensitive).
    """
    mix: list[tuple[str, Fraction]] = []
    for spec in specs:
        name, _, raw = str(spec).partition(":")
        name = name.strip()
        try:
            weight = Fraction(raw.strip()) if raw.strip() else Fraction(1)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"anatomy weight in '{spec}' is not a number (write NAME or NAME:WEIGHT)") from None
        if not name or weight <= 0 or weight > 10**6:
            raise InputError(f"'{spec}': write NAME or NAME:WEIGHT with a positive weight up to 1e6")
        mix.append((name, weight))
    if not mix:
        raise InputError("give at least one anatomy")
    names = [n.lower() for n, _ in mix]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"anatomy given twice: {', '.join(dupes)} (write one NAME:WEIGHT each)")
    return mix


def weighted_order(weights: Sequence[Fraction], count: int) -> list[int]:
    """Smooth weighted round-robin: every prefix of the sequence is as close to the weights as whole items allow,
    so an interrupted or small run still has the requested mix. Exact arithmetic: the same on every machine.

    Args:
        weights: positive relative weights, one per anatomy.
        count: length of the sequence.

    Returns:
        ``count`` indices into ``weights`` (ties go to the lower index).
    """
    total = sum(weights, Fraction(0))
    current = [Fraction(0)] * len(weights)
    order = []
    for _ in range(count):
        for k, w in enumerate(weights):
            current[k] += w
        pick = max(range(len(weights)), key=lambda k: (current[k], -k))
        current[pick] -= total
        order.append(pick)
    return order


def item_seed(base_seed: int, index: int) -> int:
    """The seed of item `index`: independent streams from numpy's SeedSequence, in [0, 2^63)."""
    words = np.random.SeedSequence(entropy=int(base_seed), spawn_key=(int(index),)).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)


def model_id(pipe: GenerationPipeline) -> str:
    """Identifies what decides the pixels: the autoencoder and denoiser weights, the latent scaling and the
    diffusion schedule (the same weights in another file format give the same id)."""
    h = hashlib.sha256()
    for name, net in (("autoencoder", pipe.autoencoder), ("denoiser", pipe.denoiser)):
        for key, tensor in sorted(net.state_dict().items()):
            h.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([list(pipe.bundle.latent_range), pipe.bundle.diffusion], sort_keys=True).encode())
    return "sha256:" + h.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that decides the files; a folder is resumed only with the same spec (build it with `make_spec`).

    Attributes:
        anatomies: (catalog name, relative weight as a fraction string) per anatomy of the mix.
        sizes_xyz: sizes in voxels (X, Y, Z) each anatomy cycles through; () = its first trained size.
        count: volumes in the dataset.
        base_seed: item i's seed is ``item_seed(base_seed, i)``.
        sampler: one of `options.SAMPLERS`.
        steps: sampler steps (resolved: never None).
        batch_size: volumes per denoiser call.
        hu_range: (low, high) HU for CT anatomies, or None for [0, 1] intensities.
        suffix: file format, one of `io.volumes.WRITABLE_SUFFIXES`.
        model_id: `model_id` of the weights (or the name given to `make_spec`).
    """
    anatomies: tuple[tuple[str, str], ...]       # (catalog name, weight as a fraction string)
    sizes_xyz: tuple[tuple[int, int, int], ...]  # () = each anatomy's first trained size
    count: int
    base_seed: int
    sampler: str
    steps: int
    batch_size: int
    hu_range: Optional[tuple[float, float]]
    suffix: str
    model_id: str

    def settings(self) -> dict[str, Any]:
        """The settings as JSON values, written beside the dataset so that a resume can check them."""
        d = asdict(self)
        d["anatomies"] = [list(a) for a in self.anatomies]
        d["sizes_xyz"] = [list(s) for s in self.sizes_xyz]
        d["hu_range"] = list(self.hu_range) if self.hu_range else None
        return d


def make_spec(pipe: GenerationPipeline, anatomies: Sequence[str], count: int, base_seed: int,
              sizes_xyz: Sequence[Sequence[int]] = (), sampler: str = "dpmpp", steps: Optional[int] = None,
              batch_size: int = 1, hu_range: Optional[tuple[float, float]] = None, suffix: str = ".nrrd",
              model: Optional[str] = None) -> DatasetSpec:
    """Validate the request against the model (names, sizes, HU range) before any work starts.

    Args:
        pipe: the generation pipeline the dataset will be made with.
        anatomies: the mix, 'NAME' or 'NAME:WEIGHT' each (see `parse_anatomy_mix`).
        count: volumes, 1 .. 10,000,000.
        base_seed: seeds every item (see `item_seed`); None: random (then reported in the settings file).
        sizes_xyz: (X, Y, Z) voxel sizes, each on the model's grid; () = each anatomy's first trained size.
        sampler: see `GenerateOptions`.
        steps: see `GenerateOptions` (None: the sampler's default for the model).
        batch_size: volumes per denoiser call, 1 .. 1024 (batch 1 reproduces `meddiffusion generate` exactly).
        hu_range: see `GenerateOptions`.
        suffix: one of `io.volumes.WRITABLE_SUFFIXES`, with or without the dot.
        model: the id recorded for the weights; None: `model_id(pipe)` (hashes every weight once).

    Raises:
        InputError: a count, batch size or suffix out of range, or an anatomy, size, sampler, steps or HU range
            the model refuses. An untrained size only warns (UserWarning).
    """
    if not 1 <= int(count) <= MAX_COUNT:
        raise InputError(f"count must be between 1 and {MAX_COUNT}, got {count}")
    if not 1 <= int(batch_size) <= 1024:
        raise InputError(f"batch size must be between 1 and 1024, got {batch_size}")
    suffix = suffix if suffix.startswith(".") else f".{suffix}"
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(f"unknown volume format '{suffix}': use one of {', '.join(WRITABLE_SUFFIXES)}")
    mix = parse_anatomy_mix(anatomies)
    entries = [pipe.bundle.catalog.get(name) for name, _ in mix]
    # The pipeline's own checks (sampler, steps, HU range against each anatomy's modality); sizes below.
    checked = [pipe.check_inputs(e.name, None, sampler, steps, None, hu_range) for e in entries]
    sampler, hu = checked[0].sampler, checked[0].hu_range
    hu_pair = None if hu is None else (float(hu[0]), float(hu[1]))  # validated: two increasing numbers
    bad = [tuple(s) for s in sizes_xyz if len(s) != 3]
    if bad:
        raise InputError(f"size must have three numbers X x Y x Z, got {bad[0]}")
    sizes = tuple((int(x), int(y), int(z)) for x, y, z in sizes_xyz)
    multiple = pipe.denoiser.latent_multiple
    with warnings.catch_warnings(record=True) as caught:  # validates every (anatomy, size) pair once
        warnings.simplefilter("always")
        for entry in entries:
            for size in sizes or (None,):
                resolve_latent_size(entry, size, pipe.bundle.downsample, multiple)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    return DatasetSpec(anatomies=tuple((e.name, str(w)) for e, (_, w) in zip(entries, mix)), sizes_xyz=sizes,
                       count=int(count), base_seed=resolve_seed(base_seed), sampler=sampler,
                       steps=checked[0].steps_or_default(pipe.diffusion.timesteps), batch_size=int(batch_size),
                       hu_range=hu_pair, suffix=suffix, model_id=model or model_id(pipe))


@dataclass(frozen=True)
class PlannedVolume:
    """One volume of a dataset plan: index, anatomy, volume and latent sizes, seed and file name.

    Attributes:
        index: position in the dataset, from 0.
        anatomy: catalog name.
        size_xyz: volume size in voxels (X, Y, Z).
        latent: latent size (D, H, W) = (Z, X, Y) / downsample.
        seed: the item's seed, `item_seed(base_seed, index)`.
        file: file name inside the dataset folder ('<index>_<anatomy><suffix>', index zero-padded).
    """
    index: int
    anatomy: str
    size_xyz: tuple[int, int, int]
    latent: tuple[int, int, int]
    seed: int
    file: str


def plan_dataset(spec: DatasetSpec, pipe: GenerationPipeline) -> list[PlannedVolume]:
    """The volumes of a dataset in order (anatomies interleaved by weight); the same plan on every rank."""
    names = [name for name, _ in spec.anatomies]
    order = weighted_order([Fraction(w) for _, w in spec.anatomies], spec.count)
    entries = [pipe.bundle.catalog.get(n) for n in names]
    ds, multiple = pipe.bundle.downsample, pipe.denoiser.latent_multiple
    latents: dict[tuple[int, Any], tuple[int, int, int]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # make_spec already reported untrained sizes
        for k, entry in enumerate(entries):
            for size in spec.sizes_xyz or (None,):
                latents[(k, size)] = resolve_latent_size(entry, size, ds, multiple)
    seen = [0] * len(names)
    width = max(6, len(str(spec.count - 1)))
    plan = []
    for i, k in enumerate(order):
        size = spec.sizes_xyz[seen[k] % len(spec.sizes_xyz)] if spec.sizes_xyz else None
        seen[k] += 1
        lat = latents[(k, size)]
        plan.append(PlannedVolume(i, names[k], (lat[1] * ds, lat[2] * ds, lat[0] * ds), lat,
                                  item_seed(spec.base_seed, i), f"{i:0{width}d}_{names[k]}{spec.suffix}"))
    return plan


def group_batches(plan: Sequence[PlannedVolume], batch_size: int) -> list[list[PlannedVolume]]:
    """Items of one latent size, in index order, cut every `batch_size`; batches sorted by their first item.

    Returns:
        Batches of at most ``batch_size`` items sharing one latent size.
    """
    open_batches: dict[tuple[int, int, int], list[PlannedVolume]] = {}
    batches: list[list[PlannedVolume]] = []
    for item in plan:
        batch = open_batches.setdefault(item.latent, [])
        if not batch:
            batches.append(batch)
        batch.append(item)
        if len(batch) == batch_size:
            del open_batches[item.latent]
    return batches


def assign_batches(batches: Sequence[Sequence[PlannedVolume]], world_size: int) -> list[list[int]]:
    """Batch indices per rank, balancing the latent voxels to sample (longest first onto the least loaded rank);
    deterministic, so every rank computes the same assignment.

    Args:
        batches: from `group_batches`.
        world_size: number of ranks, >= 1.

    Returns:
        ``world_size`` lists of indices into ``batches``, each sorted.
    """
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    cost = [len(b) * math.prod(b[0].latent) for b in batches]
    for j in sorted(range(len(batches)), key=lambda j: (-cost[j], j)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += cost[j]
        shards[r].append(j)
    return [sorted(s) for s in shards]


# --------------------------------------------------------------------------- the folder


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_row(item: PlannedVolume, spec: DatasetSpec, pipe: GenerationPipeline) -> dict[str, Any]:
    entry = pipe.bundle.catalog.get(item.anatomy)
    return {"file": item.file, "index": item.index, "anatomy": item.anatomy, "modality": entry.modality,
            "size_xyz": "x".join(map(str, item.size_xyz)), "spacing_xyz": "x".join(f"{v:g}" for v in entry.spacing_for(item.latent)),
            "seed": item.seed, "sampler": spec.sampler, "steps": spec.steps,
            "hu_range": "" if spec.hu_range is None else f"{spec.hu_range[0]:g}:{spec.hu_range[1]:g}",
            "batch_size": spec.batch_size, "model_id": spec.model_id}


class DatasetFolder:
    """The output folder: run settings, one entry per finished volume, the manifest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.entries = self.root / ENTRIES_DIR

    def entry_path(self, item: PlannedVolume) -> Path:
        """The completion record of ``item``."""
        return self.entries / f"{item.file}.json"

    def check_settings(self, spec: DatasetSpec) -> None:
        """A folder holds one dataset: refuse to mix settings (that would make the manifest a lie).

        Raises:
            InputError: the folder's settings file is unreadable or differs from ``spec`` (the message lists the
                differing settings).
        """
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"'{path}' is unreadable ({exc}); remove it or use a new output folder") from None
        new = spec.settings()
        diff = [f"{k} {new.get(k)!r} (folder: {old.get(k)!r})" for k in sorted(set(new) | set(old))
                if new.get(k) != old.get(k)]
        if diff:
            raise InputError(f"'{self.root}' holds a dataset made with other settings: {'; '.join(diff)}. Rerun "
                             "with the folder's settings to resume it, or use a new --out-dir")

    def saved_base_seed(self) -> Optional[int]:
        """The base seed of the settings already in the folder, if any (a resume keeps it)."""
        try:
            return int(json.loads((self.root / SETTINGS_FILE).read_text(encoding="utf-8"))["base_seed"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def prepare(self, spec: DatasetSpec, plan: Sequence[PlannedVolume]) -> None:
        """Rank 0, before any work: settings file, and temporary files left by a killed run removed."""
        self.entries.mkdir(parents=True, exist_ok=True)
        if not (self.root / SETTINGS_FILE).is_file():
            atomic_write_text(self.root / SETTINGS_FILE, json.dumps(spec.settings(), indent=1) + "\n")
        # A killed run leaves atomic_write_path's temporary files (".<stem>.<8 hex>.tmp<suffix>") behind.
        stems = {self.root: {i.file[: len(i.file) - len(spec.suffix)] for i in plan},
                 self.entries: {i.file for i in plan}}
        for folder, planned in stems.items():
            for tmp in folder.glob(".*.tmp*"):
                stem = tmp.name[1:].rsplit(".tmp", 1)[0].rsplit(".", 1)[0]
                if stem in planned:
                    tmp.unlink(missing_ok=True)

    def is_complete(self, item: PlannedVolume, expected: dict[str, Any]) -> bool:
        """Whether ``item`` was written with these settings and its file still has the recorded checksum."""
        try:
            entry = json.loads(self.entry_path(item).read_text(encoding="utf-8"))
            volume = self.root / item.file
            if {k: entry.get(k) for k in expected} != expected or volume.stat().st_size != entry.get("bytes"):
                return False
            return file_sha256(volume) == entry.get("sha256")
        except (OSError, ValueError, AttributeError):
            return False

    def record(self, item: PlannedVolume, row: dict[str, Any]) -> None:
        """Record ``item`` as complete (with its file's checksum and size), atomically."""
        volume = self.root / item.file
        entry = dict(row, sha256=file_sha256(volume), bytes=volume.stat().st_size)
        atomic_write_text(self.entry_path(item), json.dumps(entry) + "\n")

    def write_manifest(self, plan: Sequence[PlannedVolume]) -> Path:
        """Write manifest.csv for the whole plan (atomically); returns its path."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for item in plan:
            writer.writerow(json.loads(self.entry_path(item).read_text(encoding="utf-8")))
        return atomic_write_text(self.root / MANIFEST_FILE, buf.getvalue())


# --------------------------------------------------------------------------- the run


@dataclass
class DatasetReport:
    """What a dataset run did: volumes in the dataset, skipped as complete, generated here, and the time taken."""
    total: int            # volumes in the dataset
    skipped: int          # already complete when this run started (all ranks)
    generated: int        # written by this rank
    elapsed_s: float
    manifest: Optional[Path]  # rank 0 only


def _sampling_progress(progress: Optional[VolumeProgress], done: int, n: int, todo: int, info: Any) -> None:
    if progress is not None and info.stage == "sampling":
        progress(done + n * 0.8 * info.fraction, todo)  # sampling is most of a volume's time


def generate_dataset(pipe: GenerationPipeline, spec: DatasetSpec, out_dir: str | Path,
                     world: Optional[WorldInfo] = None, progress: Optional[VolumeProgress] = None) -> DatasetReport:
    """Make every missing volume of `spec` in `out_dir`: this rank's share of the batches, then (rank 0) the
    manifest. Every rank must call it with the same spec.

    Args:
        pipe: the generation pipeline (the spec's model).
        spec: from `make_spec`.
        out_dir: the dataset folder (created; '~' expanded). A folder made with other settings is refused.
        world: this process's torchrun rank and world; None: a single process.
        progress: called with (volumes finished on this rank, fractional while sampling; volumes this rank will
            make).

    Returns:
        Totals for the dataset and this rank, and the manifest path (rank 0 only).

    Raises:
        InputError: other settings already in ``out_dir``, or (rank 0) volumes still missing after every rank
            finished; errors of `GenerationPipeline.generate_batch` and `write_volume` pass through.
    """
    start = time.perf_counter()
    world = world or WorldInfo()
    folder = DatasetFolder(out_dir)
    folder.check_settings(spec)
    plan = plan_dataset(spec, pipe)
    rows = {item.index: manifest_row(item, spec, pipe) for item in plan}
    missing: list[int] = []
    if world.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.prepare(spec, plan)
        missing = [item.index for item in plan if not folder.is_complete(item, rows[item.index])]
    missing_set = set(world.from_main(missing))  # one view of the folder for every rank
    batches = [b for b in group_batches(plan, spec.batch_size) if any(i.index in missing_set for i in b)]
    mine = [batches[j] for j in assign_batches(batches, world.world_size)[world.rank]]
    todo = sum(1 for b in mine for i in b if i.index in missing_set)
    done = 0
    if progress is not None:
        progress(0.0, todo)
    for batch in mine:
        wanted = [i for i in batch if i.index in missing_set]
        on_step = functools.partial(_sampling_progress, progress, done, len(wanted), todo)

        results = pipe.generate_batch([i.anatomy for i in batch], batch[0].size_xyz, spec.sampler, spec.steps,
                                      [i.seed for i in batch], spec.hu_range, progress=on_step,
                                      only=[i.index in missing_set for i in batch])
        for k, (item, result) in enumerate(zip(wanted, results), 1):
            write_volume(result.image, folder.root / item.file)
            folder.record(item, rows[item.index])
            if progress is not None:
                progress(done + len(wanted) * 0.8 + k * 0.2, todo)
        done += len(wanted)
    world.barrier()
    manifest = None
    if world.is_main:
        incomplete = [i.file for i in plan if not folder.entry_path(i).is_file()]
        if incomplete:
            raise InputError(f"{len(incomplete)} volume(s) were not written (e.g. {incomplete[0]}); rerun to resume")
        manifest = folder.write_manifest(plan)
    return DatasetReport(len(plan), len(plan) - len(missing_set), done, time.perf_counter() - start, manifest)


__all__ = ["DatasetSpec", "DatasetFolder", "DatasetReport", "PlannedVolume", "generate_dataset", "make_spec",
           "plan_dataset", "group_batches", "assign_batches", "item_seed", "model_id", "parse_anatomy_mix",
           "weighted_order", "MANIFEST_FILE", "SETTINGS_FILE", "MANIFEST_COLUMNS"]
