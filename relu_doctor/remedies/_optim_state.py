"""Surgery on optimizer and LR-scheduler state, kept consistent with each other.

One idea: when a remedy changes what an optimizer holds (a new param group for PReLU slopes,
a group removed again, moments of recycled slices), the optimizer's state and every LR
scheduler attached to it must change together, or the next ``scheduler.step()`` indexes a
list one group short. Used by :mod:`~relu_doctor.remedies.swap` (param groups),
:mod:`~relu_doctor.remedies.lr` (walking scheduler containers) and
:mod:`~relu_doctor.remedies.recycle` (state slices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "SliceFn",
    "add_param_group",
    "flat_schedulers",
    "remove_param_group",
    "reset_state_slices",
    "schedulers_of",
]

#: Per-group lists a scheduler keeps (one entry per param group of its optimizer).
SCHEDULER_GROUP_LISTS = ("base_lrs", "max_lrs", "_last_lr", "lr_lambdas", "min_lrs")

#: Zeroes (or otherwise resets) the chosen slices of a tensor shaped like one parameter.
SliceFn = Callable[[torch.Tensor], None]


def flat_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers, with containers (SequentialLR, ChainedScheduler) walked into: each
    scheduler once, containers before their children."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(s: Any) -> None:
        if s is None or id(s) in seen:
            return
        seen.add(id(s))
        out.append(s)
        for child in getattr(s, "_schedulers", []) or []:
            walk(child)

    for s in schedulers:
        walk(s)
    return out


def schedulers_of(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any]) -> list[Any]:
    """The schedulers of ``optimizer``: made for it, or for a wrapper sharing its param
    groups (accelerate's ``AcceleratedOptimizer`` under the HF Trainer: a PReLU swap's new
    group left the scheduler's per-group lists short, and its next step raised)."""
    groups = optimizer.param_groups
    return [s for s in flat_schedulers(schedulers)
            if (o := getattr(s, "optimizer", None)) is optimizer
            or getattr(o, "param_groups", None) is groups]


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    *,
    schedulers: Sequence[Any] = (),
    source: int = 0,
) -> dict[str, Any]:
    """Add ``params`` to ``optimizer`` as a new param group with the hyperparameters of group
    ``source`` (weight decay 0: PReLU slopes are not decayed, He et al. 2015), and extend the
    per-group lists of the schedulers attached to it with that group's entries. Returns the
    group added."""
    src = optimizer.param_groups[source]
    group = {k: v for k, v in src.items() if k not in ("params", "param_names")}
    if "weight_decay" in group:
        group["weight_decay"] = 0.0
    group["params"] = params
    n_before = len(optimizer.param_groups)
    optimizer.add_param_group(group)
    added = optimizer.param_groups[-1]
    for sched in schedulers_of(optimizer, schedulers):
        for attr in SCHEDULER_GROUP_LISTS:
            val = getattr(sched, attr, None)
            if isinstance(val, list) and len(val) == n_before:
                val.append(val[source])
    return added


def remove_param_group(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    *,
    schedulers: Sequence[Any] = (),
) -> None:
    """Remove ``group`` (the object :func:`add_param_group` returned) from ``optimizer``, its
    parameters' state, and the schedulers' per-group lists. A group no longer there is
    ignored."""
    for i, g in enumerate(optimizer.param_groups):
        if g is not group:
            continue
        n_before = len(optimizer.param_groups)
        for p in g["params"]:
            optimizer.state.pop(p, None)
        optimizer.param_groups.pop(i)
        for sched in schedulers_of(optimizer, schedulers):
            for attr in SCHEDULER_GROUP_LISTS:
                val = getattr(sched, attr, None)
                if isinstance(val, list) and len(val) == n_before:
                    val.pop(i)
        return


def reset_state_slices(
    optimizers: Sequence[torch.optim.Optimizer],
    targets: Sequence[tuple[torch.Tensor, SliceFn]],
) -> list[str]:
    """For each ``(parameter, fn)``: apply ``fn`` to every state tensor shaped like the
    parameter in every optimizer (Adam's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, SGD's
    ``momentum_buffer``...). Scalars such as Adam's ``step`` are left alone. Returns the state
    keys touched, sorted."""
    touched: set[str] = set()
    for opt in optimizers:
        for p, fn in targets:
            st = opt.state.get(p)
            if not st:
                continue
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.shape == p.shape:
                    fn(val)
                    touched.add(str(key))
    return sorted(touched)
