"""A pickle reader for checkpoints that never runs stored code and never allocates what a pickle merely claims.

A ``.pt``/``.ckpt`` file is a pickle, and unpickling may call any importable function (``os.system``...).
``torch.load(weights_only=True)`` is safe from code but refuses the authors' files, which also hold an OmegaConf
``DictConfig`` (Lightning hyper-parameters) or an ``argparse.Namespace``; and its allow-list still lets a
400-byte pickle call ``bytearray(2**31)`` or ``torch.FloatTensor(2**31)``. This unpickler therefore checks three
things:

* names (GLOBAL/STACK_GLOBAL): resolved only from an allow-list (torch's own ``weights_only`` list, plain value
  types, a few numpy reconstructors, and stand-ins for the OmegaConf/argparse/Lightning containers);
* calls (REDUCE, NEWOBJ, INST/OBJ): only the few constructors checkpoints use, each with its arguments checked
  so that no call builds more than the pickle's own bytes (tensors only view storages that the file holds,
  containers and strings are charged against a budget proportional to the pickle's size);
* BUILD (``__setstate__``): only on stand-ins and numpy arrays, never on classes or shared objects.

Anything else fails with :class:`UnsafePickleError` before it happens.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import types
from typing import Any, Callable, ClassVar

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
    StandIn,
    TypeMarker,
    to_plain,
)

__all__ = ["RestrictedUnpickler", "safe_pickle_module", "UnsafePickleError", "UnsafeGlobalError", "to_plain",
           "OmegaDictConfig", "pickle_budget"]


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


# Memory a pickle's objects may take, charged per opcode at the most that opcode can create (an empty set is
# 216 bytes from a 1-byte opcode; other objects, stack and memo entries stay under 100). A checkpoint pickle
# describes tensors only: an official BiFlowNet file with optimizer state needs about 15 MiB of this.
MAX_PICKLE_OBJECT_BYTES = 256 << 20
_OPCODE_COST = 100
_SET_OPCODES = (pickle.EMPTY_SET[0], pickle.FROZENSET[0])
_SET_COST = 250


def pickle_budget(pickle_bytes: int) -> int:
    """Elements/bytes that calls in a pickle of this size may build: a legitimate pickle spells out everything
    it builds, so a few times its own size is plenty; an allocation bomb (``bytearray(2**31)``) is far above."""
    return 4 * pickle_bytes + (1 << 20)


# ------------------------------------------------------------------------------------------ allow-list
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


# --------------------------------------------------------------------------------------------- calls
def _name(obj: Any) -> str:
    return _friendly(f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}")


def _refuse(func: Any, why: str = "checkpoints never make this call") -> UnsafePickleError:
    return UnsafePickleError(f"it calls {_name(func)} with arguments that are not allowed ({why})")


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, tuple) and len(value) == 2:  # (dict state, slot state)
        return all(_empty(v) for v in value)
    return isinstance(value, (dict, tuple, list)) and len(value) == 0


def _ints(value: Any, what: str, func: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > 64 \
            or not all(type(v) is int and v >= 0 for v in value):
        raise _refuse(func, f"{what} must be up to 64 non-negative integers")
    return tuple(value)


def _check_view(func: Any, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> None:
    """A tensor may only view bytes its storage holds (torch would otherwise resize the storage)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _refuse(func, "a tensor must be built on a storage from the file")
    itemsize = _itemsize(storage.dtype if dtype is None else dtype)
    if type(offset) is not int or offset < 0:
        raise _refuse(func, "bad storage offset")
    size, stride = _ints(size, "size", func), _ints(stride, "stride", func)
    if len(size) != len(stride):
        raise _refuse(func, "size and stride differ in length")
    capacity = storage._untyped_storage.nbytes() // itemsize
    if math.prod(size) == 0:
        if offset > capacity:
            raise _refuse(func, "offset beyond the storage")
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
        raise UnsafePickleError(f"a tensor claims elements up to {last + 1} of a storage holding {capacity}")


def _tensor_flags(func: Any, requires_grad: Any, hooks: Any, metadata: Any) -> None:
    if type(requires_grad) is not bool or not _empty(hooks):
        raise _refuse(func, "requires_grad must be a bool and no hooks may be stored")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                     and all(type(v) is bool for v in metadata.values())):
        raise _refuse(func, "bad tensor metadata")


def _rebuild_v2(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 6 <= len(args) <= 7:
        raise _refuse(func, "wrong number of arguments")
    storage, offset, size, stride, requires_grad, hooks, *meta = args
    _check_view(func, storage, offset, size, stride)
    _tensor_flags(func, requires_grad, hooks, meta[0] if meta else None)
    return func(*args)


def _rebuild_v3(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 7 <= len(args) <= 8 or not isinstance(args[6], torch.dtype):
        raise _refuse(func, "wrong arguments")
    storage, offset, size, stride, requires_grad, hooks, dtype, *meta = args
    _check_view(func, storage, offset, size, stride, dtype)
    _tensor_flags(func, requires_grad, hooks, meta[0] if meta else None)
    return func(*args)


def _rebuild_plain(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 4:
        raise _refuse(func, "wrong number of arguments")
    storage, offset, size, stride = args
    _check_view(func, storage, offset, size, stride)
    return func(*args)


def _itemsize(dtype: Any) -> int:
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError("a storage has no known element type")
    return torch._utils._element_size(dtype)


def _rebuild_parameter(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) not in (3, 4) or type(args[0]) is not torch.Tensor:
        raise _refuse(func, "a parameter wraps one plain tensor")
    _tensor_flags(func, args[1], args[2], None)
    if len(args) == 4 and not _empty(args[3]):
        raise _refuse(func, "parameters may not carry attributes")
    return func(*args)


def _rebuild_from_type(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 4:
        raise _refuse(func, "wrong number of arguments")
    inner, new_type, inner_args, state = args
    if _CALLS.get(id(inner)) not in _TENSOR_REBUILDERS or new_type not in (torch.Tensor, torch.nn.Parameter) \
            or not isinstance(inner_args, tuple) or not _empty(state):
        raise _refuse(func, "only plain tensors and parameters without attributes")
    result = u.checked_call(inner, inner_args)
    return func(lambda: result, new_type, (), state)


def _container(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict, set, frozenset))):
        raise _refuse(func, "containers are built from a list, tuple or dict")
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _defaultdict(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not args or args[0] not in (None, list, dict, set, int, float, str, tuple, collections.OrderedDict):
        raise _refuse(func, "the default factory must be a plain type")
    return _container(u, lambda *a: func(args[0], *a), args[1:])


_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})


def _text_args(func: Any, args: tuple, source: tuple[type, ...]) -> None:
    if not (isinstance(args[0], source) and all(isinstance(a, str) for a in args[1:])
            and (len(args) < 2 or args[1].lower() in _TEXT_CODECS)):
        raise _refuse(func, "text must be encoded with a plain text codec")


def _bytes_like(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    # Never bytes(n)/bytearray(n): that allocates n zero bytes from a 5-byte integer.
    if len(args) > 3:
        raise _refuse(func, "too many arguments")
    if args and isinstance(args[0], str):
        _text_args(func, args, (str,))
    elif args and not (len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple))
                       and not any(type(v) is int and v < 0 for v in args[0])):
        raise _refuse(func, "bytes are built from text or bytes, never from a size")
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _str(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if args and (len(args) > 3 or (len(args) == 1 and not isinstance(args[0], str))):
        raise _refuse(func, "str is built from text or encoded bytes")
    if len(args) > 1:
        _text_args(func, args, (bytes, bytearray))
    u.charge(len(args[0]) if args else 0)
    return func(*args)


def _number(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 2 or not all(isinstance(a, (int, float, str)) for a in args) \
            or any(isinstance(a, str) and len(a) > 1000 for a in args):
        raise _refuse(func, "numbers are built from numbers or short text")
    return func(*args)


def _encode(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    # Protocol-2 pickles store bytes as _codecs.encode(text, 'latin1'); other codecs (hex...) could expand it.
    if not 1 <= len(args) <= 3:
        raise _refuse(func, "wrong number of arguments")
    _text_args(func, args, (str,))
    u.charge(len(args[0]))
    return func(*args)


def _size(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) > 1:
        raise _refuse(func, "too many arguments")
    return func(_ints(args[0], "size", func)) if args else func()


def _device(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 1 <= len(args) <= 2 or not isinstance(args[0], (str, torch.device)) \
            or (len(args) == 2 and type(args[1]) is not int):
        raise _refuse(func, "a device is a name and an index")
    return func(*args)


def _layout(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if len(args) != 1 or not isinstance(args[0], str):
        raise _refuse(func, "a layout is a name")
    return func(*args)


def _standin(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    return func(*args)  # stand-ins only store their arguments


def _np_reconstruct(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    import numpy as np

    # numpy pickles an empty array here and fills it by BUILD (checked in _check_build).
    if len(args) != 3 or args[0] is not np.ndarray or math.prod(_ints(args[1], "shape", func)) != 0:
        raise _refuse(func, "arrays are rebuilt empty, then filled from the pickled bytes")
    return func(*args)


def _np_scalar(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    import numpy as np

    if not 1 <= len(args) <= 2 or not isinstance(args[0], np.dtype):
        raise _refuse(func, "wrong arguments")
    if not args[0].hasobject and not (len(args) == 2 and isinstance(args[1], bytes)
                                      and len(args[1]) == args[0].itemsize):
        raise _refuse(func, "a scalar's bytes must match its type")
    return func(*args)


def _np_dtype(u: "RestrictedUnpickler", func: Any, args: tuple) -> Any:
    if not 1 <= len(args) <= 3 or not isinstance(args[0], (str, bytes)) or len(args[0]) > 64:
        raise _refuse(func, "a dtype is named by a short code")
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
            _numpy_dtype_copy: _np_dtype,
        }
        import _codecs

        table[_codecs.encode] = _encode
        for cls in (NamespaceStandIn, OmegaDictConfig, OmegaListConfig, OmegaValueNode, OmegaMetadata):
            table[cls] = _standin
        _CALLS.update({id(k): v for k, v in table.items()})
    return _CALLS


# Classes NEWOBJ may instantiate (``cls.__new__(cls)``, filled afterwards by items or BUILD).
_NEW_OK = (dict, list, set, collections.OrderedDict, AttributeDictStandIn)


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves globals only from the allow-list and checks every call and BUILD.

    The pure-Python unpickler is used so that each opcode that calls something can be intercepted.
    Pickles of checkpoints are small (tensor data lives outside them), so speed does not matter here.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = {}
    # Set by the pure-Python unpickler's load(); typeshed leaves these internals out.
    stack: list[Any]
    append: Callable[[Any], None]

    def __init__(self, file: Any, *, budget: int = 1 << 20, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._budget = budget
        self._object_bytes = MAX_PICKLE_OBJECT_BYTES

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        return _resolve(module, name, getattr(self, "proto", 2))

    def charge(self, n: int) -> None:
        """Count ``n`` elements/bytes built by a call; refuse once the pickle's budget is spent."""
        self._budget -= n
        if self._budget < 0:
            raise UnsafePickleError("it builds far more data than the pickle holds (an allocation bomb)")

    def checked_call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        """``func(*args)`` if ``func`` is on the call list and its arguments pass its check."""
        if kwargs or not isinstance(args, tuple):
            raise _refuse(func, "keyword or non-tuple arguments")
        check = _calls().get(id(func))
        if check is None:
            if isinstance(func, type) and issubclass(func, StandIn):
                check = _standin
            else:
                raise UnsafePickleError(f"it calls {_name(func)}, which checkpoints never do (it could run code "
                                        "or allocate memory)")
        return check(self, func, args)

    def checked_new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        """``cls.__new__(cls)`` for stand-ins and plain containers (NEWOBJ); anything else is refused."""
        if isinstance(cls, type) and issubclass(cls, StandIn):
            return cls.__new__(cls)  # the arguments are not needed: BUILD brings the state
        if cls in _NEW_OK and not args and not kwargs:
            return cls.__new__(cls)
        raise UnsafePickleError(f"it creates a {_name(cls)} object, which checkpoints never do")

    # -- opcodes that call something
    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.checked_call(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.checked_new(cls, args))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.checked_new(cls, args, kwargs))

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        if args or not isinstance(klass, type):
            self.append(self.checked_call(klass, tuple(args)))
        else:
            self.append(self.checked_new(klass, ()))

    def _load_build_checked(self) -> None:
        _check_build(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _charge_opcode(self, cost: int) -> None:
        self._object_bytes -= cost
        if self._object_bytes < 0:
            raise UnsafePickleError(f"its pickle builds more than {MAX_PICKLE_OBJECT_BYTES >> 20} MiB of objects")


def _costed(handler: Callable[..., None], cost: int) -> Callable[..., None]:
    def run(self: RestrictedUnpickler) -> None:
        self._charge_opcode(cost)
        handler(self)
    return run


def _dispatch_table() -> dict[int, Callable[..., None]]:
    table: dict[int, Callable[..., None]] = dict(pickle._Unpickler.dispatch)
    table[pickle.REDUCE[0]] = RestrictedUnpickler._load_reduce
    table[pickle.NEWOBJ[0]] = RestrictedUnpickler._load_newobj
    table[pickle.NEWOBJ_EX[0]] = RestrictedUnpickler._load_newobj_ex
    table[pickle.BUILD[0]] = RestrictedUnpickler._load_build_checked
    return {code: _costed(fn, _SET_COST if code in _SET_OPCODES else _OPCODE_COST) for code, fn in table.items()}


RestrictedUnpickler.dispatch = _dispatch_table()


def _check_build(inst: Any, state: Any) -> None:
    """BUILD may only fill a stand-in, a state dict's attributes or a fresh numpy array/dtype (bytes = shape)."""
    import numpy as np

    if isinstance(inst, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)) \
            or id(inst) in _ALLOWED_IDS:
        raise UnsafePickleError(f"it tries to modify {getattr(inst, '__qualname__', type(inst).__name__)}, "
                                "a shared object")
    if isinstance(inst, (StandIn, AttributeDictStandIn, np.dtype)):
        return
    if type(inst) is collections.OrderedDict and isinstance(state, dict) and all(type(k) is str for k in state):
        return  # a state dict's _metadata (version numbers per module), stored in the instance's __dict__
    if isinstance(inst, np.ndarray):
        ok = isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
        if ok:
            count = math.prod(_ints(state[1], "shape", np.ndarray))
            raw = state[4]
            ok = (isinstance(raw, (bytes, bytearray)) and len(raw) == count * state[2].itemsize) or \
                (isinstance(raw, list) and len(raw) == count)
        if not ok:
            raise UnsafePickleError("a numpy array's bytes do not match its shape")
        return
    raise UnsafePickleError(f"it tries to modify a {type(inst).__name__} object, which checkpoints never do")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    kwargs.setdefault("budget", pickle_budget(len(data)))
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def _make_module() -> types.ModuleType:
    # Module-like object (Unpickler, load, loads) for callers that take a pickle module. typeshed's ModuleType
    # has no attributes to assign, hence the ignores.
    mod = types.ModuleType("meddiffusion_safe_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = _restricted_load  # type: ignore[attr-defined]
    mod.loads = _restricted_loads  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    mod.__version__ = "2"  # type: ignore[attr-defined]
    return mod


safe_pickle_module = _make_module()
