"""Stand-ins for the configuration objects found in the authors' checkpoints, and their conversion to plain data.

OmegaConf, argparse and Lightning containers are mapped by the restricted unpickler to the small classes here:
they only collect the pickled state (omegaconf is never imported) and :func:`to_plain` turns them into plain
dicts/lists afterwards.
"""
from __future__ import annotations

import collections
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["OmegaDictConfig", "OmegaListConfig", "OmegaValueNode", "OmegaMetadata", "NamespaceStandIn",
           "AttributeDictStandIn", "TypeMarker", "StandIn", "OMEGA_NODE_NAMES", "TYPING_NAMES", "to_plain",
           "MAX_NESTING"]

MAX_NESTING = 200  # containers nested deeper than this are refused (no checkpoint comes close)


# --------------------------------------------------------------------------------------------- stand-ins
class StandIn:
    """Base of the stand-ins: created by NEWOBJ (``cls.__new__``), filled by BUILD (``__setstate__``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Some pickles call the class (REDUCE) instead of NEWOBJ; keep positional args for inspection.
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        # Only record the state: nothing in it is interpreted as code.
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        self._state = state


class OmegaDictConfig(StandIn):
    """Stand-in for ``omegaconf.DictConfig``: content in ``_state['_content']`` (key -> node)."""


class OmegaListConfig(StandIn):
    """Stand-in for ``omegaconf.ListConfig``: content in ``_state['_content']`` (list of nodes)."""


class OmegaValueNode(StandIn):
    """Stand-in for the OmegaConf value nodes (``AnyNode``, ``IntegerNode``...): value in ``_state['_val']``."""


class OmegaMetadata(StandIn):
    """Stand-in for ``omegaconf.base.Metadata`` / ``ContainerMetadata`` (types, flags: not needed)."""


class NamespaceStandIn(StandIn):
    """Stand-in for ``argparse.Namespace``: its ``__dict__`` arrives as the state."""


class AttributeDictStandIn(dict):
    """Stand-in for Lightning's ``AttributeDict`` (a dict subclass pickled with SETITEMS)."""

    def __setstate__(self, state: Any) -> None:  # pragma: no cover - AttributeDict has no extra state
        if isinstance(state, dict):
            self.update(state)


class TypeMarker:
    """A type annotation referenced by OmegaConf metadata (``typing.Any``...); kept as its name only."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __repr__(self) -> str:
        return f"<type {self.qualname}>"


OMEGA_NODE_NAMES = (
    "AnyNode", "ValueNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode",
    "BytesNode", "PathNode", "InterpolationResultNode", "UnionNode",
)
TYPING_NAMES = ("Any", "Dict", "List", "Tuple", "Optional", "Union", "Sequence", "Mapping", "Set")


# ------------------------------------------------------------------------------------------- conversion
def to_plain(obj: Any) -> Any:
    """Replace stand-ins (and ``defaultdict``) by plain dicts/lists/values, recursively.

    Tensors and ``OrderedDict`` state dicts are kept as they are; shared objects stay shared.
    """
    memo: dict[int, Any] = {}
    return _plain(obj, memo)


def _node_content(node: StandIn) -> Any:
    state = getattr(node, "_state", None)
    return state if isinstance(state, dict) else {}


def _plain(obj: Any, memo: dict[int, Any], depth: int = 0) -> Any:
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None), TypeMarker)):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if depth > MAX_NESTING:
        raise CheckpointError(f"the checkpoint nests containers more than {MAX_NESTING} levels deep")
    depth += 1
    if isinstance(obj, OmegaValueNode):
        out = _plain(_node_content(obj).get("_val"), memo, depth)
    elif isinstance(obj, OmegaDictConfig):
        content = _node_content(obj).get("_content")
        if isinstance(content, dict):
            out = {}
            memo[key] = out
            for k, v in content.items():
                out[_plain(k, memo, depth)] = _plain(v, memo, depth)
        else:  # None, "???" (missing) or an interpolation string
            out = content
    elif isinstance(obj, OmegaListConfig):
        content = _node_content(obj).get("_content")
        if isinstance(content, list):
            out = []
            memo[key] = out
            out.extend(_plain(v, memo, depth) for v in content)
        else:
            out = content
    elif isinstance(obj, NamespaceStandIn):
        out = {}
        memo[key] = out
        for k, v in _node_content(obj).items():
            out[k] = _plain(v, memo, depth)
    elif isinstance(obj, OmegaMetadata):
        out = None
    elif isinstance(obj, collections.OrderedDict):
        out = collections.OrderedDict()
        memo[key] = out
        for k, v in obj.items():
            out[k] = _plain(v, memo, depth)
    elif isinstance(obj, dict):  # dict, defaultdict, AttributeDict stand-in -> dict
        out = {}
        memo[key] = out
        for k, v in obj.items():
            out[_plain(k, memo, depth)] = _plain(v, memo, depth)
    elif isinstance(obj, list):
        out = []
        memo[key] = out
        out.extend(_plain(v, memo, depth) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_plain(v, memo, depth) for v in obj)
    else:
        out = obj
    memo[key] = out
    return out


