"""How a remedy's change is judged: the metric it targets, its value before, and the
verdict one interval later (:class:`Pending` until then).

A change to some units (a recycling) is judged on those units: the share of them dead or
below the Doctor's tau (``changed_units_quiet``) when they were changed, from the record the
remedy decided on, against the share still so one interval later. A recycler choosing by its
own rule (its own tau, continual backprop's utility) may change units that were not quiet:
where none was, there is nothing that share could show, and the change is not judged on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from relu_doctor._validate import finite_or_none
from relu_doctor.events import InterventionResult
from relu_doctor.remedies.evidence import units_efficacy

__all__ = ["HELPED", "LOSS_HARM", "MIN_GAIN", "NOT_HELPED", "TARGETS", "UNITS_QUIET", "UNKNOWN",
           "Pending", "loss_of", "verdict"]

#: The metric each remedy's intervention is judged on, unless the caller names one (a
#: treatment plan names the metric that triggered it).
TARGETS = {
    "adaptive_grad_clip": "unclipped_grad_norm",
    "lr_rescue": "dead_fraction",
    "leaky_relu_swap": "dead_fraction",
    "dormant_reset": "below_tau_fraction",
    "continual_backprop": "below_tau_fraction",
}

#: The relative fall of its target that a change must make to be judged "helped", where
#: one counts (the plan's default steps for the swap and recycling have the same bar): a
#: swap that took a site from 75% dead to 73% was "helped".
MIN_GAIN = {"leaky_relu_swap": 0.25, "dormant_reset": 0.25}

#: What a change to some units judged on ``below_tau_fraction`` is judged on instead.
UNITS_QUIET = "changed_units_quiet"

HELPED, NOT_HELPED, UNKNOWN = "helped", "did not help", "unknown"

#: Windows a change to units waits for one where they run, before it is judged "unknown".
WAIT_UNSEEN = 3

#: A change after which the window's mean training loss is this many times that of the
#: window it was made at, or no longer finite, did not help, whatever its target did: a
#: trial's recycling read "helped" (its units revived) as the loss went from 4e7 to 7e16,
#: and a swap after it took the run to NaN where the untreated run recovered.
LOSS_HARM = 2.0


def loss_of(record: Any) -> float | None:
    """The record's window mean of the training loss (``window_loss``: the mean of
    ``Doctor.step(loss=...)``'s, or an integration's measure), NaN and Inf included (a loss
    gone non-finite is what :data:`LOSS_HARM` looks for), or None where the window has none.
    A loop's logged metric read at the log step (Lightning's ``train_loss``) is one step's
    value, too noisy for a 2x bar (a smoke run's read 1086 then 4878 with nothing changed):
    not taken."""
    value = getattr(record, "window_loss", None)
    return None if value is None else float(value)


def verdict(
    before: float | None, after: float | None, *, min_gain: float = 0.0, tolerance: float = 0.0
) -> str:
    """Whether a change helped its target (lower is better): ``"helped"`` when ``after <=
    before * (1 - min_gain) + tolerance`` and, without a tolerance, ``after < before`` ("no
    worse" needs a tolerance), else ``"did not help"``; ``"unknown"`` if either is None.

    Example:
        >>> verdict(0.5, 0.2, min_gain=0.25), verdict(0.5, 0.45, min_gain=0.25), verdict(0.3, 0.3)
        ('helped', 'did not help', 'did not help')
    """
    if before is None or after is None:
        return UNKNOWN
    lower = after < before or tolerance > 0
    return HELPED if lower and after <= before * (1.0 - min_gain) + tolerance else NOT_HELPED


@dataclass(frozen=True)
class Pending:
    """An intervention waiting for its metrics after: its event ``id`` and ``site``; the
    ``target`` metric it is judged on with its value ``before`` and the gain that counts as
    help (``min_gain``, ``tolerance``: see :func:`verdict`); the ``units`` it changed (their
    share still dead or below tau one interval later is the change's efficacy)."""

    id: str
    site: str
    target: str | None = None
    before: float | None = None
    min_gain: float = 0.0
    tolerance: float = 0.0
    units: tuple[int, ...] = ()
    #: windows passed over because none of its units ran there (a branch, an expert)
    waited: int = 0
    #: a model-wide change's: the sites its before was counted over (evidence.Snapshot),
    #: which its after is read over too
    sites: tuple[str, ...] = ()
    #: the training loss of the window it was made at (finite and above 0; else None)
    loss: float | None = None

    @classmethod
    def of(cls, id: str, site: str, judge: tuple[str | None, float, float],
           before: Mapping[str, Any] | None, units: Any, loss: float | None = None) -> Pending:
        """The judgement an intervention awaits: on ``judge``'s metric (its name,
        ``min_gain``, ``tolerance``) from the snapshot ``before``; a change to ``units``
        judged on the site's ``below_tau_fraction`` is judged on those units."""
        target, gain, tol = judge
        changed = tuple(int(u) for u in units) if isinstance(units, Sequence) else ()
        if changed and target == "below_tau_fraction":
            target = UNITS_QUIET
        value = finite_or_none((before or {}).get(target)) if target else None
        return cls(id, site, target, value, gain, tol, changed,
                   sites=tuple(getattr(before, "sites", ())),
                   loss=loss if loss is not None and 0.0 < loss < float("inf") else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "site": self.site}
        if self.target is not None:
            out.update(target=self.target, before=self.before, min_gain=self.min_gain,
                       tolerance=self.tolerance)
        if self.units:
            out["units"] = list(self.units)
        if self.waited:
            out["waited"] = self.waited
        if self.sites:
            out["sites"] = list(self.sites)
        if self.loss is not None:
            out["loss"] = self.loss
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pending:
        return cls(str(d["id"]), str(d["site"]), d.get("target"), finite_or_none(d.get("before")),
                   float(d.get("min_gain", 0.0)), float(d.get("tolerance", 0.0)),
                   tuple(int(u) for u in d.get("units", ())), int(d.get("waited", 0)),
                   tuple(str(s) for s in d.get("sites", ())), finite_or_none(d.get("loss")))

    def waited_once(self) -> Pending:
        """This judgement put off by one more window."""
        return replace(self, waited=self.waited + 1)

    def result(self, remedy: str, record: Any, after: dict[str, Any] | None
               ) -> InterventionResult | None:
        """The intervention's result in ``record``, one interval later (``after``: the
        metrics it records there); None where a change to units none of which ran in that
        window waits for a later one (at most :data:`WAIT_UNSEEN` windows: a branch or an
        expert that did not run was judged "unknown" for good, a review)."""
        target, before = self.target, self.before
        efficacy = units_efficacy(record, self.site, self.units) if self.units else None
        if efficacy is None and self.units and self.waited < WAIT_UNSEEN and target in (
                UNITS_QUIET, "below_tau_fraction"):
            return None
        if target == "below_tau_fraction" and self.units:  # (pending in an older checkpoint)
            target, before = UNITS_QUIET, 1.0  # (what that run judged against)
        if target == UNITS_QUIET:
            value = efficacy["still_quiet"] if efficacy is not None else None
            if before == 0.0:  # none of them quiet: nothing that share could show
                target = None
        else:
            value = finite_or_none((after or {}).get(target)) if target else None
        judged = (verdict(before, value, min_gain=self.min_gain, tolerance=self.tolerance)
                  if target else None)
        rose = self.loss_rose(record)
        return InterventionResult(
            self.id, remedy, self.site, int(record.step), after,
            target=target,
            verdict=NOT_HELPED if rose is not None else judged,
            efficacy=efficacy,
            before={target: before} if target and before is not None else None,
            loss_rose=rose)

    def loss_rose(self, record: Any) -> float | None:
        """How many times the training loss of ``record``'s window is that of the window
        the change was made at, where it is :data:`LOSS_HARM` times or more (``inf``: no
        longer finite); None where it is not, or either is unknown."""
        after = loss_of(record)
        if self.loss is None or after is None:
            return None
        ratio = after / self.loss if math.isfinite(after) else math.inf
        return ratio if ratio >= LOSS_HARM else None
