"""Training metrics of a logging window: the loss, the optimizers' learning rates and any
metric the user logs, kept on their device until the logging step (no host sync), then read
once as window means; and their long-format table (step, name, value) in the run record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from relu_doctor._validate import is_number
from relu_doctor.errors import ReluDoctorError
from relu_doctor.history import IntervalRecord

__all__ = ["TrainingMetrics", "WindowLoss", "metrics_columns", "metrics_frame"]


#: the key of :meth:`TrainingMetrics.state_dict` that holds how rates are named (no metric's)
_RATE_NAMING = "\0rate naming"


class TrainingMetrics:
    """The open window's training metrics: ``name -> [device sum or None, host sum, count]``,
    plus callables asked for more at each logging step."""

    def __init__(self) -> None:
        self._acc: dict[str, list[Any]] = {}
        self._sources: list[Callable[[], Mapping[str, Any]]] = []
        #: the metrics passed in whose window mean the latest :meth:`read` found not finite
        #: (left out of its result): ``{name: mean}``
        self.nonfinite: dict[str, float] = {}
        #: whether the first rates read were one alone (named ``lr``): that name stays the
        #: first group's when groups are added later (a growing model's ``add_param_group``
        #: split its curve into ``lr`` and ``lr/0``)
        self._one_rate: bool | None = None

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Add ``{name: value}`` (numbers or one-element tensors) to the window."""
        if not isinstance(metrics, Mapping):
            raise ReluDoctorError(
                f"metrics: expected a mapping {{name: value}}, got {type(metrics).__name__}."
            )
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ReluDoctorError(f"metrics: names must be non-empty strings, got {name!r}.")
            tensor: torch.Tensor | None = None
            number = 0.0
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                tensor = value.detach().reshape(()).float()
            elif is_number(value):
                number = float(value.item() if isinstance(value, np.ndarray) else value)
            else:
                got = (f"a tensor of shape {tuple(value.shape)}"
                       if isinstance(value, torch.Tensor) else type(value).__name__)
                raise ReluDoctorError(
                    f"metrics: {name!r} must be a number or a one-element tensor, got {got}."
                )
            # only once the value is known good: a refused one leaves no empty entry behind
            acc = self._acc.setdefault(name, [None, 0.0, 0])
            if tensor is not None:  # (a restored sum follows the values to their device)
                acc[0] = tensor if acc[0] is None else acc[0].to(tensor.device) + tensor
            acc[1] += number
            acc[2] += 1

    def state_dict(self) -> dict[str, Any]:
        """The open window's sums, for a checkpoint: a resumed window's means then cover
        its steps before the checkpoint too. Device tensors are cloned, not read."""
        state: dict[str, Any] = {
            name: {"tensor": None if a[0] is None else a[0].detach().clone(),
                   "number": a[1], "count": a[2]}
            for name, a in self._acc.items()
        }
        if self._one_rate is not None:  # (how rates are named: a resumed run goes on so)
            state[_RATE_NAMING] = {"one_rate": self._one_rate}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the open window's sums, and how rates are named)."""
        naming = state.get(_RATE_NAMING)
        if isinstance(naming, Mapping) and isinstance(naming.get("one_rate"), bool):
            self._one_rate = naming["one_rate"]
        self._acc = {
            str(name): [s.get("tensor"), float(s.get("number", 0.0)), int(s.get("count", 0))]
            for name, s in state.items() if name != _RATE_NAMING
        }

    def loss_sum(self) -> tuple[torch.Tensor | float, int]:
        """The open window's sum of ``loss`` values (``Doctor.step(loss=...)``'s, or a
        ``loss`` in :meth:`add`) and their count, read without closing the window: a device
        sum stays on its device. ``(0.0, 0)`` where the window has none."""
        acc = self._acc.get("loss")
        if acc is None:
            return 0.0, 0
        return (acc[1] if acc[0] is None else acc[0] + acc[1]), acc[2]

    def add_source(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        """Call ``fn()`` at each logging step for more metrics ``{name: value}``."""
        self._sources.append(fn)

    def read(
        self, optimizers: Sequence[torch.optim.Optimizer],
        used_lrs: Mapping[int, Sequence[Any]] | None = None,
    ) -> dict[str, float]:
        """The window's means (one host read), the optimizers' learning rates and the
        sources' values; the window's sums are cleared. Local to this process.

        ``used_lrs``: by ``id(optimizer)``, the rates its last step taken used (one per
        param group, :attr:`~relu_doctor.optimizer_tap.OptimizerTap.used_lrs`), recorded
        in place of the rates now set (a scheduler that stepped since has set the next
        step's)."""
        acc, self._acc = self._acc, {}
        out: dict[str, float] = {}
        if acc:
            dev = next((a[0].device for a in acc.values() if a[0] is not None), None)
            zero = torch.zeros((), device=dev)
            sums = torch.stack(
                [a[0].to(zero.device) if a[0] is not None else zero for a in acc.values()]
            )
            for (name, a), s in zip(acc.items(), sums.tolist(), strict=True):
                out[name] = (s + a[1]) / a[2]
        rates = []
        for i, o in enumerate(optimizers):
            now = [g["lr"] for g in o.param_groups]
            used = (used_lrs or {}).get(id(o))
            rates += [(i, j, lr) for j, lr in enumerate(used if used and len(used) == len(now)
                                                        else now)]
        if rates and self._one_rate is None:
            self._one_rate = len(rates) == 1
        for i, j, lr in rates:
            name = ("lr" if len(rates) == 1 or (self._one_rate and i == j == 0)
                    else f"lr/{i}.{j}" if len(optimizers) > 1 else f"lr/{j}")
            out[name] = float(lr)
        for fn in self._sources:
            for name, value in fn().items():
                try:
                    out.setdefault(str(name), float(value))
                except (TypeError, ValueError, RuntimeError):
                    continue
        # (a source's too: Lightning's train_loss gone NaN was dropped unsaid)
        self.nonfinite = {k: v for k, v in out.items() if not math.isfinite(v)}
        return {k: v for k, v in out.items() if math.isfinite(v)}


class WindowLoss:
    """An integration's own measure of a window's training loss, for the remedies' loss
    guard (:attr:`~relu_doctor.history.IntervalRecord.window_loss`), where the loop gives
    the Doctor no mean of its steps' losses: the HF Trainer logs its loss after our log,
    Lightning's logged ``train_loss`` is one step's value, Keras reports a running mean
    since the epoch began. Summed on the loss's device between logs (no host sync), taken
    at the log; NaN kept (a diverged window is what the guard looks for)."""

    def __init__(self) -> None:
        self._total: torch.Tensor | float | None = None
        self._count = 0

    def add(self, value: torch.Tensor | float, count: int = 1) -> None:
        """Add the sum ``value`` of ``count`` passes' losses (a one-element tensor or a
        number)."""
        total = self._total
        if isinstance(value, torch.Tensor):
            value = value.detach().reshape(()).float()
            if isinstance(total, torch.Tensor):  # (a restored sum follows the losses' device)
                value = total.to(value.device) + value
            elif total is not None:
                value = value + total
        else:
            value = float(value) + (0.0 if total is None else total)
        self._total, self._count = value, self._count + count

    def state_dict(self) -> dict[str, Any]:
        """The open window's sum and count, for a checkpoint (a device sum cloned, not
        read): a window resumed mid-way then covers its batches before the checkpoint."""
        total = self._total
        return {"total": total.detach().clone() if isinstance(total, torch.Tensor) else total,
                "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (None, from a checkpoint before it was saved: an empty
        window)."""
        total = None if not state else state.get("total")
        self._total = total if isinstance(total, torch.Tensor) or total is None else float(total)
        self._count = int(state.get("count", 0)) if state and total is not None else 0

    def take(self) -> tuple[torch.Tensor | float, int]:
        """``(sum, count)`` since the last call (``(0.0, 0)`` where nothing was added), the
        next window started."""
        total, count = self._total, self._count
        self._total, self._count = None, 0
        return (0.0 if total is None else total), count


def metrics_columns(record: IntervalRecord) -> dict[str, list[Any]]:
    """The record's training metrics in the run's long format, as columns: one row per
    (step, name)."""
    names = list(record.metrics)
    return {"step": [record.step] * len(names), "name": names,
            "value": [float(record.metrics[n]) for n in names]}


def metrics_frame(record: IntervalRecord) -> pd.DataFrame:
    """:func:`metrics_columns` as a DataFrame."""
    return pd.DataFrame(metrics_columns(record))

