"""Brute-force reference statistics, computed independently of relu_doctor.

Activations are captured with plain forward pre-hooks and forward hooks that clone whole
tensors (the input before any inplace op, the output after); gradients through a
``Tensor.register_hook`` on the output, and dL/d(input) by re-running the activation on the
stored input under autograd. Statistics are then counted in float64 numpy with the
definitions of DESIGN.md, written the slow obvious way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn


@dataclass
class Capture:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    grad_inputs: list[torch.Tensor | None] = field(default_factory=list)


class Recorder:
    """Records every call of the given activation modules, keyed ``(path, call_index)``."""

    def __init__(self, model: nn.Module, types: tuple[type, ...] | None = None) -> None:
        from relu_doctor.families import family_of

        self.model = model
        self.calls: dict[tuple[str, int], Capture] = defaultdict(Capture)
        self._count: dict[str, int] = defaultdict(int)
        self._handles = []
        for path, mod in model.named_modules():
            if (types and isinstance(mod, types)) or (not types and family_of(mod) is not None):
                self._handles.append(mod.register_forward_pre_hook(self._pre(path)))
                self._handles.append(mod.register_forward_hook(self._post(path, mod)))
        self._handles.append(model.register_forward_pre_hook(lambda m, a: self._count.clear()))

    def _pre(self, path):
        def pre(mod, args):
            self._pending = args[0].detach().clone()
        return pre

    def _post(self, path, mod):
        def post(m, args, out):
            idx = self._count[path]
            self._count[path] += 1
            cap = self.calls[(path, idx)]
            inp = self._pending
            cap.inputs.append(inp)
            cap.outputs.append(out.detach().clone())
            if out.requires_grad:
                def on_grad(g, cap=cap, inp=inp, m=m):
                    cap.grads.append(g.detach().clone())
                    x = inp.clone().requires_grad_(True)
                    with torch.enable_grad():
                        y = _replay(m, x)
                    (gi,) = torch.autograd.grad(y, x, g)
                    cap.grad_inputs.append(gi.detach().clone())
                out.register_hook(on_grad)
        return post

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _replay(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    if isinstance(m, nn.RReLU):  # deterministic replay impossible: use its eval slope
        raise NotImplementedError("RReLU gradients are random in training mode")
    clone = copy.deepcopy(m)
    if hasattr(clone, "inplace"):
        clone.inplace = False
    return clone(x)


def units_last(t: torch.Tensor, unit_dim: int) -> np.ndarray:
    a = t.detach().to(torch.float64).cpu().numpy()
    a = np.moveaxis(a, unit_dim, -1)
    return a.reshape(-1, a.shape[-1])


def forward_reference(outputs: list[torch.Tensor], unit_dim: int, cap: float | None = None) -> dict[str, np.ndarray]:
    """Per-unit sums over the given outputs, by the definitions (slow and obvious)."""
    rows = np.concatenate([units_last(o, unit_dim) for o in outputs], axis=0)
    return {
        "elements": np.full(rows.shape[1], rows.shape[0], dtype=np.float64),
        "active": (rows > 0).sum(0).astype(np.float64),
        "sum": rows.sum(0),
        "sum_abs": np.abs(rows).sum(0),
        "sum_sq": (rows**2).sum(0),
        "saturated": (rows >= cap).sum(0).astype(np.float64) if cap is not None else np.zeros(rows.shape[1]),
    }


def grad_reference(grads: list[torch.Tensor], grad_inputs: list[torch.Tensor], unit_dim: int) -> dict[str, np.ndarray]:
    g = np.concatenate([units_last(t, unit_dim) for t in grads], axis=0)
    gi = np.concatenate([units_last(t, unit_dim) for t in grad_inputs], axis=0)
    return {
        "grad_elements": np.full(g.shape[1], g.shape[0], dtype=np.float64),
        "grad_sq": (g**2).sum(0),
        "grad_zero": (gi == 0).sum(0).astype(np.float64),
    }
