"""Differentially private training (Opacus): where no remedy may act.

relu_doctor's statistics are of the raw training data: activations, and gradients before
DP-SGD clips and noises them per sample. A remedy that changes the model or its training
from them (recycling, an activation swap, a learning rate cut, clipping) makes the weights
depend on data that the privacy accountant never saw, so the ε it reports no longer holds.
A PReLU swap also adds a parameter with no per-sample gradient, which Opacus's optimizer
raised on at its next step (a trial). Monitoring alone changes nothing and stays allowed.
"""

from __future__ import annotations

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


_KNOWN: dict[type, bool] = {}  # each module class's answer (a bind walks every module)


def _wraps_privately(cls: type) -> bool:
    """Whether ``cls`` is Opacus's ``GradSampleModule`` (or another of its wrappers)."""
    known = _KNOWN.get(cls)
    if known is None:
        known = _KNOWN[cls] = any(c.__name__ == "AbstractGradSampleModule" for c in cls.__mro__)
    return known


def private_by(model: nn.Module | None, *, deep: bool = True) -> str | None:
    """What trains ``model`` with differential privacy, in words, or None: an Opacus
    ``GradSampleModule`` (any of its modes) around it, or the per-sample-gradient fields
    Opacus puts on the trainable parameters of the model it wraps (``grad_sample``: a model
    watched before ``make_private`` wrapped it, in any mode). Nothing is imported to
    tell. ``deep``: look for a wrapper among every module (one held after a trainable
    module of the model's own: 3 ms on 2800 modules, at a bind); else at the root only,
    with the parameters' fields (at every log a remedy decides at: microseconds).

    Example:
        >>> private_by(nn.Linear(2, 2)) is None
        True
    """
    if model is None:
        return None
    for m in model.modules() if deep else (model,):
        if _wraps_privately(type(m)):
            return f"Opacus ({type(m).__name__})"
    p = next((p for p in model.parameters() if p.requires_grad), None)
    if p is not None and hasattr(p, "grad_sample") and hasattr(p, "_forward_counter"):
        return "Opacus (per-sample gradients on its parameters)"
    return None
