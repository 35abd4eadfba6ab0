"""The dataflow of one forward pass: which torch call made each tensor and which calls read it.

:func:`record_dataflow` runs the model once and keeps every torch call it made (seen through a
:class:`torch.overrides.TorchFunctionMode`), the module whose ``forward`` made it (forward
pre/post hooks on every module keep the stack) and each module call's inputs and outputs.
Tensors are followed by identity: an output that is one of the call's inputs (an in-place
``relu_``, ``out += identity``) is a new version of that tensor. What the pass did is all there
is: any Python control flow, data-dependent or not, is simply what ran. The pass runs without
gradients and leaves the model as it found it: buffers (BatchNorm's running statistics) and
the random number generators' states are restored afterwards.

:mod:`~relu_doctor.remedies.unit_links` reads it to find a site's producer and consumers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from relu_doctor._state import kept_state
from relu_doctor.families import family_of
from relu_doctor.functional import functional_ops
from relu_doctor.probes import is_compile_wrapper, private_passes

__all__ = [
    "Dataflow",
    "ModuleCall",
    "Node",
    "Param",
    "Value",
    "op_name",
    "record_dataflow",
]


#: Calls that read their first tensor's shape, dtype and device only, not its values.
_SHAPE_ONLY = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
})


@dataclass(eq=False)
class Value:
    """One version of one tensor of the pass.

    Attributes:
        node: the call that made it (None: a model input or a tensor from outside the model).
        shape: its shape.
        users: the calls that read it, in order.
        output: whether it is (part of) the model's output.
        data: the tensor itself for integer and boolean tensors (indices, masks), else None.
    """

    node: Node | None
    shape: tuple[int, ...]
    users: list[Node] = field(default_factory=list)
    output: bool = False
    data: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Param:
    """A parameter or buffer of the model read by a call: where it is registered."""

    path: str
    name: str
    module: nn.Module
    tensor: torch.Tensor


@dataclass(eq=False)
class Node:
    """One torch call of the pass.

    Attributes:
        index: its position in the pass (calls are in execution order).
        func: the torch function or ``Tensor`` method called.
        name: its name without a trailing ``_`` (``relu_`` -> ``relu``, ``__iadd__`` kept).
        owner: path of the innermost module running when it was called (``""``: the root).
        args, kwargs: the arguments, tensors replaced by :class:`Value` or :class:`Param`.
        inputs: the :class:`Value` arguments, in order.
        outputs: the tensors it returned, flattened, in order.
    """

    index: int
    func: Callable[..., Any]
    name: str
    owner: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Value]
    outputs: list[Value] = field(default_factory=list)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional) or ``name`` (keyword)."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def weight_arg(self) -> Any:
        """The argument a layer call passes its weight in: ``weight`` (``F.linear``,
        ``F.conv2d``...), ``mat2`` of ``torch.addmm`` (Hugging Face's ``Conv1D``)."""
        return self.arg(2, "mat2") if self.name == "addmm" else self.arg(1, "weight")

    def describe(self) -> str:
        """``"add in layer1.0.forward"``, ``"linear of Linear 'fc'"``."""
        w = self.weight_arg()
        if isinstance(w, Param):
            return f"{self.name} of {type(w.module).__name__} {w.path or '(root)'!r}"
        return f"{self.name} in {self.owner or '(root)'}.forward"


@dataclass(eq=False)
class ModuleCall:
    """One call of a module: its tensor arguments and outputs."""

    path: str
    module: nn.Module
    call_index: int
    inputs: list[Value]
    outputs: list[Value] = field(default_factory=list)
    start: int = 0  # index of the first call made inside it
    end: int = 0  # index after the last one


def op_name(func: Callable[..., Any]) -> str:
    """A torch function's name without a trailing ``_`` (dunder names kept)."""
    name = str(getattr(func, "__name__", None) or repr(func))
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


class Dataflow:
    """What one forward pass of a model did (see :func:`record_dataflow`).

    Attributes:
        nodes: every torch call, in execution order.
        module_calls: ``{module: [its calls in order]}``.
        functional: ``{(owner path, op): [activation calls in order]}`` for the functional
            activation calls, counted as :class:`~relu_doctor.functional.FunctionalCapture`
            counts them (not those made by an activation module's own ``forward``).
        paths: ``{module: its path}`` (the first path a module is registered under).
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.module_calls: dict[nn.Module, list[ModuleCall]] = {}
        self.functional: dict[tuple[str, str], list[Node]] = {}
        self.paths: dict[nn.Module, str] = {}

    def uses_of(self, tensor: torch.Tensor) -> list[Node]:
        """The calls that read the parameter or buffer ``tensor``."""
        return [
            n
            for n in self.nodes
            if any(isinstance(a, Param) and a.tensor is tensor for a in _flat(n.args, n.kwargs))
        ]


def _flat(args: Any, kwargs: Any) -> list[Any]:
    leaves, _ = tree_flatten((args, kwargs))
    return leaves


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.flow = Dataflow()
        self.version: dict[int, Value] = {}
        self.keep: list[torch.Tensor] = []  # every tensor seen stays alive: ids stay unique
        self.params: dict[int, Param] = {}
        for path, mod in model.named_modules():
            if is_compile_wrapper(mod):  # (its module is named: a part compiled apart)
                continue
            self.flow.paths.setdefault(mod, path)
            for name, t in list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)
            ):
                self.params.setdefault(id(t), Param(path, name, mod, t))
        self.stack: list[tuple[nn.Module, str]] = []
        self.open: list[ModuleCall] = []
        self.calls: dict[tuple[str, str], int] = {}
        self.ops = functional_ops()

    # ------------------------------------------------------------------ values
    def value_of(self, t: torch.Tensor) -> Value | Param:
        p = self.params.get(id(t))
        if p is not None and p.tensor is t:
            return p
        v = self.version.get(id(t))
        if v is None:
            v = self._new(t, None)
        return v

    def _new(self, t: torch.Tensor, node: Node | None) -> Value:
        exact = t.dtype in (
            torch.bool,
            torch.uint8,
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
        )
        v = Value(node, tuple(t.shape), data=t if exact else None)
        self.keep.append(t)
        self.version[id(t)] = v
        return v

    def _wrap(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self.value_of(x)
        if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            return type(x)(self._wrap(y) for y in x) if not hasattr(x, "_fields") else x
        return x

    # ------------------------------------------------------------------ calls
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in _flat(out, None) if isinstance(t, torch.Tensor)]
        name = op_name(func)
        if not outs and name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            outs = [args[0]]  # t[i] = v: a new version of t, which reads v (and t)
        if not outs:
            return out  # x.shape, x.dim(): no data flows
        wargs = tuple(self._wrap(a) for a in args)
        wkwargs = {k: self._wrap(v) for k, v in kwargs.items()}
        # (a tensor made in another's shape reads none of its values: GNN code's buffers,
        # torch.zeros_like(h), had h's units refused as "reaching zeros_like")
        read = (wargs[1:], {k: v for k, v in wkwargs.items() if k != "input"}) if (
            name in _SHAPE_ONLY) else (wargs, wkwargs)
        inputs = [v for v in _flat(*read) if isinstance(v, Value)]
        owner = self.stack[-1][1] if self.stack else ""
        node = Node(len(self.flow.nodes), func, name, owner, wargs, wkwargs, inputs)
        self.flow.nodes.append(node)
        for v in inputs:
            if node not in v.users:
                v.users.append(node)
        node.outputs = [self._new(t, node) for t in outs]
        spec = self.ops.get(func)
        if spec is not None and not (self.stack and family_of(self.stack[-1][0]) is not None):
            self.flow.functional.setdefault((owner, spec[1]), []).append(node)
        return out

    def pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        path = self.flow.paths.get(module, "?")
        calls = self.flow.module_calls.setdefault(module, [])
        ins = [self.value_of(t) for t in _flat(args, kwargs) if isinstance(t, torch.Tensor)]
        vals = [v for v in ins if isinstance(v, Value)]
        calls.append(ModuleCall(path, module, len(calls), vals, start=len(self.flow.nodes)))
        self.open.append(calls[-1])
        self.stack.append((module, path))

    def post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.stack and self.stack[-1][0] is module:
            self.stack.pop()
        if self.open and self.open[-1].module is module:
            call = self.open.pop()
            outs = [self.value_of(t) for t in _flat(output, None) if isinstance(t, torch.Tensor)]
            call.outputs = [v for v in outs if isinstance(v, Value)]
            call.end = len(self.flow.nodes)


def record_dataflow(
    model: nn.Module,
    example_inputs: Any,
    *,
    kwargs: dict[str, Any] | None = None,
    call: nn.Module | None = None,
    training: bool = False,
) -> Dataflow:
    """Run ``model`` once on ``example_inputs`` and record what it did.

    The pass runs under ``torch.no_grad()`` in the model's current mode (training or eval),
    or in training mode (``training``: every module's mode restored after); afterwards its
    buffers and the random number generators are as they were, and no probe (a ``watch``
    on the model) records it.

    Args:
        model: the model.
        example_inputs: the positional input(s): a tensor, or a tuple of arguments.
        kwargs: keyword arguments of the call.
        call: the module to call (default: ``model``), a submodule of it: what a wrapper
            whose own ``forward`` is never called runs.
        training: run it in training mode, as training runs the model (what only runs
            there, a deep-supervision head, is part of the flow), whatever mode the model
            is in now (a remedy deciding after a validation pass in eval mode).

    Returns:
        The :class:`Dataflow`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> flow = record_dataflow(net, torch.randn(4, 2))
        >>> [n.name for n in flow.nodes]
        ['linear', 'relu', 'linear']
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    rec = _Recorder(model)
    handles = []
    modes = {m: m.training for m in model.modules()} if training else {}
    try:
        if training:
            model.train()
        for mod in rec.flow.paths:
            handles.append(mod.register_forward_pre_hook(rec.pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(rec.post, with_kwargs=True, always_call=True))
        # (a part compiled apart runs eagerly: Dynamo, tracing it under this mode and the
        # hooks, raised, and every site of the model went unlinked, a review)
        with kept_state(model), private_passes(), torch.no_grad(), \
                torch.compiler.set_stance("force_eager"), rec:
            out = (call or model)(*args, **(kwargs or {}))
        for t in _flat(out, None):
            if isinstance(t, torch.Tensor):
                v = rec.version.get(id(t))
                if v is not None:
                    v.output = True
    finally:
        for h in handles:
            h.remove()
        for m, was in modes.items():
            m.training = was
    rec.keep.clear()
    rec.version.clear()
    return rec.flow
