"""Whether a module's ``forward`` provably calls no functional activation: a conservative
reading of its bytecode, so that functional capture can leave its torch-function mode off
while the module runs (the mode sends every torch call made there through Python).

Proved free is a ``forward`` (with the code nested in it and the methods of ``self`` it
reaches) in which

* every global is a torch module or ``math``, a public torch callable that is not an
  activation and not an ``nn.Module`` class, a constant, or one of a few harmless builtins
  (``len``, ``isinstance``, ``range`` ...; not ``type``, ``getattr``, ``eval``);
* every attribute of ``self`` it names is found in one place only (a child shadowed by a
  method, or an instance value by a property, is left unread) and is a module of the model
  (its own hooks see its calls) or ``None``, a parameter, buffer, tensor, number, string,
  dtype or device (or a tuple, list or dict of such), a method of torch's ``nn.Module``, or
  a method or property of ``self`` proved free in turn;
* every other attribute (of a tensor, of a torch module, of a child reached through
  ``self.block.x`` or ``self.blocks[0].x``) is judged by its name alone: not the name of an
  activation op (``relu``, ``gelu``, ``relu_`` ...), of an ``nn.Module`` class of
  ``torch.nn`` (a module made inside ``forward``), of anything on a module of the model
  that may be called (an instance attribute that is not a plain value, a method of a class
  of the user's or of torch's activation and transformer classes), not private (``_ff_block``,
  ``_slow_forward``), and no module of the model makes attributes up (a ``__getattr__`` of
  the user's).

Anything else is not proved and the mode stays on there: a closure or decorated
``forward``, a helper function, a dict or list of activations, ``getattr``, ``super()``,
``eval``, ``operator.methodcaller``, an import, a module that is not part of the model, a
``forward`` set on the instance.

Not seen by reading: an activation passed to ``forward`` as an argument
(``block(x, act=F.relu)``). :class:`~relu_doctor.functional.FunctionalCapture` therefore runs
the first recorded pass with the mode on in every module that may call one, and never
trusts the reading of a module whose own code made a call there. A call the first pass does
not make (a layer dropped at random in it) rests on the reading alone.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ForwardReader", "activation_names"]

_MAX_DEPTH = 4  # methods of self followed from forward

# (not type: type(self.act)() makes a module; not operator: methodcaller("relu") calls by
# name; not getattr, hasattr, eval, map ...)
_BUILTINS = frozenset({
    "abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "isinstance",
    "issubclass", "iter", "len", "list", "max", "min", "next", "range", "reversed", "round",
    "set", "slice", "sorted", "str", "sum", "tuple", "zip",
    "AssertionError", "IndexError", "KeyError", "NotImplementedError", "RuntimeError",
    "TypeError", "ValueError",
})
_SAFE_MODULES = ("math",)
# nn.Module's methods that run a forward without its module's hooks.
_RUNS_FORWARD = frozenset({"forward", "_slow_forward", "_call_impl", "_wrapped_call_impl"})
_DYNAMIC = ("__getattr__", "__getattribute__")
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_ATTR_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR"})
# Opcodes whose meaning the reading cannot follow: an import, super(), names resolved at
# run time through a dict.
_UNREAD_OPS = frozenset({
    "IMPORT_NAME", "IMPORT_FROM", "IMPORT_STAR", "LOAD_SUPER_ATTR", "STORE_GLOBAL",
    "DELETE_GLOBAL", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_GLOBALS", "LOAD_FROM_DICT_OR_DEREF",
    "STORE_NAME",
})


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _modules, training ...


def activation_names(ops: Iterable[Callable[..., Any]]) -> frozenset[str]:
    """The names no proved-free ``forward`` may use: each captured op's name, with and
    without its trailing underscore (``relu_``, ``relu``), and the ``nn.Module`` classes of
    ``torch.nn``."""
    names: set[str] = set()
    for fn in ops:
        name = getattr(fn, "__name__", None)
        if isinstance(name, str):
            names.update({name, name.rstrip("_")})
    names.update(
        n for n, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module)
    )
    return frozenset(names)


_LOADS = frozenset({"LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"})


@functools.lru_cache(maxsize=512)
def _read(
    code: types.CodeType, self_name: str | None
) -> tuple[frozenset[str], frozenset[str], frozenset[str], bool]:
    """(global names, attributes of ``self``, other attribute names, whether an unreadable
    opcode occurs) of ``code`` and of the code nested in it (comprehensions, lambdas, inner
    functions). An attribute is of ``self`` when the instruction before it loads the
    variable ``self_name`` (``self.relu``, not ``x.relu``)."""
    globs: set[str] = set()
    mine: set[str] = set()
    other: set[str] = set()
    unread = False
    todo = [(code, self_name)]
    while todo:
        c, self_name = todo.pop()
        prev: dis.Instruction | None = None
        for ins in dis.get_instructions(c):
            if ins.opname in _GLOBAL_OPS:
                globs.add(str(ins.argval))
            elif ins.opname in _ATTR_OPS:
                on_self = (
                    self_name is not None and prev is not None and prev.opname in _LOADS
                    and prev.argval == self_name
                )
                (mine if on_self else other).add(str(ins.argval))
            elif ins.opname in _UNREAD_OPS:
                unread = True
            if ins.opname != "CACHE":
                prev = ins
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                # a nested function's own parameter named self is not the module
                inner = self_name if self_name in k.co_freevars else None
                todo.append((k, inner))
    return frozenset(globs), frozenset(mine), frozenset(other), unread


def _plain(value: object) -> bool:
    """A value whose use can call nothing: None, a number, string, tensor, dtype, device,
    or a tuple, list, set or dict of such."""
    if value is None or isinstance(
        value, bool | int | float | complex | str | torch.Tensor | torch.dtype | torch.device
    ):
        return True
    if isinstance(value, tuple | list | set | frozenset):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def _torch_callable(value: object, ops: frozenset[Any]) -> bool:
    """A public function or class of torch's own that is not a captured op or a module class
    (a private helper such as ``_get_activation_fn`` may return an activation)."""
    if isinstance(value, type) and issubclass(value, nn.Module):
        return False
    if (getattr(value, "__name__", None) or "_").startswith("_"):
        return False
    where = getattr(value, "__module__", None) or ""
    try:
        captured = value in ops
    except TypeError:  # unhashable
        return False
    return callable(value) and not captured and (where == "torch" or where.startswith("torch."))


def _function_of(attr: object) -> tuple[types.FunctionType, bool] | None:
    """The Python function behind a class attribute (a method, property getter, static or
    class method) and whether its first argument is ``self``; None for anything else."""
    bound = True
    if isinstance(attr, property):
        attr = attr.fget
    elif isinstance(attr, staticmethod | classmethod):
        attr, bound = attr.__func__, False
    return (attr, bound) if isinstance(attr, types.FunctionType) else None


# torch's classes whose methods call activations themselves (nn.ReLU.forward calls F.relu,
# TransformerEncoderLayer._ff_block calls its activation): read like the user's classes.
_CALLING_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.transformer")


def _dynamic(klass: type) -> bool:
    """Whether a class of the user's in ``klass``'s MRO defines ``__getattr__`` or
    ``__getattribute__`` (nn.Module's own only serves parameters, buffers and children)."""
    return any(
        name in vars(k) for k in klass.__mro__ if not _torch_class(k) for name in _DYNAMIC
    )


def _torch_class(klass: type) -> bool:
    """A class of torch's own (or ``object``) whose methods call no activation."""
    where = klass.__module__ or ""
    return where == "builtins" or (
        where.startswith("torch.") and not where.startswith(_CALLING_MODULES)
    )


class ForwardReader:
    """Reads the forwards of one model's modules (see the module's docstring).

    Args:
        members: the model's modules (a module outside it, held in a plain attribute, is
            never proved).
        ops: the captured callables (:func:`relu_doctor.functional.functional_ops`).
    """

    def __init__(self, members: Iterable[nn.Module], ops: Iterable[Callable[..., Any]]) -> None:
        self.members = set(members)
        self.ops = frozenset(ops)
        self.names = activation_names(self.ops)
        # Attribute names that may reach a callable on some module of the model (an instance
        # attribute that is not a plain value, a method or other attribute of a class of the
        # user's): ``self.block.act_fn(x)`` or ``self.blocks[0].helper(x)`` names one of these
        # on an object the reading does not follow.
        risky: set[str] = set()
        for m in self.members:
            risky.update(
                k for k, v in vars(m).items() if k not in _MODULE_INTERNALS and not _plain(v)
            )
            for klass in type(m).__mro__:
                if not _torch_class(klass):
                    risky.update(k for k, v in vars(klass).items() if not _plain(v))
        self.risky = frozenset(risky)
        # A module of the user's that makes attributes up (its own __getattr__): no name
        # reached through one can be judged.
        self.dynamic = any(_dynamic(type(m)) for m in self.members)

    def proves(self, module: nn.Module) -> bool:
        """Whether ``module``'s ``forward`` provably calls no functional activation."""
        if "forward" in module.__dict__:
            return False  # a forward set on the instance
        fn = inspect.getattr_static(type(module), "forward", None)
        if not isinstance(fn, types.FunctionType):
            return False
        try:
            return self._function_ok(fn, module, 0, set())
        except Exception:  # a reading that fails proves nothing: the mode stays on
            return False

    def _global_ok(self, name: str, glob: dict[str, Any]) -> bool:
        if name in self.names or name.startswith("_"):
            return False
        if name in glob:
            value = glob[name]
        elif name in _BUILTINS:
            return hasattr(builtins, name)
        else:
            return False  # another builtin (getattr, eval, super ...) or a missing name
        if isinstance(value, types.ModuleType):
            where = value.__name__
            return where == "torch" or where.startswith("torch.") or where in _SAFE_MODULES
        return _plain(value) or _torch_callable(value, self.ops)

    def _other_attr_ok(self, name: str) -> bool:
        """An attribute of something the reading does not follow (a tensor, a torch module,
        a module of the model reached through another): judged by its name."""
        return not (
            self.dynamic or name in self.names or name in self.risky or name.startswith("_")
            or name in _RUNS_FORWARD
        )

    def _self_attr_ok(
        self, module: nn.Module, name: str, depth: int, seen: set[types.CodeType]
    ) -> bool:
        """Whether ``self.<name>`` is safe to use (not when ``module`` has no such attribute:
        one set while it runs, or served by a ``__getattr__`` of its own)."""
        if name in _RUNS_FORWARD or name.startswith("__") or _dynamic(type(module)):
            return False
        owner = next((k for k in type(module).__mro__ if name in vars(k)), None)
        stored = [
            d for d in (module._modules, module._parameters, module._buffers, module.__dict__)
            if name in d
        ]
        if len(stored) + (owner is not None) != 1:
            return False  # none, or one shadowing another (Python's order decides): unread
        if name in module._modules:
            child = module._modules[name]
            return child is None or child in self.members
        if name in module._parameters or name in module._buffers:
            return True
        if name in module.__dict__:
            return _plain(module.__dict__[name])
        assert owner is not None
        attr = vars(owner)[name]
        if _torch_class(owner):  # nn.Module's own methods, a torch built-in parent's
            return True
        found = _function_of(attr)
        if found is None:
            return _plain(attr)
        fn, bound = found
        return self._function_ok(fn, module, depth + 1, seen, bound=bound)

    def _function_ok(
        self, fn: types.FunctionType, module: nn.Module, depth: int,
        seen: set[types.CodeType], *, bound: bool = True,
    ) -> bool:
        code = fn.__code__
        if code in seen:
            return True  # being read further up (recursion): its other names decide
        if depth > _MAX_DEPTH or hasattr(fn, "__wrapped__") or code.co_freevars:
            return False  # too deep to follow, a decorated function, a closure
        if fn in self.ops:
            return False
        seen.add(code)
        self_name = code.co_varnames[0] if bound and code.co_argcount > 0 else None
        globs, mine, other, unread = _read(code, self_name)
        return (
            not unread
            and all(self._global_ok(n, fn.__globals__) for n in globs)
            and all(self._other_attr_ok(n) for n in other)
            # self.relu, a module of the model, may share an op's name
            and all(self._self_attr_ok(module, n, depth, seen) for n in mine)
        )
