"""Differentially private training (Opacus): where no remedy may act.

relu_doctor's statistics are of the raw training data: activations, and gradients before
DP-SGD clips and noises them per sample. A remedy that changes the model or its training
from them (recycling, an activation swap, a learning rate cut, clipping) makes the weights
depend on data that the privacy accountant never saw, so the ε it reports no longer holds.
A PReLU swap also adds a parameter with no per-sample gradient, which Opacus's optimizer
raised on at its next step (a trial). Monitoring alone changes nothing and stays allowed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["PRIVATE", "private_by"]

#: why a remedy refuses, or steps aside, where :func:`private_by` finds private training
PRIVATE = (
    "relu_doctor's remedies decide from statistics of the raw training data (activations, "
    "and gradients before DP-SGD clips and noises them per sample), which the privacy "
    "accounting does not cover: a change made from them would leave the reported epsilon "
    "untrue. Watch without remedies (monitoring changes nothing), and keep its reports "
    "(TensorBoard, the HTML report, unit tables) as private as the data"
)


def _from_opacus(fn: Any) -> bool:
    fn = getattr(fn, "func", fn)  # (a functools.partial's function)
    owner = getattr(fn, "__self__", None)
    where = getattr(fn, "__module__", None) or getattr(type(owner), "__module__", "") or ""
    return str(where).split(".")[0] == "opacus"


def private_by(model: nn.Module | None) -> str | None:
    """What trains ``model`` with differential privacy, in words, or None: an Opacus
    ``GradSampleModule`` around or inside it, or Opacus's per-sample-gradient hooks on its
    modules (a model watched before ``make_private`` wrapped it). Nothing is imported to
    tell. Opacus's expanded-weights mode puts no hook on the model it wraps: only its
    wrapper is found.

    Example:
        >>> private_by(nn.Linear(2, 2)) is None
        True
    """
    if model is None:
        return None
    for m in model.modules():
        if any(c.__name__ == "AbstractGradSampleModule" for c in type(m).__mro__):
            return f"Opacus ({type(m).__name__})"
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                      m._backward_pre_hooks):
            if any(_from_opacus(h) for h in hooks.values()):
                return "Opacus (its per-sample-gradient hooks on the model's layers)"
    return None
