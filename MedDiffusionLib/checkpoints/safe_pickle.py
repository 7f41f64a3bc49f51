"""Load PyTorch checkpoint files without ever running code stored in them.

A ``.pt``/``.ckpt`` file is a pickle, and unpickling may call any importable function (``os.system``...).
``torch.load(weights_only=True)`` is safe but refuses the authors' files, which also hold an OmegaConf
``DictConfig`` (Lightning hyper-parameters) or an ``argparse.Namespace``. Here ``torch.load`` gets a
pickle module whose ``Unpickler.find_class`` resolves names only from an explicit allow-list:

* what torch's own ``weights_only`` unpickler allows (tensors, storages, dtypes, ``OrderedDict``...);
* plain built-in types, ``collections.defaultdict`` and a few numpy reconstructors (for numpy scalars/arrays);
* OmegaConf, argparse and Lightning containers, mapped to small local stand-in classes. omegaconf is never
  imported: the stand-ins only collect the pickled state, and are converted to plain dicts/lists afterwards.

Every other global makes loading fail with :class:`CheckpointError` before it is resolved, so it never runs.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["safe_torch_load", "safe_pickle_module", "UnsafePickleError", "UnsafeGlobalError", "to_plain"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle tries something the restricted unpickler does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsafeGlobalError(UnsafePickleError):
    """The pickle references a global that is not on the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        self.qualname = f"{module}.{name}"
        super().__init__(f"it references {_friendly(self.qualname)}, which could run code")


def _friendly(qualname: str) -> str:
    # os.system pickles as posix.system (nt.system on Windows): name the module users know.
    module, _, name = qualname.rpartition(".")
    return f"os.{name}" if module in ("posix", "nt") else qualname


# --------------------------------------------------------------------------------------------- stand-ins
class _StandIn:
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


class OmegaDictConfig(_StandIn):
    """Stand-in for ``omegaconf.DictConfig``: content in ``_state['_content']`` (key -> node)."""


class OmegaListConfig(_StandIn):
    """Stand-in for ``omegaconf.ListConfig``: content in ``_state['_content']`` (list of nodes)."""


class OmegaValueNode(_StandIn):
    """Stand-in for the OmegaConf value nodes (``AnyNode``, ``IntegerNode``...): value in ``_state['_val']``."""


class OmegaMetadata(_StandIn):
    """Stand-in for ``omegaconf.base.Metadata`` / ``ContainerMetadata`` (types, flags: not needed)."""


class NamespaceStandIn(_StandIn):
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


_OMEGA_NODE_NAMES = (
    "AnyNode", "ValueNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode",
    "BytesNode", "PathNode", "InterpolationResultNode", "UnionNode",
)
_TYPING_NAMES = ("Any", "Dict", "List", "Tuple", "Optional", "Union", "Sequence", "Mapping", "Set")


def _numpy_global(module: str, name: str) -> Any:
    """numpy scalars/arrays: imported only when referenced; these rebuild values from bytes and dtypes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    if module in ("numpy", "numpy.core", "numpy._core") and name == "ndarray":
        return np.ndarray
    if module in ("numpy", "numpy.core", "numpy._core") and name == "dtype":
        return _numpy_dtype_copy
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(core.multiarray, name)
    raise UnsafeGlobalError(module, name)


def _numpy_dtype_copy(obj: Any, align: bool = False, copy: bool = True) -> Any:
    # Always a fresh dtype: the following BUILD must never modify numpy's shared built-in dtype objects.
    import numpy as np

    return np.dtype(obj, bool(align), True)


def _fixed_globals() -> dict[str, Any]:
    """The allow-list: fully qualified name -> object returned to the unpickler."""
    allowed: dict[str, Any] = {}
    try:
        # torch's own vetted list (tensor rebuild functions, storages, dtypes, Size, device, OrderedDict...).
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except Exception:  # pragma: no cover - private API moved: fall back to the essentials below
        pass
    allowed.update({
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "argparse.Namespace": NamespaceStandIn,
        "omegaconf.dictconfig.DictConfig": OmegaDictConfig,
        "omegaconf.listconfig.ListConfig": OmegaListConfig,
        "omegaconf.base.Metadata": OmegaMetadata,
        "omegaconf.base.ContainerMetadata": OmegaMetadata,
        "pytorch_lightning.utilities.parsing.AttributeDict": AttributeDictStandIn,
        "lightning_fabric.utilities.data.AttributeDict": AttributeDictStandIn,
        "lightning.fabric.utilities.data.AttributeDict": AttributeDictStandIn,
        "lightning.pytorch.utilities.parsing.AttributeDict": AttributeDictStandIn,
    })
    for name in _OMEGA_NODE_NAMES:
        allowed[f"omegaconf.nodes.{name}"] = OmegaValueNode
    allowed["omegaconf.base.Node"] = OmegaValueNode
    for name in _TYPING_NAMES:
        allowed[f"typing.{name}"] = TypeMarker(f"typing.{name}")
    # Plain value types: calling or instantiating them cannot run stored code.
    for typ in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool):
        allowed[f"builtins.{typ.__name__}"] = typ
    # Common dtypes, in case torch's table is unavailable (named explicitly: getattr over dir(torch) would
    # import lazily-loaded submodules).
    for dt_name in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64",
                    "bool", "complex64", "complex128"):
        obj = getattr(torch, dt_name, None)
        if isinstance(obj, torch.dtype):
            allowed.setdefault(f"torch.{dt_name}", obj)
    return allowed


_ALLOWED: dict[str, Any] | None = None
_ALLOWED_IDS: frozenset[int] = frozenset()


def _allowed() -> dict[str, Any]:
    global _ALLOWED, _ALLOWED_IDS
    if _ALLOWED is None:
        table = _fixed_globals()
        _ALLOWED_IDS = frozenset(id(v) for v in table.values())
        _ALLOWED = table
    return _ALLOWED


def _resolve(module: str, name: str, proto: int) -> Any:
    # Python 2 era names (__builtin__.long...) as pickle.Unpickler.find_class would map them.
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    qual = f"{module}.{name}"
    table = _allowed()
    if qual in table:
        return table[qual]
    if module == "numpy" or module.startswith("numpy."):
        return _numpy_global(module, name)
    raise UnsafeGlobalError(module, name)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler that resolves globals only from the allow-list (the documented safe pattern).

    The pure-Python unpickler is used so that BUILD can be checked too: a pickle may otherwise set attributes
    on an allowed class or shared object (``setattr(SomeClass, ...)``), changing them for the whole process.
    Pickles of checkpoints are small (tensor data lives outside them), so speed does not matter here.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        return _resolve(module, name, getattr(self, "proto", 2))

    def _load_build_checked(self) -> None:
        inst = self.stack[-2]
        if isinstance(inst, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)) \
                or id(inst) in _ALLOWED_IDS:
            raise UnsafePickleError(f"it tries to modify {getattr(inst, '__qualname__', type(inst).__name__)}, "
                                    "a shared object")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build_checked


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def _make_module() -> types.ModuleType:
    # torch.load(pickle_module=...) needs something module-like: Unpickler, load, __name__.
    mod = types.ModuleType("meddiffusion_safe_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = _restricted_load  # type: ignore[attr-defined]
    mod.loads = _restricted_loads  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    mod.__version__ = "1"  # type: ignore[attr-defined]
    return mod


safe_pickle_module = _make_module()


# ------------------------------------------------------------------------------------------- conversion
def to_plain(obj: Any) -> Any:
    """Replace stand-ins (and ``defaultdict``) by plain dicts/lists/values, recursively.

    Tensors and ``OrderedDict`` state dicts are kept as they are; shared objects stay shared.
    """
    memo: dict[int, Any] = {}
    return _plain(obj, memo)


def _node_content(node: _StandIn) -> Any:
    state = getattr(node, "_state", None)
    return state if isinstance(state, dict) else {}


def _plain(obj: Any, memo: dict[int, Any]) -> Any:
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None), TypeMarker)):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, OmegaValueNode):
        out = _plain(_node_content(obj).get("_val"), memo)
    elif isinstance(obj, OmegaDictConfig):
        content = _node_content(obj).get("_content")
        if isinstance(content, dict):
            out = {}
            memo[key] = out
            for k, v in content.items():
                out[_plain(k, memo)] = _plain(v, memo)
        else:  # None, "???" (missing) or an interpolation string
            out = content
    elif isinstance(obj, OmegaListConfig):
        content = _node_content(obj).get("_content")
        if isinstance(content, list):
            out = []
            memo[key] = out
            out.extend(_plain(v, memo) for v in content)
        else:
            out = content
    elif isinstance(obj, NamespaceStandIn):
        out = {}
        memo[key] = out
        for k, v in _node_content(obj).items():
            out[k] = _plain(v, memo)
    elif isinstance(obj, OmegaMetadata):
        out = None
    elif isinstance(obj, collections.OrderedDict):
        out = collections.OrderedDict()
        memo[key] = out
        for k, v in obj.items():
            out[k] = _plain(v, memo)
    elif isinstance(obj, dict):  # dict, defaultdict, AttributeDict stand-in -> dict
        out = {}
        memo[key] = out
        for k, v in obj.items():
            out[_plain(k, memo)] = _plain(v, memo)
    elif isinstance(obj, list):
        out = []
        memo[key] = out
        out.extend(_plain(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_plain(v, memo) for v in obj)
    else:
        out = obj
    memo[key] = out
    return out


# ------------------------------------------------------------------------------------------- public API
def _check_not_torchscript(path: Path) -> None:
    # torch.load hands TorchScript archives to torch.jit.load (which runs their code): refuse them here.
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"Cannot read checkpoint '{path}': {exc}") from exc
    for n in names:
        tail = n.split("/", 1)[-1]
        if tail == "constants.pkl" or tail.startswith("code/"):
            raise CheckpointError(
                f"Refusing to load '{path}': it is a TorchScript archive, which contains code; "
                "expected a plain PyTorch checkpoint (state dict)")


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu", plain: bool = True) -> Any:
    """Load a ``torch.save``/Lightning checkpoint without executing code from it.

    ``plain=True`` converts OmegaConf configs, ``argparse.Namespace`` and ``defaultdict`` to plain
    dicts/lists. Raises :class:`CheckpointError` when the file is missing, unreadable, corrupt, or references
    anything outside the allow-list (naming that global).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"Checkpoint file not found: '{p}'")
    if p.is_dir():
        raise CheckpointError(f"Checkpoint path '{p}' is a folder, expected a file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"Checkpoint file '{p}' is not readable (permissions)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint file '{p}' is empty")
    _check_not_torchscript(p)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=False, pickle_module=safe_pickle_module)
    except UnsafePickleError as exc:
        raise CheckpointError(
            f"Refusing to load '{p}': {exc.reason}. Only tensors, plain containers and known configuration "
            "objects (OmegaConf, argparse) are accepted") from None
    except CheckpointError:
        raise
    except RuntimeError as exc:
        if "explicit pickle_module" in str(exc):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD is set in the environment
            raise CheckpointError(
                f"Cannot load '{p}' while TORCH_FORCE_WEIGHTS_ONLY_LOAD is set; unset it (this loader is "
                "already restricted to safe objects)") from exc
        raise CheckpointError(f"Checkpoint '{p}' is corrupt or not a PyTorch checkpoint: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError,
            AttributeError, IndexError, ImportError, OSError, AssertionError) as exc:
        raise CheckpointError(
            f"Checkpoint '{p}' is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return to_plain(obj) if plain else obj
