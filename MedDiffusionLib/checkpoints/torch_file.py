"""Read ``torch.save`` files (zip and legacy layouts) without torch.load, so that nothing in them can run.

``torch.load`` decides what a file is with its own zip reader and hands TorchScript archives to
``torch.jit.load``, which runs the archive's code; checking the file first with another reader left a gap that
a crafted archive slipped through (see :mod:`.zip_archive`). Here the file is read once into memory, that
buffer is validated (:func:`.zip_archive.read_zip_records` or the legacy pickle sequence), its pickle is read
by the restricted unpickler of :mod:`.safe_pickle`, and tensors are built on views of the validated bytes.
torch never opens the file, so what was checked is exactly what is used.

Memory: the file's size (tensors share the buffer) plus the objects of a pickle capped at
:data:`MAX_PICKLE_BYTES`. A storage must be exactly as large as the bytes the file holds for it.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .pickle_standins import to_plain
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, pickle_budget
from .zip_archive import ZIP_MAGIC, ZipLayoutError, read_zip_records

__all__ = ["safe_torch_load", "MAX_PICKLE_BYTES"]

# The pickle of a checkpoint only describes tensors (their bytes lie outside it): an official BiFlowNet file
# with EMA and optimizer state has well under 1 MiB. The cap bounds the objects a pickle can create.
MAX_PICKLE_BYTES = 16 << 20

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Records torch.save writes (after the archive's top folder). Anything else is refused, which also refuses
# every TorchScript layout (code/, constants.pkl, .data/ts_code/, bytecode.pkl, model.json...).
_PLAIN_RECORDS = {"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                  ".data/serialization_id", ".data/version"}
_STORAGE_RECORD = re.compile(r"data/(\d{1,12})")
_SCRIPT_MARKERS = re.compile(r"(code|constants|extra|libs|\.data/ts_code)/|constants\.pkl$|bytecode\.pkl$|"
                             r"model\.json$|attributes\.pkl$|mobile_info\.json$")


class _Refused(Exception):
    """A structural reason to refuse the file (message for the user)."""


def _read_once(p: Path) -> bytearray:
    """The whole file, read through one descriptor (what is validated is what is used)."""
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        got = fh.readinto(buf)
        if got != size or fh.read(1):
            raise CheckpointError(f"Checkpoint file '{p}' changed while it was being read")
    return buf


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise _Refused("a tensor names an unknown storage type")
    return dtype


def _view_storage(buf: bytearray, offset: int, nbytes: int, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """A storage on ``buf[offset:offset+nbytes]`` (shared, not copied, unless misaligned for ``dtype``)."""
    if nbytes == 0:
        untyped = torch.UntypedStorage(0)
    else:
        view = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
        if view.data_ptr() % torch._utils._element_size(dtype):
            view = view.clone()
        untyped = view.untyped_storage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _unpickler(data: bytes, persistent_load: Any) -> RestrictedUnpickler:
    u = RestrictedUnpickler(io.BytesIO(data), budget=pickle_budget(len(data)))
    u.persistent_load = persistent_load  # type: ignore[method-assign]  # pickle's documented hook; typeshed has it as a method
    return u


def _as_text(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


# ------------------------------------------------------------------------------------------- zip layout
def _check_record_name(name: str) -> None:
    inner = name.split("/", 1)[-1]
    if _SCRIPT_MARKERS.search(inner):
        raise _Refused("it is a TorchScript archive, which contains code; expected a plain PyTorch "
                       "checkpoint (state dict)")
    if "/" not in name or (inner not in _PLAIN_RECORDS and not _STORAGE_RECORD.fullmatch(inner)):
        raise _Refused(f"it holds an unexpected record '{name}' (not a torch.save checkpoint)")


def _load_zip(buf: bytearray) -> Any:
    records = read_zip_records(buf, _check_record_name)
    prefix = next(iter(records), "").split("/", 1)[0] + "/"
    rel: dict[str, Any] = {}
    for name, rec in records.items():
        if not name.startswith(prefix):
            raise _Refused("records are not in one top folder (not a torch.save archive)")
        rel[name[len(prefix):]] = rec
    if "byteorder" in rel and bytes(buf[rel["byteorder"].offset:][:rel["byteorder"].size]) != b"little":
        raise _Refused("it was saved big-endian, which is not supported")
    pkl = rel.get("data.pkl")
    if pkl is None:
        raise _Refused("it has no data.pkl record")
    if pkl.size > MAX_PICKLE_BYTES:
        raise _Refused(f"its pickle is {pkl.size} bytes (more than {MAX_PICKLE_BYTES}); checkpoint pickles "
                       "only describe tensors")
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(pid: Any) -> torch.storage.TypedStorage:
        if not isinstance(pid, tuple) or len(pid) != 5 or _as_text(pid[0]) != "storage":
            raise _Refused("a tensor reference is malformed")
        _, storage_type, key, location, numel = pid
        key, location = _as_text(key), _as_text(location)
        dtype = _storage_dtype(storage_type)
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise _Refused("a tensor reference is malformed")
        if key in storages:
            if storages[key].dtype != dtype:
                raise _Refused(f"storage {key} is referenced with two element types")
            return storages[key]
        rec = rel.get(f"data/{key}")
        if rec is None:
            raise _Refused(f"a tensor refers to storage '{key}', which the file does not hold")
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes != rec.size:
            raise _Refused(f"storage '{key}' claims {nbytes} bytes but the file holds {rec.size}")
        storages[key] = _view_storage(buf, rec.offset, nbytes, dtype)
        return storages[key]

    return _unpickler(bytes(buf[pkl.offset:pkl.offset + pkl.size]), persistent_load).load()


# ---------------------------------------------------------------------------------------- legacy layout
def _load_legacy(buf: bytearray) -> Any:
    """``torch.save(..., _use_new_zipfile_serialization=False)``: pickles, then each storage's bytes."""
    pos = 0

    def next_pickle(persistent_load: Any = None) -> Any:
        nonlocal pos
        data = io.BytesIO(bytes(buf[pos:pos + MAX_PICKLE_BYTES]))
        u = RestrictedUnpickler(data, budget=pickle_budget(len(data.getbuffer())))
        u.persistent_load = persistent_load  # type: ignore[method-assign]  # pickle's documented hook; typeshed has it as a method
        try:
            value = u.load()
        except EOFError:
            raise _Refused(f"a pickle is truncated or larger than {MAX_PICKLE_BYTES} bytes") from None
        pos += data.tell()
        return value

    if next_pickle() != _LEGACY_MAGIC or next_pickle() != _LEGACY_PROTOCOL:
        raise _Refused("not a PyTorch checkpoint (unknown header)")
    info = next_pickle()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _Refused("it was saved big-endian or with an unknown layout, which is not supported")
    claims: dict[str, tuple[torch.storage.TypedStorage, int, torch.Tensor]] = {}
    budget = [len(buf) - pos]

    def persistent_load(pid: Any) -> torch.storage.TypedStorage:
        if not isinstance(pid, tuple) or len(pid) != 6 or _as_text(pid[0]) != "storage" or pid[5] is not None:
            raise _Refused("a tensor reference is malformed (or uses a storage view, which is not supported)")
        _, storage_type, key, location, numel, _ = pid
        key, dtype = _as_text(key), _storage_dtype(storage_type)
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Refused("a tensor reference is malformed")
        if key in claims:
            return claims[key][0]
        nbytes = numel * torch._utils._element_size(dtype)
        budget[0] -= nbytes + 8
        if budget[0] < 0:  # checked before allocating: the storages must fit in what is left of the file
            raise _Refused("its tensors claim more bytes than the file holds")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        typed = torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)
        claims[key] = (typed, numel, raw)
        return typed

    obj = next_pickle(persistent_load)
    keys = next_pickle()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(claims) or len(keys) != len(claims):
        raise _Refused("its list of storages does not match the tensors")
    for key in keys:
        _, numel, raw = claims[key]
        nbytes = raw.numel()
        if pos + 8 + nbytes > len(buf) or struct.unpack_from("<q", buf, pos)[0] != numel:
            raise _Refused(f"storage '{key}' is truncated or has the wrong size")
        if nbytes:
            raw.copy_(torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=pos + 8))
        pos += 8 + nbytes
    if pos != len(buf):
        raise _Refused("data follows the last storage (an appended file?)")
    return obj


# ------------------------------------------------------------------------------------------- public API
def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu", plain: bool = True) -> Any:
    """Load a ``torch.save``/Lightning checkpoint without executing code from it; tensors are on the CPU.

    ``plain=True`` converts OmegaConf configs, ``argparse.Namespace`` and ``defaultdict`` to plain
    dicts/lists. Raises :class:`CheckpointError` (one line) when the file is missing, unreadable, corrupt,
    structurally ambiguous, TorchScript, or references anything outside the allow-list (naming it).
    """
    if map_location not in (None, "cpu") and map_location != torch.device("cpu"):
        raise CheckpointError("safe_torch_load loads onto the CPU; move the tensors afterwards")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"Checkpoint file not found: '{p}'")
    if p.is_dir():
        raise CheckpointError(f"Checkpoint path '{p}' is a folder, expected a file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"Checkpoint file '{p}' is not readable (permissions)")
    try:
        buf = _read_once(p)
    except OSError as exc:
        raise CheckpointError(f"Cannot read checkpoint '{p}': {exc}") from exc
    if not buf:
        raise CheckpointError(f"Checkpoint file '{p}' is empty")
    try:
        if buf[:4] == ZIP_MAGIC:
            obj = _load_zip(buf)
        elif buf[:1] == b"\x80":
            obj = _load_legacy(buf)
        else:
            raise CheckpointError(f"Checkpoint '{p}' is corrupt or not a PyTorch checkpoint (unknown format)")
    except (_Refused, ZipLayoutError) as exc:
        raise CheckpointError(f"Refusing to load '{p}': {exc}") from None
    except UnsafePickleError as exc:
        raise CheckpointError(
            f"Refusing to load '{p}': {exc.reason}. Only tensors, plain containers and known configuration "
            "objects (OmegaConf, argparse) are accepted") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            RuntimeError, struct.error, OverflowError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Checkpoint '{p}' is corrupt or not a PyTorch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return to_plain(obj) if plain else obj
