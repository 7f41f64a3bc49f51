"""Our own network file format: safetensors weights + the constructor config in the file's metadata.

safetensors holds only raw tensors and a JSON header, so loading can never run code, and the metadata makes a
file self-describing: ``{"format": "meddiffusion", "format_version": "1", "kind": ..., "config": "<json>",
"extra": "<json>"}`` (safetensors metadata values must be strings, hence the JSON inside).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .network_build import build_network, network_class
from .safetensors_file import MAX_HEADER_BYTES, read_file, read_header, tensors_from

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "KINDS", "save_network", "load_network", "read_network_metadata",
    "is_safetensors_file", "network_class",
]

FORMAT_NAME = "meddiffusion"
FORMAT_VERSION = "1"
KINDS = ("autoencoder", "biflownet", "controlnet")


def is_safetensors_file(path: str | os.PathLike[str]) -> bool:
    """True if the file starts like safetensors: 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"


def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights) and non-contiguous ones: copy those.
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (0, id(t))
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def save_network(model: nn.Module, path: str | os.PathLike[str], kind: str,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (its ``.config`` and weights) to ``path`` atomically; returns the path.

    Args:
        model: a network with a ``.config`` dict of its constructor arguments.
        path: the safetensors file to write.
        kind: one of `KINDS`.
        extra: JSON values stored in the metadata (e.g. where the weights came from).

    Raises:
        CheckpointError: an unknown kind, a model without ``.config``, or a config / extra that is not JSON.
    """
    from safetensors.torch import save_file

    from ..io.atomic import atomic_write_path

    if kind not in KINDS:
        raise CheckpointError(f"unknown network kind '{kind}'; expected one of {', '.join(KINDS)}")
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"cannot save a {type(model).__name__}: it has no .config dict of constructor arguments")
    try:
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
                    "config": json.dumps(dict(config), sort_keys=True),
                    "extra": json.dumps(dict(extra or {}), sort_keys=True)}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the {kind} config or extra information is not JSON-serialisable: {exc}") from exc
    tensors = _plain_tensors(model)
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _parse_metadata(p: Path, raw: dict[str, str]) -> dict[str, Any]:
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"'{p}' is a safetensors file but not a MedDiffusion network (no format metadata)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{p}' uses format version {raw.get('format_version')!r}; this version reads "
                              f"{FORMAT_VERSION!r} (update MedDiffusion)")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"'{p}' holds an unknown network kind {kind!r}")
    try:
        config = json.loads(raw.get("config", "{}"))
        extra = json.loads(raw.get("extra", "{}") or "{}")
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"'{p}': the stored configuration is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(extra, dict):
        raise CheckpointError(f"'{p}': the stored configuration is not a JSON object")
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind, "config": config, "extra": extra}


def _checked_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"Network file not found: '{p}'")
    if not is_safetensors_file(p):
        raise CheckpointError(f"'{p}' is not a safetensors file")
    return p


def read_network_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed metadata of one of our files: format, format_version, kind, config (dict), extra (dict)."""
    p = _checked_path(path)
    return _parse_metadata(p, read_header(p).metadata)


def _device_str(map_location: Any) -> str:
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    raise CheckpointError(f"map_location must be a device name or torch.device, got {type(map_location).__name__}")


def load_network(path: str | os.PathLike[str], map_location: Any = "cpu",
                 expected_kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network stored in one of our files: (model in eval mode on ``map_location``, metadata).

    The file is read once; the config is validated and the network's shapes are compared with the header
    before anything is allocated (see :mod:`.network_build`).

    Args:
        path: one of our safetensors files.
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).
        expected_kind: refuse a file of another kind (one of `KINDS`); None: any.

    Returns:
        (model, metadata): the metadata as `read_network_metadata` gives it.

    Raises:
        CheckpointError: a file that is missing, malformed, of another kind, or whose config or weights do not
            build the network.
    """
    p = _checked_path(path)
    header, buf = read_file(p)
    meta = _parse_metadata(p, header.metadata)
    kind = meta["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"'{p}' holds a {kind}, expected a {expected_kind}")
    model = build_network(kind, meta["config"], f"'{p}'", file_numel=header.numel,
                          file_shapes={k: e.shape for k, e in header.tensors.items()})
    state = tensors_from(header, buf)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; shapes and names were checked above
        raise CheckpointError(f"'{p}': the weights do not match the stored {kind} config: "
                              f"{str(exc).strip().splitlines()[0]}") from None
    del state, buf
    return model.to(_device_str(map_location)).eval(), meta
