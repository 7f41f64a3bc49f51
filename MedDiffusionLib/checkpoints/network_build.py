"""Build a network from a configuration read from a file, without trusting the configuration.

A file's config decides how much memory the constructor allocates: ``n_codes=2**28`` in a 253-byte file made
the autoencoder allocate 7.6 GB before anything failed, and negative or fractional widths ended in long torch
tracebacks. So a stored config goes through three gates before any real allocation:

1. every field is checked against :data:`CONFIG_FIELDS` (type and range; unknown fields refused), giving a
   one-line error that names the field;
2. the network is built on the ``meta`` device (shapes only, no memory) and its tensors are compared with
   what the file holds: names and shapes when the file lists them, and in any case the element count;
3. only then is the real network built and the weights loaded.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["CONFIG_FIELDS", "validate_config", "build_network", "network_class"]

_Check = Callable[[Any], Optional[str]]  # returns a complaint, or None when the value is fine


def _int(lo: int, hi: int) -> _Check:
    def check(v: Any) -> str | None:
        if type(v) is not int:
            return f"must be an integer, got {v!r}"
        return None if lo <= v <= hi else f"must be in {lo}..{hi}, got {v}"
    return check


def _pow2(lo: int, hi: int) -> _Check:
    base = _int(lo, hi)
    return lambda v: base(v) or (None if v & (v - 1) == 0 else f"must be a power of two, got {v}")


def _float(lo: float, hi: float) -> _Check:
    def check(v: Any) -> str | None:
        if type(v) not in (int, float) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        return None if lo < v <= hi else f"must be in ({lo:g}, {hi:g}], got {v:g}"
    return check


def _ints(lo: int, hi: int, min_len: int, max_len: int) -> _Check:
    item = _int(lo, hi)

    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            return f"must be a list of {min_len}..{max_len} integers, got {v!r}"
        values = [int(x) if type(x) is bool else x for x in v]
        bad = next((msg for msg in map(item, values) if msg), None)
        return f"entries {bad}" if bad else None
    return check


def _optional(inner: _Check) -> _Check:
    return lambda v: None if v is None else inner(v)


def _int_or_ints(lo: int, hi: int, n: int) -> _Check:
    one, many = _int(lo, hi), _ints(lo, hi, n, n)
    return lambda v: many(v) if isinstance(v, (list, tuple)) else one(v)


# The one place for what a stored network config may contain. Upper bounds are generous sanity limits that
# keep the meta-device build cheap (number of modules); memory is bounded by gate 2, not by these.
_BIFLOWNET_FIELDS: dict[str, _Check] = {
    "dim": _int(1, 4096), "channels": _int(1, 1024), "num_classes": _optional(_int(1, 65536)),
    "patch_size": _int(1, 64), "dim_mults": _ints(1, 64, 1, 8), "use_attn": _ints(0, 1, 1, 8),
    "resnet_groups": _int(1, 4096), "dit_num_heads": _int(1, 1024), "attn_heads": _int(1, 1024),
    "attn_dim_head": _int(1, 4096), "sub_volume_size": _int_or_ints(1, 1024, 3), "num_mid_dit": _int(0, 64),
    "vq_size": _int(1, 65536), "mlp_ratio": _float(0.0, 64.0),
}
CONFIG_FIELDS: dict[str, dict[str, _Check]] = {
    "autoencoder": {
        "n_hiddens": _int(1, 4096), "downsample": _pow2(2, 64), "embedding_dim": _int(1, 1024),
        "n_codes": _int(1, 1 << 20), "num_groups": _int(1, 4096), "image_channels": _int(1, 64),
    },
    "biflownet": _BIFLOWNET_FIELDS,
    "controlnet": {
        "denoiser_config": lambda v: None if isinstance(v, Mapping) else "must be a mapping",
        "condition_channels": _int(1, 64), "image_downsample": _pow2(1, 64),
        "hidden": _optional(_ints(1, 4096, 0, 6)), "conditioning_scale": _float(-1e3, 1e3),
    },
}


def network_class(kind: str) -> type[nn.Module]:
    """The class stored under ``kind`` (imported lazily: models depend on nothing here)."""
    if kind == "autoencoder":
        from ..models.autoencoder import PatchVolumeAutoencoder

        return PatchVolumeAutoencoder
    if kind == "biflownet":
        from ..models.biflownet import BiFlowNet

        return BiFlowNet
    if kind == "controlnet":
        from ..models.controlnet import ControlNet

        return ControlNet
    raise CheckpointError(f"unknown network kind '{kind}'; expected one of {', '.join(CONFIG_FIELDS)}")


def _check_fields(fields: Mapping[str, _Check], config: Mapping[str, Any], where: str, prefix: str) -> None:
    unknown = sorted(str(k) for k in config if k not in fields)
    if unknown:
        raise CheckpointError(f"{where}: unknown config field(s) {', '.join(prefix + k for k in unknown)}")
    for key, value in config.items():
        complaint = fields[key](value)
        if complaint:
            raise CheckpointError(f"{where}: config field {prefix}{key} {complaint}")


def validate_config(kind: str, config: Any, where: str) -> dict[str, Any]:
    """``config`` checked against :data:`CONFIG_FIELDS`; CheckpointError naming the first bad field."""
    if kind not in CONFIG_FIELDS:
        raise CheckpointError(f"{where}: unknown network kind '{kind}'")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: the {kind} config must be a mapping")
    _check_fields(CONFIG_FIELDS[kind], config, where, "")
    if kind == "controlnet":
        _check_fields(_BIFLOWNET_FIELDS, config["denoiser_config"], where, "denoiser_config.")
    return dict(config)


def _construct(cls: type[nn.Module], kind: str, config: Mapping[str, Any], where: str) -> nn.Module:
    try:
        return cls(**config)
    except Exception as exc:  # the constructors' own checks (divisibility...) and anything torch raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: cannot build the {kind} from its config: {first}") from None


def build_network(kind: str, config: Any, where: str, *, file_numel: int,
                  file_shapes: Mapping[str, tuple[int, ...]] | None = None) -> nn.Module:
    """The network for a stored ``config``, built only if the file holds every weight it would allocate.

    ``file_numel``: elements of all tensors the file holds. ``file_shapes``: name -> shape when the file uses
    the network's own names (our safetensors files), compared exactly before allocating.
    """
    conf = validate_config(kind, config, where)
    cls = network_class(kind)
    with torch.device("meta"):
        ghost = _construct(cls, kind, conf, where)
    if file_shapes is not None:
        own = {k: tuple(v.shape) for k, v in ghost.state_dict().items()}
        missing = sorted(set(own) - set(file_shapes))
        unexpected = sorted(set(file_shapes) - set(own))
        wrong = sorted(f"{k} {file_shapes[k]} vs {own[k]}" for k in set(own) & set(file_shapes)
                       if tuple(file_shapes[k]) != own[k])
        if missing or unexpected or wrong:
            parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
                     for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", wrong))
                     if keys]
            raise CheckpointError(f"{where}: the weights do not match the stored {kind} config: " + "; ".join(parts))
    needed = sum(t.numel() for t in ghost.parameters()) + sum(t.numel() for t in ghost.buffers())
    del ghost
    if needed > file_numel + (1 << 16):  # slack: small non-persistent buffers the file does not store
        raise CheckpointError(f"{where}: the {kind} config needs {needed:,} weights but the file holds only "
                              f"{file_numel:,}")
    return _construct(cls, kind, conf, where)
