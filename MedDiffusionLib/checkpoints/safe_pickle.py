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

Anything else fails with :class:`UnsafePickleError` before it happens. The allow-list of names is in
`pickle_allowlist`, the checked calls in `pickle_calls`; this module is the unpickler that applies them (and the
BUILD check), with the memory budget of a pickle.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import types
from typing import Any, Callable, ClassVar

from .pickle_allowlist import UnsafeGlobalError, UnsafePickleError, allowed_ids, resolve_global
from .pickle_calls import call_check, check_ints, qualified_name, refuse
from .pickle_standins import AttributeDictStandIn, OmegaDictConfig, StandIn, to_plain

__all__ = ["RestrictedUnpickler", "safe_pickle_module", "UnsafePickleError", "UnsafeGlobalError", "to_plain",
           "OmegaDictConfig", "pickle_budget"]



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
        return resolve_global(module, name, getattr(self, "proto", 2))

    def charge(self, n: int) -> None:
        """Count ``n`` elements/bytes built by a call; refuse once the pickle's budget is spent."""
        self._budget -= n
        if self._budget < 0:
            raise UnsafePickleError("it builds far more data than the pickle holds (an allocation bomb)")

    def checked_call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        """``func(*args)`` if ``func`` is on the call list and its arguments pass its check."""
        if kwargs or not isinstance(args, tuple):
            raise refuse(func, "keyword or non-tuple arguments")
        check = call_check(func)
        if check is None:
            raise UnsafePickleError(f"it calls {qualified_name(func)}, which checkpoints never do (it could run "
                                    "code or allocate memory)")
        return check(self, func, args)

    def checked_new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        """``cls.__new__(cls)`` for stand-ins and plain containers (NEWOBJ); anything else is refused."""
        if isinstance(cls, type) and issubclass(cls, StandIn):
            return cls.__new__(cls)  # the arguments are not needed: BUILD brings the state
        if cls in _NEW_OK and not args and not kwargs:
            return cls.__new__(cls)
        raise UnsafePickleError(f"it creates a {qualified_name(cls)} object, which checkpoints never do")

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
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]  # typeshed omits the opcode handlers

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
            or id(inst) in allowed_ids():
        raise UnsafePickleError(f"it tries to modify {getattr(inst, '__qualname__', type(inst).__name__)}, "
                                "a shared object")
    if isinstance(inst, (StandIn, AttributeDictStandIn, np.dtype)):
        return
    if type(inst) is collections.OrderedDict and isinstance(state, dict) and all(type(k) is str for k in state):
        return  # a state dict's _metadata (version numbers per module), stored in the instance's __dict__
    if isinstance(inst, np.ndarray):
        ok = isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
        if ok:
            count = math.prod(check_ints(state[1], "shape", np.ndarray))
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
