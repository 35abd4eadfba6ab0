"""How an intervention is judged one logging interval later: on its target metric (lower is
better, :func:`verdict`), and on the training loss, whatever its target did
(:func:`loss_rose`); :class:`Pending` holds what a judgement needs until then."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relu_doctor._validate import finite_or_none

__all__ = ["HELPED", "NOT_HELPED", "UNKNOWN", "Pending", "loss_rose", "verdict"]

HELPED, NOT_HELPED, UNKNOWN = "helped", "did not help", "unknown"


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


def _loss(record: Any) -> float | None:
    """A record's training loss (its window's mean), if the loop passed one."""
    metrics = getattr(record, "metrics", None)
    return finite_or_none(metrics.get("loss")) if isinstance(metrics, Mapping) else None


def loss_rose(before: float | None, after: float | None) -> bool:
    """Whether the training loss rose by more than its own size over the interval after a
    change (doubled, for a positive loss): whatever its target did, the change did not
    help (a swap that revived the units of a run it sent diverging)."""
    return before is not None and after is not None and after - before > max(abs(before), 1e-12)


@dataclass(frozen=True)
class Pending:
    """An intervention waiting for its metrics after: its event ``id`` and ``site``; the
    ``target`` metric it is judged on with its value ``before`` and the gain that counts as
    help (``min_gain``, ``tolerance``: see :func:`verdict`); the ``units`` it changed (their
    share still below tau one interval later is the change's efficacy); the training
    ``loss`` of the window that led to it (see :func:`loss_rose`)."""

    id: str
    site: str
    target: str | None = None
    before: float | None = None
    min_gain: float = 0.0
    tolerance: float = 0.0
    units: tuple[int, ...] = ()
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "site": self.site}
        if self.target is not None:
            out.update(target=self.target, before=self.before, min_gain=self.min_gain,
                       tolerance=self.tolerance)
        if self.units:
            out["units"] = list(self.units)
        if self.loss is not None:
            out["loss"] = self.loss
        return out
