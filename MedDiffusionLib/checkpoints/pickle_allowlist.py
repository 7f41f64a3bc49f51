"""The names a checkpoint pickle may refer to, and the errors of the restricted unpickler.

A GLOBAL/STACK_GLOBAL opcode names a module attribute; `resolve_global` returns it only from the allow-list
(torch's own ``weights_only`` list, plain value types, a few numpy reconstructors, and stand-ins for the
OmegaConf/argparse/Lightning containers). Being listed only makes a name referable: what may be *called*, and
with which arguments, is decided in `pickle_calls`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
from typing import Any

import torch

from .pickle_standins import (
    OMEGA_NODE_NAMES,
    TYPING_NAMES,
    AttributeDictStandIn,
    NamespaceStandIn,
    OmegaDictConfig,
    OmegaListConfig,
    OmegaMetadata,
    OmegaValueNode,
    TypeMarker,
)

__all__ = ["UnsafePickleError", "UnsafeGlobalError", "resolve_global", "allowed_ids", "friendly_name",
           "numpy_dtype_copy"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle tries something the restricted unpickler does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsafeGlobalError(UnsafePickleError):
    """The pickle references a global that is not on the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        self.qualname = f"{module}.{name}"
        super().__init__(f"it references {friendly_name(self.qualname)}, which could run code")


def friendly_name(qualname: str) -> str:
    """A global's name as users know it."""
    # os.system pickles as posix.system (nt.system on Windows): name the module users know.
    module, _, name = qualname.rpartition(".")
    return f"os.{name}" if module in ("posix", "nt") else qualname


# ------------------------------------------------------------------------------------------ allow-list
def _numpy_global(module: str, name: str) -> Any:
    """numpy scalars/arrays: imported only when referenced; these rebuild values from bytes and dtypes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    if module in ("numpy", "numpy.core", "numpy._core") and name == "ndarray":
        return np.ndarray
    if module in ("numpy", "numpy.core", "numpy._core") and name == "dtype":
        return numpy_dtype_copy
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(core.multiarray, name)
    raise UnsafeGlobalError(module, name)


def numpy_dtype_copy(obj: Any, align: bool = False, copy: bool = True) -> Any:
    """``numpy.dtype`` as the allow-list offers it: always a fresh object."""
    # Always a fresh dtype: the following BUILD must never modify numpy's shared built-in dtype objects.
    import numpy as np

    return np.dtype(obj, bool(align), True)


def _fixed_globals() -> dict[str, Any]:
    """The allow-list of names: fully qualified name -> object returned to the unpickler."""
    allowed: dict[str, Any] = {}
    try:
        # torch's own vetted list (tensor rebuild functions, storages, dtypes, Size, device, OrderedDict...).
        # Being listed only makes a name referable; what may be *called* is decided by _CALLS below.
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - private API moved: the essentials below suffice
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
    for name in OMEGA_NODE_NAMES:
        allowed[f"omegaconf.nodes.{name}"] = OmegaValueNode
    allowed["omegaconf.base.Node"] = OmegaValueNode
    for name in TYPING_NAMES:
        allowed[f"typing.{name}"] = TypeMarker(f"typing.{name}")
    for typ in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool):
        allowed[f"builtins.{typ.__name__}"] = typ
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


def resolve_global(module: str, name: str, proto: int) -> Any:
    """The allowed object a pickle's ``module.name`` refers to; UnsafeGlobalError for any other name."""
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


def allowed_ids() -> frozenset[int]:
    """Identities of the allow-listed objects: shared, so BUILD may never modify them."""
    _allowed()
    return _ALLOWED_IDS
