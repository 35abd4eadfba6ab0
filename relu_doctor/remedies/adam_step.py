"""Adam's step count restarted for recycled slices, exactly, on torch's own Adam and AdamW.

One idea: torch's ``Adam``/``AdamW`` keep one ``step`` per parameter tensor, so a recycled
slice (moments zeroed by :func:`~relu_doctor.remedies._optim_state.reset_state_slices`) would
get the bias correction of the tensor's old step ``t``: its first update is about
``(1 - b1) / sqrt(1 - b2)``, 3.2 times ``lr * sign(g)`` for the default betas, instead of
``lr * sign(g)``. Continual Backprop's ``AdamGnT`` (Dohare et al. 2024) keeps a step per
element and sets it to 0 for a replaced unit; this module gives torch's optimizers the same
behaviour without replacing them.

How: after each ``optimizer.step()``, a step post-hook replaces, on each recycled slice still
in its bias-correction warm-up, the update torch applied (bias corrections of ``t``) by the
update with the slice's own step ``s = t - t0`` (``t0``: the tensor's step at recycling)::

    p += lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
       - lr / (1 - b1**s) * m / (sqrt(v) / sqrt(1 - b2**s) + eps)

with ``m``, ``v`` the moments torch just updated (``v``: ``max_exp_avg_sq`` with amsgrad).
The moments do not depend on the step count and the weight decay term (L2 in the gradient,
or AdamW's decoupled ``p *= 1 - lr * wd``) is the same in both updates, so the parameters
follow per-element-step Adam exactly (to float rounding), for the for-loop, foreach and
fused implementations alike. A slice is forgotten once ``max(b1, b2)**s <= 2**-24`` (both
corrections then within float32 resolution of 1): the state is O(recycled slices in warm-up).

The step of a non-capturable, non-fused Adam lives on the CPU, so ``s`` is read there at no
cost; a fused or capturable optimizer keeps it on the device, and the correction is then
computed there from ``s = t - t0`` without a host read (the slice is forgotten after that
many steps with a gradient, counted on the host). A fused step skipped by a ``GradScaler``
(``optimizer.found_inf``) leaves the slice unchanged too. The hook runs before the
optimizer's other step post-hooks (an EMA hook sees the corrected parameters).

Bookkeeping is per optimizer (one hook each, shared by every remedy, a later recycling of an
element overriding an earlier one); :class:`AdamStepRestart` is a remedy's side of it: the
``reset_adam_step`` option, its checks, its checkpoint state.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from relu_doctor._validate import flag
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.remedies._optim_state import SliceFn

__all__ = [
    "NEGLIGIBLE",
    "AdamStepRestart",
    "check_adam_step_optimizers",
    "restart_adam_step",
    "tracked_slices",
]

#: A slice is forgotten once ``max(b1, b2)**s`` is at most this (float32's unit roundoff).
NEGLIGIBLE = 2.0**-24


def check_adam_step_optimizers(name: str, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Raise :class:`~relu_doctor.errors.ReluDoctorError` (naming ``name``) unless every
    optimizer is a ``torch.optim.Adam`` or ``AdamW`` (subclasses included) without
    ``differentiable`` groups or complex parameters: the ones whose step the hook can
    restart exactly."""
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Adam):
            raise ReluDoctorError(
                f"{name}: restarting Adam's step count needs torch.optim.Adam or AdamW "
                f"optimizers, got {type(opt).__name__} at position {i}; pass "
                f"{name}=False for other optimizers."
            )
        for g in opt.param_groups:
            if g.get("differentiable", False):
                raise ReluDoctorError(
                    f"{name}: optimizer {i} has a differentiable param group, which the step "
                    f"restart cannot follow; pass {name}=False."
                )
            if any(torch.is_complex(p) for p in g["params"]):
                raise ReluDoctorError(
                    f"{name}: optimizer {i} has complex parameters, which the step restart "
                    f"does not handle; pass {name}=False."
                )


# ---------------------------------------------------------------------- the maths


def _subtracted(
    m: torch.Tensor, v: torch.Tensor, lr: Any, b1: Any, b2: Any, eps: Any, k: Any
) -> torch.Tensor:
    """What one Adam step with step count ``k`` (a number or a tensor) subtracts from the
    parameter, given the moments it just updated (torch's formula)."""
    bc1 = 1 - b1**k
    bc2 = 1 - b2**k
    out: torch.Tensor = m / (v.sqrt() / bc2**0.5 + eps) * (lr / bc1)
    return out


def _on_host(step: torch.Tensor) -> bool:
    """Whether a ``step`` tensor can be read without a device sync."""
    return step.device.type == "cpu"


def _number(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


# ---------------------------------------------------------------------- the bookkeeping


@dataclass
class _Run:
    """Elements of one parameter recycled at the same step: their ``index`` (one long tensor
    per dimension, on the parameter's device), the tensor's step ``step0`` at recycling (a
    number, or a device tensor for a device-side step) and the steps taken since (host)."""

    index: tuple[torch.Tensor, ...]
    step0: float | torch.Tensor
    steps: int = 0


@dataclass
class _Book:
    group: dict[str, Any]
    runs: list[_Run]


def _flat(index: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    """Row-major linear positions of ``index`` in a tensor of ``shape``."""
    out = torch.zeros_like(index[0])
    for d, ix in enumerate(index):
        out = out * int(shape[d]) + ix
    return out


class _Tracker:
    """The recycled slices of one optimizer's parameters, and its step post-hook."""

    def __init__(self) -> None:
        self.books: dict[torch.Tensor, _Book] = {}
        self.handle: RemovableHandle | None = None
        self.warned = False

    def add(self, opt: torch.optim.Optimizer, p: torch.Tensor, runs: list[_Run]) -> None:
        """Track ``runs`` of ``p``; elements already tracked take the newer run's step."""
        book = self.books.get(p)
        if book is None:
            group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                return
            book = self.books[p] = _Book(group, [])
        new = torch.cat([_flat(r.index, p.shape) for r in runs])
        kept = []
        for old in book.runs:
            stay = ~torch.isin(_flat(old.index, p.shape), new)
            if bool(stay.all()):
                kept.append(old)
            elif bool(stay.any()):
                kept.append(_Run(tuple(ix[stay] for ix in old.index), old.step0, old.steps))
        book.runs = kept + runs
        self._hook(opt)

    def _hook(self, opt: torch.optim.Optimizer) -> None:
        if self.handle is not None or not self.books:
            return
        self.handle = opt.register_step_post_hook(self)
        hooks = getattr(opt, "_optimizer_step_post_hooks", None)
        if isinstance(hooks, OrderedDict) and self.handle.id in hooks:
            hooks.move_to_end(self.handle.id, last=False)  # before an EMA hook, say

    def release(self) -> None:
        self.books.clear()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __call__(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The hook is never removed here: torch iterates over the optimizer's hook dict
        # while it calls this, and a removal would make the step raise "OrderedDict mutated
        # during iteration" in the next hook. With nothing tracked it returns at once.
        if not self.books:
            return
        try:
            with torch.no_grad():
                self._correct(opt)
        except Exception as e:  # do no harm: warn once, step aside
            self.books.clear()
            warnings.warn(
                f"reset_adam_step: restarting Adam's step for recycled slices failed "
                f"({type(e).__name__}: {e}); their bias correction is torch's from now on.",
                ReluDoctorWarning,
                stacklevel=2,
            )
            return

    def _correct(self, opt: torch.optim.Optimizer) -> None:
        found_inf = getattr(opt, "found_inf", None)
        for p, book in list(self.books.items()):
            st = opt.state.get(p)
            if p.grad is None or not st or "step" not in st:
                continue  # not stepped this time: its step did not move
            g = book.group
            lr, eps = g["lr"], g["eps"]
            b1, b2 = g["betas"]
            skip = found_inf if g.get("fused") else None
            m = st["exp_avg"]
            v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
            t = st["step"]
            host = _on_host(t)
            tv: Any = _number(t) if host else t.to(m.dtype)  # powers in the moments' dtype
            horizon = max(_number(b1), _number(b2))
            keep = []
            for run in book.runs:
                s: Any = tv - run.step0
                if host:
                    if s < 1:
                        if skip is not None:  # a skipped step: the slice waits
                            keep.append(run)
                        elif not self.warned:  # the optimizer's step went back
                            self.warned = True
                            warnings.warn(
                                "reset_adam_step: an optimizer's step is behind the one "
                                "recorded when its slices were recycled (its state loaded "
                                "from an earlier checkpoint than the remedy's?); those "
                                "slices keep torch's bias correction.",
                                ReluDoctorWarning,
                                stacklevel=3,
                            )
                        continue
                    run.steps = round(s)
                else:
                    run.steps += 1
                mi, vi = m[run.index], v[run.index]
                fix = _subtracted(mi, vi, lr, b1, b2, eps, tv) - _subtracted(
                    mi, vi, lr, b1, b2, eps, s
                )
                if not host or skip is not None:
                    ok = torch.as_tensor(s >= 1, device=p.device)
                    if skip is not None:
                        ok = ok & (skip.to(p.device) == 0)
                    fix = torch.where(ok, fix, torch.zeros_like(fix))
                p.index_put_(run.index, p[run.index] + fix.to(p.dtype))  # unique indices
                if horizon**run.steps > NEGLIGIBLE:
                    keep.append(run)
            if keep:
                book.runs = keep
            else:
                del self.books[p]


_TRACKERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Tracker] = (
    weakref.WeakKeyDictionary()
)


def _tracker(opt: torch.optim.Optimizer) -> _Tracker:
    tr = _TRACKERS.get(opt)
    if tr is None:
        tr = _TRACKERS[opt] = _Tracker()
    return tr


def restart_adam_step(
    optimizers: Sequence[torch.optim.Optimizer],
    targets: Sequence[tuple[torch.Tensor, SliceFn]],
) -> bool:
    """From now on, let the slices ``fn`` marks in each ``(parameter, fn)`` of ``targets``
    (``fn`` zeroes them in a tensor shaped like the parameter, as for
    :func:`~relu_doctor.remedies._optim_state.reset_state_slices`) take Adam steps as if
    their step count had restarted at 0 now. Call it when their moments are reset.

    Parameters an optimizer has not stepped yet are skipped (their step is 0 anyway).
    Returns whether any slice is now tracked.

    Raises:
        ReluDoctorError: an optimizer :func:`check_adam_step_optimizers` refuses.
    """
    check_adam_step_optimizers("reset_adam_step", optimizers)
    marks: dict[torch.Tensor, torch.Tensor] = {}
    for p, fn in targets:
        mark = marks.get(p)
        if mark is None:
            mark = marks[p] = torch.ones(p.shape, dtype=torch.uint8, device=p.device)
        fn(mark)
    tracked = False
    for opt in optimizers:
        for p, mark in marks.items():
            st = opt.state.get(p)
            if not st or "step" not in st or p.dim() == 0:
                continue
            index = torch.nonzero(mark == 0, as_tuple=True)
            if not index or index[0].numel() == 0:
                continue
            step = st["step"]
            step0: float | torch.Tensor = (
                _number(step) if _on_host(step) else step.detach().clone()
            )
            _tracker(opt).add(opt, p, [_Run(index, step0)])
            tracked = True
    return tracked


def tracked_slices(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, int]:
    """``{parameter: elements still in their own bias-correction warm-up}`` for one
    optimizer (empty once every slice is forgotten)."""
    tr = _TRACKERS.get(optimizer)
    if tr is None:
        return {}
    return {p: sum(int(r.index[0].numel()) for r in b.runs) for p, b in tr.books.items()}


# ---------------------------------------------------------------------- a remedy's side


class AdamStepRestart:
    """The ``reset_adam_step`` option of a recycling remedy: its check and its checkpoint
    state (the slices in warm-up of the remedy's optimizers, by optimizer position and
    parameter name, so a resumed run restarts them where it left off).

    Args:
        enabled: the option's value (True or False).
        optimizers: the optimizers known now (checked when enabled).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> AdamStepRestart(True, [torch.optim.Adam(net.parameters())]).enabled
        True
    """

    def __init__(self, enabled: object, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.enabled = flag("reset_adam_step", enabled)
        self._pending: list[dict[str, Any]] = []
        self.check(optimizers)

    def check(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Raise for optimizers the option cannot serve (only when enabled)."""
        if self.enabled:
            check_adam_step_optimizers("reset_adam_step", optimizers)

    def state_dict(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
    ) -> list[dict[str, Any]]:
        """The tracked slices of ``model``'s parameters (CPU tensors and numbers)."""
        if not self.enabled:
            return []
        names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
        out = list(self._pending)
        for i, opt in enumerate(optimizers):
            tr = _TRACKERS.get(opt)
            for p, book in (tr.books.items() if tr is not None else ()):
                if p not in names:
                    continue
                out.append({
                    "optimizer": i,
                    "param": names[p],
                    "runs": [
                        {"index": torch.stack([ix.cpu() for ix in r.index]),
                         "step0": _number(r.step0), "steps": r.steps}
                        for r in book.runs
                    ],
                })
        return out

    def load_state_dict(
        self,
        state: Sequence[Mapping[str, Any]],
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> None:
        """Restore :meth:`state_dict`'s slices (kept until the optimizers are known); with
        the option off, a checkpoint's slices are ignored."""
        self._pending = [dict(e) for e in state] if self.enabled else []
        if optimizers:
            params = {p for _, p in model.named_parameters()}
            for opt in optimizers:  # what is tracked now gives way to the checkpoint
                tr = _TRACKERS.get(opt)
                if tr is None:
                    continue
                for p in [q for q in tr.books if q in params]:
                    del tr.books[p]
                if not tr.books:
                    tr.release()
            self.apply_pending(model, optimizers)

    def apply_pending(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
    ) -> None:
        """Track the restored slices once ``optimizers`` are known."""
        if not self._pending or not optimizers:
            return
        pending, self._pending = self._pending, []
        params = dict(model.named_parameters())
        for e in pending:
            i, name = int(e["optimizer"]), str(e["param"])
            p = params.get(name)
            if p is None or i >= len(optimizers):
                warnings.warn(
                    f"reset_adam_step: checkpointed slices of {name!r} (optimizer {i}) have "
                    "no parameter or optimizer here; their step restarts are dropped.",
                    ReluDoctorWarning,
                    stacklevel=2,
                )
                continue
            runs = [
                _Run(
                    tuple(ix.to(p.device, torch.long) for ix in torch.as_tensor(r["index"])),
                    float(r["step0"]),
                    int(r["steps"]),
                )
                for r in e["runs"]
            ]
            if runs:
                _tracker(optimizers[i]).add(optimizers[i], p, runs)

