"""YAML for files that may come from anyone (``model.yaml``): no aliases, bounded size and depth.

Imports no torch: the Slicer panel reads manifests with it too (:mod:`MedDiffusionLib.bundle_summary`).

``yaml.safe_load`` builds no objects but plain data, yet an alias bomb (``a: &a [x, x]``, ``b: &b [*a, *a]``...)
of 600 bytes expands into billions of references: anything that walks the result (printing it, copying it,
converting it to JSON) then took 11 GB and 53 s. Bundles never need aliases, so the reader refuses them, and
the writer below never emits them (PyYAML would for an object that appears twice).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError

__all__ = ["MAX_YAML_BYTES", "read_yaml_file", "dump_yaml"]

MAX_YAML_BYTES = 1 << 20  # a bundle manifest is a few KiB


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (``*name``) and merge keys built from them."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - see class docstring
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in this file",
                                              event.start_mark)
        return super().compose_node(parent, index)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # noqa: D102 - write repeated objects out in full
        return True


def read_yaml_file(path: str | os.PathLike[str], max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse a YAML file that may be hostile; CheckpointError (one line, naming the file) when refused."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise CheckpointError(f"Cannot read '{p}': {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"'{p}' is larger than {max_bytes} bytes; a model manifest is a few KiB")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise CheckpointError(f"'{p}' is not UTF-8 text") from None
    except RecursionError:
        raise CheckpointError(f"'{p}' nests too deeply") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"'{p}' is not valid YAML{line}: {problem}") from None


def dump_yaml(data: Any) -> str:
    """YAML text for ``data`` without anchors/aliases (so that :func:`read_yaml_file` reads it back)."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None)
