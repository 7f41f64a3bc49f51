"""YAML training configs: loading, ``base:`` inheritance and ``key.sub=value`` command-line overrides."""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from MedDiffusionLib.errors import InputError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 insists on ``3.0e-4``; everyone writes 3e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested dicts merge key by key (lists are replaced, not concatenated)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config; ``base: other.yaml`` (relative to this file) is loaded first and overridden.

    Relative paths inside the config (data, checkpoints) are relative to the working directory, as on the
    command line: run from the repository root.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"Config file '{p}' does not exist")
    try:
        cfg = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"Config file '{p}' is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"Config file '{p}' must hold a mapping at the top level")
    base = cfg.pop("base", None)
    if base:
        cfg = deep_merge(load_config(p.parent / base), cfg)
    return cfg


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_key(cfg, "train.lr", 1e-4)`` creating intermediate mappings as needed."""
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def get_key(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (numbers, lists, null, booleans)."""
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_key(out, key.strip(), value)
    return out
