"""Learning-rate rescue: scale the learning rate down, so that the LR schedulers keep the cut.

:func:`scale_lr` scales every param group's learning rate and the schedulers' base values
with it (chainable schedulers continue from ``group["lr"]``, closed-form ones from their
scaled ``base_lrs`` / ``initial_lr`` / ``max_lr``); :class:`LRRescuer` does it on an
exploding-gradient finding, a non-finite finding or a surge of dead units, with a cooldown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from relu_doctor._validate import nonnegative, number_in, one_optimizer, positive_int
from relu_doctor._validate import optimizers as check_optimizers
from relu_doctor.diagnosis import acted_on
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention
from relu_doctor.remedies._optim_state import schedulers_of
from relu_doctor.remedies.base import (
    MODEL,
    Optimizers,
    RecordLike,
    Remedy,
    dead_surge,
    model_snapshot,
)

__all__ = ["LRRescuer", "scale_lr"]

#: Per-group values that closed-form schedulers recompute the lr from.
_GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
_SCHED_SCALE = ("base_lrs", "max_lrs")


def _mul(value: Any, f: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(f)
    return value * f


def _factor(value: object) -> float:
    return number_in("factor", value, 0.0, 1.0, high_open=True, hint=" (e.g. 0.5)")


def scale_lr(
    optimizer: torch.optim.Optimizer,
    *,
    factor: float,
    min_lr: float = 0.0,
    schedulers: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Scale every param group's learning rate by ``factor``, never below ``min_lr``, so that
    the optimizer's LR schedulers keep the reduction.

    Chainable schedulers (StepLR, ExponentialLR, ReduceLROnPlateau...) derive the next lr from
    ``group["lr"]``; closed-form ones (LambdaLR, OneCycleLR, CyclicLR...) recompute it from
    ``scheduler.base_lrs`` / ``group["initial_lr"]`` / ``max_lr``. Both are scaled by the same
    per-group factor, so either kind continues the schedule, reduced; a cosine schedule's
    ``eta_min`` too (one for every group: scaled when all groups were cut alike).

    Args:
        optimizer: the optimizer.
        factor: in (0, 1).
        min_lr: the floor; a group already at or below it is left alone.
        schedulers: LR schedulers of this optimizer (containers such as SequentialLR are
            walked into).

    Returns:
        One dict per param group: ``group``, ``lr_before``, ``lr_after`` and ``factor``
        (1.0 for a group left alone).

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        >>> _ = scale_lr(opt, factor=0.1, schedulers=[sched])
        >>> opt.step(); sched.step(); round(opt.param_groups[0]["lr"], 6)
        0.005
    """
    optimizer = one_optimizer("optimizer", optimizer)
    _factor(factor)
    nonnegative("min_lr", min_lr)
    scheds = schedulers_of(optimizer, schedulers)
    out = []
    for i, g in enumerate(optimizer.param_groups):
        lr = float(g["lr"])
        new = max(lr * factor, min_lr)
        if not lr > 0 or new >= lr:
            out.append({"group": i, "lr_before": lr, "lr_after": lr, "factor": 1.0})
            continue
        f = new / lr
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(new)
        else:
            g["lr"] = new
        for key in _GROUP_LR_KEYS:
            if key in g and g[key] is not None:
                g[key] = _mul(g[key], f)
        for s in scheds:
            for attr in _SCHED_SCALE:
                vals = getattr(s, attr, None)
                if isinstance(vals, list) and i < len(vals):
                    vals[i] = _mul(vals[i], f)
            last = getattr(s, "_last_lr", None)
            if isinstance(last, list) and i < len(last):
                last[i] = new
        out.append({"group": i, "lr_before": lr, "lr_after": new, "factor": f})
    # A cosine schedule's eta_min (one for all groups) is where it goes: scaled with the
    # groups when every one was cut alike (never below min_lr), the cut stays a factor
    # instead of fading.
    factors = [c["factor"] for c in out]
    alike = bool(factors) and all(math.isclose(f, factors[0], rel_tol=1e-9) for f in factors)
    for s in scheds if alike and factors[0] != 1.0 else ():
        if isinstance(getattr(s, "eta_min", None), (int, float)):
            s.eta_min = max(s.eta_min * factors[0], min(min_lr, s.eta_min))
    return out


class LRRescuer(Remedy):
    """Scale the learning rate down on an exploding-gradient finding or a surge of dead units.

    After a reduction, ``cooldown`` logging intervals pass before the next one. The surge
    test compares each site's dead fraction with the previous interval's (the first interval
    with a fully alive start); windows the overhead budget sampled are pooled first until
    they hold :data:`~relu_doctor.remedies.evidence.MIN_EVIDENCE_STEPS` collected steps
    (:class:`~relu_doctor.remedies.evidence.DeadEvidence`), so the surge compares readings on
    enough steps.

    Args:
        optimizer: the optimizer(s) whose param groups are scaled.
        schedulers: their LR schedulers (see :func:`scale_lr`).
        factor: multiply the learning rate by this, in (0, 1).
        min_lr: the floor.
        cooldown: logging intervals to wait after a reduction.
        dead_jump: a rise of a site's dead fraction by at least this much between two
            intervals is a surge, in (0, 1].
        triggers: any of ``"exploding_gradient"``, ``"dead_surge"``, ``"nonfinite"``.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> r = LRRescuer(opt, factor=0.5)
        >>> r.rescue(step=3, reason="manual").what
        'scaled the learning rate by 0.5 (manual): group 0 0.1 -> 0.05'
    """

    name = "lr_rescue"

    @property
    def reads_dead(self) -> bool:
        return "dead_surge" in self.triggers
    TRIGGERS: ClassVar[tuple[str, ...]] = ("exploding_gradient", "dead_surge", "nonfinite")

    def __init__(
        self,
        optimizer: Optimizers = None,
        *,
        schedulers: Sequence[Any] = (),
        factor: float = 0.5,
        min_lr: float = 1e-6,
        cooldown: int = 2,
        dead_jump: float = 0.2,
        triggers: Sequence[str] = ("exploding_gradient", "dead_surge"),
    ) -> None:
        super().__init__()
        self.factor = _factor(factor)
        self.min_lr = nonnegative("min_lr", min_lr)
        self.cooldown = positive_int("cooldown", cooldown, minimum=0)
        self.dead_jump = number_in("dead_jump", dead_jump, 0.0, 1.0)
        trig = [triggers] if isinstance(triggers, str) else list(triggers)
        bad = [t for t in trig if t not in self.TRIGGERS]
        if bad or not trig:
            raise ReluDoctorError(
                f"triggers: expected a non-empty subset of {list(self.TRIGGERS)}, got {triggers!r}."
            )
        self.triggers = tuple(trig)
        self.optimizers = check_optimizers("optimizer", optimizer)
        self.schedulers = list(schedulers)
        self.cooldown_left = 0
        self.prev_dead: dict[str, float] = {}
        self.rescues = 0
        self._unpassed_said = False  # (a scheduler not passed: said once)

    def reason(self, record: RecordLike) -> tuple[str, dict[str, Any]] | None:
        """Why this record calls for a rescue (trigger name, evidence), or None. Updates the
        dead-fraction baseline."""
        found: tuple[str, dict[str, Any]] | None = None
        if "exploding_gradient" in self.triggers:
            for f in record.findings:
                if f.kind == "exploding_gradient" and acted_on(f):
                    found = ("exploding_gradient", {"finding": f.message, **f.evidence})
                    break
        if found is None and "nonfinite" in self.triggers:
            for f in record.findings:
                if f.kind == "nonfinite":
                    found = ("nonfinite", {"site": f.site, "finding": f.message})
                    break
        surge = dead_surge(
            self.evidence.add(record), self.prev_dead, self.dead_jump, record
        )
        if found is None and surge is not None and "dead_surge" in self.triggers:
            found = ("dead_surge", {**surge, "steps_collected": self.evidence.last_steps})
        return found

    def _scale(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """Scale every optimizer's learning rates; return the changes per group and what
        happened, in words."""
        if not self.optimizers:
            raise ReluDoctorError(
                "optimizer: LRRescuer has no optimizer to rescue; pass optimizer=...."
            )
        changes = []
        for k, opt in enumerate(self.optimizers):
            cut = scale_lr(opt, factor=self.factor, min_lr=self.min_lr, schedulers=self.schedulers)
            if any(c["factor"] < 1.0 for c in cut):  # (a rate at its floor: nothing to undo)
                self._check_scheduled(opt)
            changes += [{"optimizer": k, **c} for c in cut]
        moved = [c for c in changes if c["factor"] < 1.0]
        many = len(self.optimizers) > 1

        def group(c: Mapping[str, Any]) -> str:
            return f"optimizer {c['optimizer']} group {c['group']}" if many else f"group {c['group']}"

        if moved:
            parts = [f"{group(c)} {c['lr_before']:.4g} -> {c['lr_after']:.4g}" for c in moved]
            what = f"scaled the learning rate by {self.factor:g} ({reason}): " + ", ".join(parts)
            if any(c["factor"] > self.factor + 1e-12 for c in moved):
                what += f" (floor {self.min_lr:g})"
        else:
            what = f"learning rate already at the floor {self.min_lr:g}; nothing changed ({reason})"
        self.rescues += 1
        return changes, what

    def _check_scheduled(self, opt: torch.optim.Optimizer) -> None:
        """Warn once where ``opt`` has an LR scheduler that was not passed (torch's
        schedulers mark the optimizer's ``step`` they wrap: ``_wrapped_by_lr_sched``; not
        the ``initial_lr`` they leave in its param groups, which a state loaded from a run
        that had one keeps): one recomputing the rate from its own base values (LambdaLR,
        CyclicLR, SequentialLR's warmup) undoes the cut at its next step, a cosine one fades
        it, and the record would say the rate was cut. (Those that keep it, StepLR or
        OneCycleLR, whose values live in the groups, are not told apart: passing one is the
        documented use anyway. ReduceLROnPlateau marks nothing, and keeps it.)"""
        if self._unpassed_said or not getattr(opt.step, "_wrapped_by_lr_sched", False):
            return
        if schedulers_of(opt, self.schedulers):
            return
        self._unpassed_said = True
        self.warn(
            f"relu_doctor: {self.name}: the optimizer {type(opt).__name__} has a learning-rate "
            "scheduler that was not given to the rescue. "
            "One that recomputes the rate from its own base values (LambdaLR, CyclicLR, a "
            "warmup) undoes the cut at its next step, and a cosine one fades it: pass it, "
            "LRRescuer(opt, schedulers=[sched]) (TreatmentPlan(..., schedulers=[sched]))."
        )

    def _event(
        self,
        changes: list[dict[str, Any]],
        what: str,
        *,
        step: int,
        reason: str,
        evidence: Mapping[str, Any] | None,
        before: Mapping[str, Any] | None,
    ) -> Intervention:
        return self._intervention(
            site=MODEL,
            step=step,
            what=what,
            before=before,
            trigger=reason,
            evidence=dict(evidence or {}),
            changes=changes,
            schedulers=[type(s).__name__ for s in self.schedulers],
        )

    def rescue(
        self,
        *,
        step: int = 0,
        reason: str = "requested",
        evidence: Mapping[str, Any] | None = None,
        before: Mapping[str, Any] | None = None,
    ) -> Intervention:
        """Scale the learning rates now; return the intervention (``details["changes"]``:
        one entry per param group)."""
        changes, what = self._scale(reason)
        return self._record(
            self._event(changes, what, step=step, reason=reason, evidence=evidence, before=before)
        )

    def decide(self, record: RecordLike) -> list[Intervention]:
        found = self.reason(record)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return []
        if found is None or not self.optimizers:
            return []
        trigger, evidence = found
        before = model_snapshot(record)
        changes, what = self._scale(trigger)
        if not any(c["factor"] < 1.0 for c in changes):
            return []  # at the floor: nothing changed, nothing to report
        self.cooldown_left = self.cooldown
        return [
            self._event(
                changes, what, step=record.step, reason=trigger, evidence=evidence, before=before
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "cooldown_left": self.cooldown_left,
            "prev_dead": dict(self.prev_dead),
            "rescues": self.rescues,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.cooldown_left = int(state.get("cooldown_left", 0))
        self.prev_dead = {str(k): float(v) for k, v in state.get("prev_dead", {}).items()}
        self.rescues = int(state.get("rescues", 0))
