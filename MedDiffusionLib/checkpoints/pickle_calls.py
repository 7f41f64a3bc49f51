"""What a checkpoint pickle may call (REDUCE, NEWOBJ, INST/OBJ), each with its arguments checked.

Only the few constructors checkpoints use are callable, and none may build more than the pickle's own bytes:
tensors only view storages that the file holds, containers and strings are charged against the unpickler's
budget (``RestrictedUnpickler.charge``). `call_check` returns the check for a callable, None for any other.
"""
from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .pickle_allowlist import UnsafePickleError, friendly_name, numpy_dtype_copy
from .pickle_standins import (
    AttributeDictStandIn,
    NamespaceStandIn,
    OmegaDictConfig,
    OmegaListConfig,
    OmegaMetadata,
    OmegaValueNode,
    StandIn,
)

if TYPE_CHECKING:
    from .safe_pickle import RestrictedUnpickler

__all__ = ["call_check", "refuse", "qualified_name", "check_ints"]



# --------------------------------------------------------------------------------------------- calls
def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a callable, as users know it."""
    return friendly_name(f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}")


def refuse(func: Any, why: str = "checkpoints never make this call") -> UnsafePickleError:
    """The error for a call of ``func`` whose arguments are not allowed."""
    return UnsafePickleError(f"it calls {qualified_name(func)} with arguments that are not allowed ({why})")


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, tuple) and len(value) == 2:  # (dict state, slot state)
        return all(_empty(v) for v in value)
    return isinstance(value, (dict, tuple, list)) and len(value) == 0


def check_ints(value: Any, what: str, func: Any) -> tuple[int, ...]:
    """``value`` as up to 64 non-negative ints (a size, stride or shape); refused otherwise."""
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > 64 \
            or not all(type(v) is int and v >= 0 for v in value):
        raise refuse(func, f"{what} must be up to 64 non-negative integers")
    return tuple(value)


def _check_view(func: Any, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> None:
    """A tensor may only view bytes its storage holds (torch would otherwise resize the storage)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise refuse(func, "a tensor must be built on a storage from the file")
    itemsize = _itemsize(storage.dtype if dtype is None else dtype)
    if type(offset) is not int or offset < 0:
        raise refuse(func, "bad storage offset")
    size, stride = check_ints(size, "size", func), check_ints(stride, "stride", func)
    if len(size) != len(stride):
        raise refuse(func, "size and stride differ in length")
    capacity = storage._untyped_storage.nbytes() // itemsize
    if math.prod(size) == 0:
        if offset > capacity:
            raise refuse(func, "offset beyond the storage")
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
        raise UnsafePickleError(f"a tensor claims elements up to {last + 1} of a storage holding {capacity}")


def _tensor_flags(func: Any, requires_grad: Any, hooks: Any, metadata: Any) -> None:
    if type(requires_grad) is not bool or not _empty(hooks):
        raise refuse(func, "requires_grad must be a bool and no hooks may be stored")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                     and all(type(v) is bool for v in metadata.values())):
        raise refuse(func, "bad tensor metadata")


def _rebuild_v2(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 6 <= len(args) <= 7:
        raise refuse(func, "wrong number of arguments")
    storage, offset, size, stride, requires_grad, hooks, *meta = args
    _check_view(func, storage, offset, size, stride)
    _tensor_flags(func, requires_grad, hooks, meta[0] if meta else None)
    return func(*args)


def _rebuild_v3(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 7 <= len(args) <= 8 or not isinstance(args[6], torch.dtype):
        raise refuse(func, "wrong arguments")
    storage, offset, size, stride, requires_grad, hooks, dtype, *meta = args
    _check_view(func, storage, offset, size, stride, dtype)
    _tensor_flags(func, requires_grad, hooks, meta[0] if meta else None)
    return func(*args)


def _rebuild_plain(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 4:
        raise refuse(func, "wrong number of arguments")
    storage, offset, size, stride = args
    _check_view(func, storage, offset, size, stride)
    return func(*args)


def _itemsize(dtype: Any) -> int:
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError("a storage has no known element type")
    return torch._utils._element_size(dtype)


def _rebuild_parameter(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) not in (3, 4) or type(args[0]) is not torch.Tensor:
        raise refuse(func, "a parameter wraps one plain tensor")
    _tensor_flags(func, args[1], args[2], None)
    if len(args) == 4 and not _empty(args[3]):
        raise refuse(func, "parameters may not carry attributes")
    return func(*args)


def _rebuild_from_type(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 4:
        raise refuse(func, "wrong number of arguments")
    inner, new_type, inner_args, state = args
    if _CALLS.get(id(inner)) not in _TENSOR_REBUILDERS or new_type not in (torch.Tensor, torch.nn.Parameter) \
            or not isinstance(inner_args, tuple) or not _empty(state):
        raise refuse(func, "only plain tensors and parameters without attributes")
    result = u.checked_call(inner, inner_args)
    return func(lambda: result, new_type, (), state)


def _container(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict, set, frozenset))):
        raise refuse(func, "containers are built from a list, tuple or dict")
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _defaultdict(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not args or args[0] not in (None, list, dict, set, int, float, str, tuple, collections.OrderedDict):
        raise refuse(func, "the default factory must be a plain type")
    return _container(u, lambda *a: func(args[0], *a), args[1:])


_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})


def _text_args(func: Any, args: tuple, source: tuple[type, ...]) -> None:
    if not (isinstance(args[0], source) and all(isinstance(a, str) for a in args[1:])
            and (len(args) < 2 or args[1].lower() in _TEXT_CODECS)):
        raise refuse(func, "text must be encoded with a plain text codec")


def _bytes_like(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    # Never bytes(n)/bytearray(n): that allocates n zero bytes from a 5-byte integer.
    if len(args) > 3:
        raise refuse(func, "too many arguments")
    if args and isinstance(args[0], str):
        _text_args(func, args, (str,))
    elif args and not (len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple))
                       and not any(type(v) is int and v < 0 for v in args[0])):
        raise refuse(func, "bytes are built from text or bytes, never from a size")
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _str(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if args and (len(args) > 3 or (len(args) == 1 and not isinstance(args[0], str))):
        raise refuse(func, "str is built from text or encoded bytes")
    if len(args) > 1:
        _text_args(func, args, (bytes, bytearray))
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _number(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 2 or not all(isinstance(a, (int, float, str)) for a in args) \
            or any(isinstance(a, str) and len(a) > 1000 for a in args):
        raise refuse(func, "numbers are built from numbers or short text")
    return func(*args)


def _encode(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    # Protocol-2 pickles store bytes as _codecs.encode(text, 'latin1'); other codecs (hex...) could expand it.
    if not 1 <= len(args) <= 3:
        raise refuse(func, "wrong number of arguments")
    _text_args(func, args, (str,))
    u.charge(len(args[0]))
    return func(*args)


def _size(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 1:
        raise refuse(func, "too many arguments")
    return func(check_ints(args[0], "size", func)) if args else func()


def _device(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 1 <= len(args) <= 2 or not isinstance(args[0], (str, torch.device)) \
            or (len(args) == 2 and type(args[1]) is not int):
        raise refuse(func, "a device is a name and an index")
    return func(*args)


def _layout(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 1 or not isinstance(args[0], str):
        raise refuse(func, "a layout is a name")
    return func(*args)


def _standin(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    return func(*args)  # stand-ins only store their arguments


def _np_reconstruct(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    import numpy as np

    # numpy pickles an empty array here and fills it by BUILD (checked in _check_build).
    if len(args) != 3 or args[0] is not np.ndarray or math.prod(check_ints(args[1], "shape", func)) != 0:
        raise refuse(func, "arrays are rebuilt empty, then filled from the pickled bytes")
    return func(*args)


def _np_scalar(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    import numpy as np

    if not 1 <= len(args) <= 2 or not isinstance(args[0], np.dtype):
        raise refuse(func, "wrong arguments")
    if not args[0].hasobject and not (len(args) == 2 and isinstance(args[1], bytes)
                                      and len(args[1]) == args[0].itemsize):
        raise refuse(func, "a scalar's bytes must match its type")
    return func(*args)


def _np_dtype(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 1 <= len(args) <= 3 or not isinstance(args[0], (str, bytes)) or len(args[0]) > 64:
        raise refuse(func, "a dtype is named by a short code")
    return func(*args)


_TENSOR_REBUILDERS = (_rebuild_v2, _rebuild_v3, _rebuild_plain, _rebuild_parameter)
_CALLS: dict[int, Callable[["RestrictedUnpickler", Any, tuple], Any]] = {}


def _calls() -> dict[int, Callable[["RestrictedUnpickler", Any, tuple], Any]]:
    """What a pickle may call, by identity of the callable: the argument check for each."""
    if not _CALLS:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        u = torch._utils
        table: dict[Any, Callable[["RestrictedUnpickler", Any, tuple], Any]] = {
            u._rebuild_tensor_v2: _rebuild_v2, u._rebuild_tensor_v3: _rebuild_v3, u._rebuild_tensor: _rebuild_plain,
            u._rebuild_parameter: _rebuild_parameter, u._rebuild_parameter_with_state: _rebuild_parameter,
            torch._tensor._rebuild_from_type_v2: _rebuild_from_type,
            collections.OrderedDict: _container, collections.Counter: _container, AttributeDictStandIn: _container,
            dict: _container, list: _container, tuple: _container, set: _container, frozenset: _container,
            collections.defaultdict: _defaultdict, bytes: _bytes_like, bytearray: _bytes_like, str: _str,
            int: _number, float: _number, complex: _number, bool: _number,
            torch.Size: _size, torch.device: _device, torch.serialization._get_layout: _layout,
            core.multiarray._reconstruct: _np_reconstruct, core.multiarray.scalar: _np_scalar,
            numpy_dtype_copy: _np_dtype,
        }
        import _codecs

        table[_codecs.encode] = _encode
        for cls in (NamespaceStandIn, OmegaDictConfig, OmegaListConfig, OmegaValueNode, OmegaMetadata):
            table[cls] = _standin
        _CALLS.update({id(k): v for k, v in table.items()})
    return _CALLS



def call_check(func: Any) -> Optional[Callable[["RestrictedUnpickler", Any, tuple], Any]]:
    """The argument check for calling ``func`` (identity, not name), None when checkpoints never call it."""
    check = _calls().get(id(func))
    if check is None and isinstance(func, type) and issubclass(func, StandIn):
        return _standin
    return check
