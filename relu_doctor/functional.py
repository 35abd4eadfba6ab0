"""Functional-call capture: ``F.relu`` and friends called inside a module's ``forward``.

Real models do not all hold one activation module per place: DenseNet-style blocks call
``F.relu`` in ``forward``, ``nn.TransformerEncoderLayer`` applies ``F.relu`` by default,
code writes ``x.relu()``. :class:`FunctionalCapture` sees these calls through a
:class:`torch.overrides.TorchFunctionMode` that is entered when a forward pass of the model
starts (the outermost module call) and left when it ends, and records each call with
:meth:`~relu_doctor.probes.Probe.record`, exactly as the module hooks do: forward statistics
now, a gradient tap on the output's autograd node for later.

A call is named after the innermost module running when it is made, so forward
pre/post hooks keep a module stack: ``F.relu`` called twice in
``features.denselayer1.forward`` gives the sites ``features.denselayer1:relu#0`` and
``features.denselayer1:relu#1``. Calls made while a ReLU-family module runs (``nn.ReLU``'s own
``forward`` calls ``F.relu``) are left to the module hooks, so nothing is counted twice.
Calls outside every module of the model are not captured.

A call made inside a module that is not part of the model but is called from its forward (a
frozen teacher held in a plain attribute or a closure) is named after the outermost such
module, by class and instance order within the pass: ``Teacher#0:relu#0``; an activation
module made in the forward itself (``nn.ReLU()(x)``) is a call of the module that made it.
It is found by walking the Python frames up from the call to the model's module (only for
captured calls, about a microsecond each; not under ``torch.compile``, where the call is
named after the model's module).

Passes: whether a pass is captured is decided at its start by the probe
(:meth:`~relu_doctor.probes.Probe.begin_pass`: its stream, ``collecting``, ``paused``); a pass
left out never enters the mode.

Cost: the mode sends every torch call made while it is on through Python, so it is on only
while the innermost running module is one whose own ``forward`` may call an activation (a
class of the user's, a transformer layer); it is off inside ``nn.Sequential``, ``nn.ReLU``
and the other ``torch.nn`` built-ins. Those are not hooked unless they hold such a module, or
run inside one and cost the mode more than two hooks (a ``BatchNorm2d`` in a residual block:
see ``_mode_boundary``); a one-call leaf such as ``nn.Conv2d`` stays in the mode (about 2 us).
On steps that collect nothing the mode is never entered. A module of the user's whose
``forward`` provably calls no functional activation (:mod:`relu_doctor._forward_reading`
reads its bytecode: a residual block that only calls its child modules) is treated as a
built-in after the first recorded pass, which runs with the mode on as a check: a ResNet-like
model then runs with no mode and one pair of capture hooks, on its root.

Activation checkpointing: calls recomputed during backward add no forward statistics; with
reentrant checkpointing, whose first forward ran without autograd, the recomputed call is
where the gradient tap goes (as the probe does for module sites).

Captured ops: every functional op of a registered family (``Family.functionals``:
``F.relu``, ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``F.relu6``, ``F.leaky_relu``,
``F.leaky_relu_``, ``F.prelu``, ``F.rrelu``, ``F.elu``, ``F.celu``, ``F.selu``, ``F.gelu``,
``F.silu``, ``F.hardtanh``, ...) and the tensor methods ``Tensor.relu``, ``Tensor.relu_``
and ``Tensor.prelu``. The inplace and out-of-place forms of one op share one name
(``relu``), so their call indices count together. Not captured: ``clamp``/``clamp_min``/
``torch.maximum`` written as an activation, and activations applied outside every module of
the model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from relu_doctor._forward_reading import ForwardReader
from relu_doctor._hooks import HookOwner, Hooks
from relu_doctor._observing_mode import ObservingMode
from relu_doctor.families import FAMILIES, Family, family_of
from relu_doctor.probes import Probe, RecomputedCalls, eager_modules, in_backward
from relu_doctor.sites import SiteKey, module_label

__all__ = ["FunctionalCapture", "functional_ops"]

# Tensor methods that are ReLU-family activations (no Family lists methods).
_METHODS: dict[Callable[..., Any], str] = {
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    torch.Tensor.prelu: "prelu",
}


def _op_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or repr(fn)
    return name[:-1] if name.endswith("_") else name


def functional_ops() -> dict[Callable[..., Any], tuple[Family, str]]:
    """Every captured callable, mapped to ``(family, op name)``.

    Built from the registered families at call time, so a family registered with
    :func:`~relu_doctor.families.register_family` (``functionals=...``) is captured too.

    Example:
        >>> import torch.nn.functional as F
        >>> fam, op = functional_ops()[F.relu_]
        >>> fam.name, op
        ('relu', 'relu')
    """
    ops: dict[Callable[..., Any], tuple[Family, str]] = {}
    for fam in FAMILIES.values():
        for fn in fam.functionals:
            ops[fn] = (fam, _op_name(fn))
    for fn, op in _METHODS.items():
        for fam in FAMILIES.values():
            if any(_op_name(f) == op for f in fam.functionals):
                ops.setdefault(fn, (fam, op))
                break
    return ops


def _may_call_functional(module: nn.Module) -> bool:
    """Whether ``module.forward`` may call a functional activation itself (not a
    ``torch.compile`` wrapper's: its module's own forward is what runs)."""
    where = type(module).__module__
    if where.startswith("torch._dynamo."):
        return False
    return not where.startswith("torch.nn.modules.") or where == "torch.nn.modules.transformer"


# Built-in leaves whose forward is one torch call made from C (the mode costs it about 2 us,
# less than the two hooks that would turn the mode off around it).
_ONE_CALL = (nn.Linear, nn.modules.conv._ConvNd, nn.Identity, nn.Flatten, nn.Unflatten,
             nn.modules.dropout._DropoutNd)


def _mode_boundary(module: nn.Module) -> bool:
    """Whether the mode should be off while ``module`` runs inside a module that keeps it on:
    a built-in that never calls an activation itself and whose calls cost the mode more than
    two hooks do: a normalisation (``F.batch_norm`` goes through ``handle_torch_function``
    in Python, about 16 us), a pooling or embedding layer, attention, a recurrent layer, a
    container of such."""
    return (
        not _may_call_functional(module)
        and family_of(module) is None
        and not isinstance(module, _ONE_CALL)
    )


# A module on the stack: (its path, whether its own forward may call an activation).
_Entry = tuple[str, bool]

# The frame of a module call (nn.Module.__call__ runs it); its ``self`` is the module.
_CALL_IMPL_CODE = nn.Module._call_impl.__code__


class _CaptureHooks(Hooks):
    """A functional capture's module hooks (see :class:`~relu_doctor._hooks.Hooks`)."""

    __slots__ = ()
    owner: FunctionalCapture

    def pre(self, module: nn.Module, args: Any) -> None:
        self.owner._pre(module, args)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._post(module, args, output)


class FunctionalCapture(HookOwner):
    """Captures functional ReLU-family calls made inside a model's modules.

    Created by :class:`~relu_doctor.doctor.Doctor` unless ``functional=False``; use it
    directly next to a :class:`~relu_doctor.probes.Probe` of your own.

    Args:
        probe: the probe that owns the sites (its model, selection, unit dims, gradient
            settings and ``collecting`` flag apply to functional sites too).

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 4)
        ...     def forward(self, x):
        ...         return F.relu(self.fc(x))
        >>> net = Net()
        >>> probe = Probe(net, require_modules=False).attach()
        >>> cap = FunctionalCapture(probe).attach()
        >>> _ = net(torch.randn(2, 3))
        >>> [s.name for s in probe.sites()]
        ['(root):relu#0']
        >>> cap.detach(); probe.detach()
    """

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._on = _CaptureHooks(self)  # the callables in the modules' hook dicts
        self._ops = functional_ops()
        self._may_capture: tuple[int, bool] | None = None  # (probe generation, may_capture())
        self._mode = ObservingMode(self._observe)
        self._attached = False
        # module -> (its stack entry, its two hook handles)
        self._hooked: dict[nn.Module, tuple[_Entry, tuple[RemovableHandle, ...]]] = {}
        self._generation_seen = -1  # the probe's attach generation our hooks match
        # Innermost last; one stack for forward passes, one for backward recomputation.
        self._stack: list[_Entry] = []
        # Depth of hooked calls in a pass left out (another stream's): its end is the
        # outermost call's, not the first call's that ends with an empty stack.
        self._left_out = 0
        #: calls of a boundary module on its own, outside any pass (Python int)
        self.outside_calls = 0
        self._bw_stack: list[_Entry] = []
        self._mode_on = False
        self._calls: dict[tuple[str, str], int] = {}
        self._recomputed = RecomputedCalls()  # calls recomputed in backward (checkpoints)
        self._selected: dict[str, bool] = {}
        self._members: set[nn.Module] = set()  # the model's modules (foreign = not in it)
        # Modules hooked only to turn the mode off inside them (see _mode_boundary): called
        # outside a pass (model.emb(ids) in the loop) they neither start nor end one.
        self._boundaries: set[nn.Module] = set()
        self._foreign: dict[nn.Module, str] = {}  # foreign module -> its label, this pass
        self._foreign_count: dict[str, int] = {}
        # The reading of forwards (relu_doctor._forward_reading) is trusted after the first
        # recorded pass, which runs with the mode on wherever a call may come from; the
        # modules whose own code made a call in it are never trusted.
        self._trust_reading = False
        self._resync = False
        self._called_from: set[str] = set()
        self._pausing = False  # told the probe to pause the mode in parts compiled apart

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> FunctionalCapture:
        """Register the pre/post forward hooks (idempotent)."""
        if self._attached:
            return self
        self._ops = functional_ops()
        self._attached = True
        if not self._pausing:  # (once: a part compiled apart runs with the mode off)
            self._pausing = True
            self.probe.on_compiled_part(self._pause, self._set_mode)
        try:
            self._sync()
        except BaseException:
            self.detach()
            raise
        return self

    def _sync(self) -> None:
        """Hook the modules of the model now, unhook those no longer in it.

        Hooked: the ReLU-family modules, every module whose ``forward`` may call a functional
        activation (any class not built into ``torch.nn``, and the transformer layers), and
        all their ancestors. A built-in leaf such as ``nn.Conv2d`` never calls ``F.relu``, so
        leaving it off the stack names no call differently and saves two hooks per call.
        Also hooked, as boundaries where the mode goes off: the built-ins run inside a
        module that keeps the mode on whose calls cost the mode more than two hooks
        (:func:`_mode_boundary`: a ``BatchNorm2d`` in a user's residual block, the
        ``nn.Sequential`` of a downsample path).

        Runs at attach and again when the probe re-attached (``Probe.refresh()`` after a
        remedy swapped an activation module): a new ``nn.LeakyReLU`` must be on the stack, or
        the ``F.leaky_relu`` inside it would count as a call of its parent.
        """
        named = eager_modules(self.probe.model)
        self._members = {m for _p, m in named}
        # include/exclude apply to the path of the module making the call (decided here, not
        # per call: a cache filled during a pass would make torch.compile recompile).
        self._selected = {path: self.probe.selected(path) for path, _ in named}
        reader = ForwardReader(self._members, self._ops) if self._trust_reading else None
        may = {
            mod: _may_call_functional(mod)
            and not (
                reader is not None and path not in self._called_from and reader.proves(mod)
            )
            for path, mod in named
        }
        keep = {""}
        for path, mod in named:
            if may[mod] or family_of(mod) is not None:
                parts = path.split(".") if path else []
                keep.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        current: dict[nn.Module, _Entry] = {}
        boundaries: set[nn.Module] = set()
        mode_on: dict[str, bool] = {}  # whether the mode is on while the module runs
        for path, mod in named:
            outer = bool(path) and mode_on.get(path.rpartition(".")[0], False)
            if path in keep:
                current[mod] = (path, family_of(mod) is None and may[mod])
                mode_on[path] = current[mod][1]
            elif outer and _mode_boundary(mod):
                current[mod] = (path, False)
                boundaries.add(mod)
                mode_on[path] = False
            else:
                mode_on[path] = outer
        if not any(on for _path, on in current.values()):
            # The mode is never on: the stack names nothing. The root's hooks stay, to start
            # and end passes and to see a re-hooked probe.
            root = named[0][1]
            current = {root: current[root]}
            boundaries = set()
        self._resync = False
        # After Probe.refresh() the probe's hooks come after ours: re-register ours on the
        # activation modules, so the mode is still off while the probe's hooks run.
        refreshed = bool(self._hooked) and self._generation_seen != self.probe.generation
        for mod in [
            m
            for m, (entry, _h) in self._hooked.items()
            if current.get(m) != entry or (refreshed and family_of(m) is not None)
        ]:
            self.probe.hooks.remove(self._hooked.pop(mod)[1])
        add = self.probe.hooks.add  # parked with the probe's on steps that collect nothing
        for mod, entry in current.items():
            if mod not in self._hooked:
                handles = (
                    add(mod.register_forward_pre_hook(self._on.pre)),
                    add(self._on.own_flags(
                        mod.register_forward_hook(self._on.post, always_call=True))),
                )
                self._hooked[mod] = (entry, handles)
        self._boundaries = boundaries
        self._generation_seen = self.probe.generation

    def detach(self) -> None:
        """Remove every hook and leave the mode if a pass was interrupted (idempotent)."""
        hooked, self._hooked = self._hooked, {}
        self._boundaries = set()
        self.probe.hooks.remove([h for _entry, handles in hooked.values() for h in handles])
        self._attached = False
        self._left_out = 0
        self._stack.clear()
        self._bw_stack.clear()
        self._set_mode(False)

    def close_pass(self) -> None:
        """Between steps no pass is open: one whose end never came (torch skips the always-
        called hooks when one of them raised) is closed here, its mode left."""
        self._recomputed.clear()
        if self._stack or self._bw_stack or self._left_out:
            self._stack.clear()
            self._bw_stack.clear()
            self._left_out = 0
            self._calls.clear()
            self._set_mode(False)

    @property
    def attached(self) -> bool:
        return self._attached

    def may_capture(self) -> bool:
        """Whether some module of the model may call a functional activation in its own
        ``forward`` by the reading of forwards (:mod:`relu_doctor._forward_reading`; a
        module whose code made a call in a recorded pass is never proved free, and a holder
        with no ``forward`` of its own calls nothing): a pass that made no such call may have
        skipped it (a branch, stochastic depth), not shown that there is none. Read once per
        hooking of the model."""
        if self._may_capture is not None and self._may_capture[0] == self.probe.generation:
            return self._may_capture[1]
        named = eager_modules(self.probe.model)
        reader = ForwardReader([m for _p, m in named], self._ops)
        may = any(
            _may_call_functional(mod) and type(mod).forward is not nn.Module.forward
            and (path in self._called_from or not reader.proves(mod))
            for path, mod in named
        )
        self._may_capture = (self.probe.generation, may)
        return may

    def __enter__(self) -> FunctionalCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ module stack
    def _pause(self) -> bool:
        """Leave the mode while a part compiled apart runs (Probe.on_compiled_part)."""
        was = self._mode_on
        self._set_mode(False)
        return was

    def _set_mode(self, on: bool) -> None:
        """Push or pop the mode. It is only popped from the top of the mode stack: a mode
        the user entered inside a forward keeps ours on until it is left (calls are still
        attributed right; they only cost a Python round trip)."""
        if on == self._mode_on:
            return
        if on:
            self._mode.__enter__()  # type: ignore[no-untyped-call]
            self._mode_on = True
        elif torch.compiler.is_compiling() or (
            torch._C._len_torch_function_stack() > 0
            and torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
            is self._mode
        ):
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._mode_on = False

    def _want_mode(self, stack: list[_Entry]) -> bool:
        if not stack:
            return False
        # Under torch.compile the mode stays on for the whole pass: Dynamo traces it, and the
        # compiled graph pays nothing for it.
        return stack[-1][1] or torch.compiler.is_compiling()

    def _pre(self, module: nn.Module, args: Any) -> None:
        """The pre-forward hook of every module whose forward makes functional calls (through
        :class:`_CaptureHooks`, not a closure per module: see :class:`~relu_doctor._hooks.Hooks`)."""
        if not self.probe._collecting:  # no pass is recorded on this step (see Probe)
            return
        hooked = self._hooked.get(module)
        if hooked is None:  # a module not of the model (see Probe._enter)
            return
        mine = hooked[0]
        bw = in_backward()
        stack = self._bw_stack if bw else self._stack
        if not stack and module in self._boundaries:
            self.outside_calls += 1  # (a model whose own forward never runs: see Probe)
            return  # called on its own, outside the model's forward: not a pass
        if not stack:
            if bw:
                if self.probe.stream == "eval":
                    return
            else:
                # (left out: the mode stays off)
                if not self.probe.begin_pass(at=mine[0], module=module, args=args):
                    self._left_out += 1
                    return
                resync = self._resync and not (
                    self.probe._compiled or torch.compiler.is_compiling()
                )
                if self.probe.generation != self._generation_seen or resync:
                    # the probe re-hooked (modules may have been swapped), or the first
                    # recorded pass ended (the reading of forwards is trusted now)
                    self._sync()
                    if module not in self._hooked:
                        return  # no _post will come for it
                    mine = self._hooked[module][0]  # _sync may have changed it
                self._calls.clear()
                self._foreign.clear()
                self._foreign_count.clear()
        stack.append(mine)
        self._set_mode(self._want_mode(stack))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.probe._collecting or module not in self._hooked:
            return
        bw = in_backward()
        stack = self._bw_stack if bw else self._stack
        if not stack and module in self._boundaries:
            return  # its pre-hook pushed nothing
        if not stack:
            if not bw:
                if self._left_out:
                    self._left_out -= 1
                if not self._left_out:
                    self.probe.end_pass()
            return
        stack.pop()
        other = self._stack if bw else self._bw_stack
        self._set_mode(self._want_mode(stack) if stack else self._want_mode(other))
        if stack:
            return
        if not bw:
            # Empty between passes: torch.compile sees one state at every start.
            self._calls.clear()
            self._foreign.clear()
            self.probe.note_output(self._hooked[module][0][0], output)
            self.probe.end_pass()
            if not (self._trust_reading or self.probe._compiled
                    or torch.compiler.is_compiling()):
                # (not once compiled: new hooks would make torch.compile recompile)
                self._trust_reading = self._resync = True

    # ------------------------------------------------------------------ capture
    def _observe(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """The mode shows every torch call here; the ReLU-family ones are recorded."""
        spec = self._ops.get(func)
        if spec is not None:
            self._on_call(spec, args, kwargs, out)

    def _on_call(
        self, spec: tuple[Family, str], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        bw = in_backward()
        stack = self._bw_stack if bw else self._stack
        if not stack or not self.probe.collecting or (
                self.probe.paused and (not bw or self.probe.paused_in_backward)):
            return  # (paused in a pass: a forward hook of yours computing F.relu itself)
        path, calls_functional = stack[-1]
        if not calls_functional:  # e.g. nn.ReLU.forward calling F.relu: its hook records it
            return
        if not (self._trust_reading or torch.compiler.is_compiling()):
            self._called_from.add(path)  # (a set changed in a trace would recompile)
        if not self._selected.get(path, False):
            return
        if not bw and not torch.compiler.is_compiling():
            path = self._foreign_label() or path
        fam, op = spec
        key = (path, op)
        if bw:  # recomputed by activation checkpointing: see Probe.tap_recomputed
            idx = self._recomputed.next_index(key)
            if self._recomputed.spread is not None:
                self.probe.warn_spread(f"{module_label(path)}:{op}")
            self.probe.tap_recomputed(out, SiteKey(path, idx, op))
            return
        idx = self._calls.get(key, 0)
        self._calls[key] = idx + 1
        module = self._hardtanh_of(args, kwargs) if fam.name == "hardtanh" else None
        self.probe.record(out, path=path, call_index=idx, family=fam, module=module, op=op)

    def _foreign_label(self) -> str | None:
        """The label of the outermost module outside the model running between this call
        and the model's innermost running module (``Teacher#0``), or None when there is
        none: Python frames are walked up to the first call of a module of the model."""
        frame: FrameType | None = sys._getframe(1)
        outer: nn.Module | None = None
        while frame is not None:
            if frame.f_code is _CALL_IMPL_CODE:
                mod = frame.f_locals.get("self")
                if mod in self._members:
                    break
                if isinstance(mod, nn.Module):
                    outer = mod
            frame = frame.f_back
        else:
            return None  # not inside the model after all: keep the stack's attribution
        if outer is None or (family_of(outer) is not None and not outer._modules):
            # An activation module made in the model's forward (``nn.ReLU()(x)``, as
            # DistilBERT's classifier head does): an inline activation of the calling
            # module, named after it as a functional call there is.
            return None
        label = self._foreign.get(outer)
        if label is None:
            cls = type(outer).__name__
            k = self._foreign_count.get(cls, 0)
            self._foreign_count[cls] = k + 1
            label = self._foreign[outer] = f"{cls}#{k}"
        return label

    @staticmethod
    def _hardtanh_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Hardtanh:
        """A Hardtanh module with the call's bounds (the site's cap is read from it). Made
        per call, not cached: a cache filled during a pass would make torch.compile
        recompile; functional hardtanh is rare enough for this to cost nothing that counts."""
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return nn.Hardtanh(float(lo), float(hi))
