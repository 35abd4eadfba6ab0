"""Brute-force reference for functional activation calls, independent of relu_doctor.

No TorchFunctionMode and no module hooks: the functional op is replaced, for the duration of
a ``with`` block, by a plain Python wrapper (``unittest.mock.patch.object`` on
``torch.nn.functional``, ``torch`` or a module instance attribute such as
``TransformerEncoderLayer.activation``). The wrapper finds the module whose ``forward`` called
it from the caller's frame (its ``self``), clones the input before the call (inplace-safe) and
the output after it, and taps dL/d(output) with ``Tensor.register_hook``; dL/d(input) comes
from replaying the out-of-place op on the stored input under autograd. Calls are keyed
``(module path, op, call index)``, the index counting calls of that op by that module within
one forward pass of the root. Statistics are then computed with :mod:`tests.reference`.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn as nn

from tests.reference import Capture


class FunctionalRecorder:
    """Records every call of patched functional ops made directly by a module's code.

    Args:
        model: the root module; a forward pre-hook on it starts each pass's call counts.
        skip: module types whose calls are not recorded (the activation modules, whose own
            ``forward`` calls ``F.relu``: the module reference records those).
    """

    def __init__(self, model: nn.Module, skip: tuple[type, ...] = ()) -> None:
        self.model = model
        self.skip = skip
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.calls: dict[tuple[str, str, int], Capture] = defaultdict(Capture)
        self._count: dict[tuple[str, str], int] = defaultdict(int)
        self._stack = contextlib.ExitStack()
        self._handle = model.register_forward_pre_hook(lambda m, a: self._count.clear())

    def wrap(self, fn: Callable[..., torch.Tensor], op: str) -> Callable[..., torch.Tensor]:
        """A recording stand-in for ``fn``; ``op`` names the site (``relu``)."""

        def wrapper(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            caller = sys._getframe(1).f_locals.get("self")
            path = self.paths.get(id(caller))
            if path is None or (self.skip and isinstance(caller, self.skip)):
                return fn(x, *args, **kwargs)
            inp = x.detach().clone()
            out = fn(x, *args, **kwargs)
            idx = self._count[(path, op)]
            self._count[(path, op)] += 1
            cap = self.calls[(path, op, idx)]
            cap.inputs.append(inp)
            cap.outputs.append(out.detach().clone())
            if out.requires_grad:
                oop = {k: v for k, v in kwargs.items() if k != "inplace"}

                def on_grad(g: torch.Tensor, cap: Capture = cap, inp: torch.Tensor = inp) -> None:
                    cap.grads.append(g.detach().clone())
                    xi = inp.clone().requires_grad_(True)
                    with torch.enable_grad():
                        y = _out_of_place(fn)(xi, *args, **oop)
                    (gi,) = torch.autograd.grad(y, xi, g)
                    cap.grad_inputs.append(gi.detach().clone())

                out.register_hook(on_grad)
            return out

        return wrapper

    def patch(self, owner: Any, name: str, op: str) -> None:
        """Replace ``owner.name`` by a recording wrapper until :meth:`remove`."""
        fn = getattr(owner, name)
        self._stack.enter_context(mock.patch.object(owner, name, self.wrap(fn, op)))

    def remove(self) -> None:
        self._stack.close()
        self._handle.remove()

    def __enter__(self) -> FunctionalRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _out_of_place(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The out-of-place twin of an inplace op (``torch.relu_`` -> ``torch.relu``)."""
    name = getattr(fn, "__name__", "")
    if name.endswith("_"):
        for ns in (torch, torch.nn.functional):
            twin = getattr(ns, name[:-1], None)
            if twin is not None:
                return twin
    return fn


@contextlib.contextmanager
def recording(model: nn.Module, *patches: tuple[Any, str, str], skip: tuple[type, ...] = ()) -> Iterator[FunctionalRecorder]:
    """``with recording(model, (torch.nn.functional, "relu", "relu")) as rec: ...``"""
    rec = FunctionalRecorder(model, skip)
    try:
        for owner, name, op in patches:
            rec.patch(owner, name, op)
        yield rec
    finally:
        rec.remove()


def site_fields(site: Any, which: str = "window") -> dict[str, Any]:
    """A relu_doctor site's raw accumulators as ``{field: float64 numpy array}``."""
    from relu_doctor.stats import ROW

    m = getattr(site.stats, which).detach().to("cpu", torch.float64).numpy()
    return {name: m[i] for name, i in ROW.items()}


def assert_matches(site: Any, expected: dict[str, Any], *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every field of ``expected`` equals the site's window: counts exactly, sums to ``rtol``."""
    import numpy as np

    got = site_fields(site)
    counts = {"elements", "active", "saturated", "grad_elements", "grad_in_elements", "grad_zero"}
    for name, want in expected.items():
        if name in counts:
            np.testing.assert_array_equal(got[name], want, err_msg=f"{site.name}: {name}")
        else:
            scale = max(float(np.abs(want).max()), 1.0)
            np.testing.assert_allclose(
                got[name], want, rtol=rtol, atol=atol * scale, err_msg=f"{site.name}: {name}"
            )


def reference_calls(
    model: nn.Module,
    patches: list[tuple[Any, str, str]],
    run: Callable[[nn.Module], None],
    skip: tuple[type, ...] = (),
) -> dict[tuple[str, str, int], Capture]:
    """Run ``run(copy)`` on a deep copy of ``model`` with the ops patched; the captures.

    A separate copy keeps the reference apart from relu_doctor: a patched ``F.relu`` would
    otherwise reach relu_doctor's TorchFunctionMode as the wrapper, not as ``F.relu``.
    Patches whose owner is ``model`` itself (an instance attribute such as
    ``TransformerEncoderLayer.activation``) are applied to the copy's matching module.
    """
    import copy

    twin = copy.deepcopy(model)
    ids = {id(m): p for p, m in model.named_modules()}
    resolved = []
    for owner, name, op in patches:
        path = ids.get(id(owner))
        resolved.append((twin.get_submodule(path) if path is not None else owner, name, op))
    with recording(twin, *resolved, skip=skip) as rec:
        run(twin)
    return dict(rec.calls)
