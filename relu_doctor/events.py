"""The run's events as typed values: a finding that began, changed severity or ended; an
intervention a remedy made; the measured result of an intervention; a site a remedy
declined (left alone, and why).

A leaf above :mod:`~relu_doctor.diagnosis` (for :class:`~relu_doctor.diagnosis.Finding`):
remedies build interventions without importing the run record, and
:mod:`~relu_doctor.history` writes and reads all three. On disk each event is one JSON
object a line in ``events.jsonl``, with a ``type`` key; :func:`event_from_dict` reads one
back and says what is wrong with a line that is not an event.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from relu_doctor.diagnosis import Finding

__all__ = [
    "Declined",
    "Event",
    "FindingEvent",
    "Intervention",
    "InterventionResult",
    "event_from_dict",
    "is_judged",
    "loss_ratio",
    "loss_rose_text",
    "optimizer_of",
]

FindingStatus = Literal["began", "changed", "ended"]


@dataclass(frozen=True)
class FindingEvent:
    """A finding that began, changed severity, or ended at ``step``.

    Attributes:
        status: ``began``, ``changed`` (severity) or ``ended``.
        finding: the finding as diagnosed at ``step`` (for ``ended``: as last seen).
        step: the logging step.
    """

    status: FindingStatus
    finding: Finding
    step: int

    type: Literal["finding"] = "finding"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "status": self.status, **self.finding.to_dict(),
                "step": self.step}


@dataclass
class Intervention:
    """One change a remedy made to the model, the optimizer or the gradients.

    Attributes:
        remedy: the remedy's name (``leaky_relu_swap``, ``dormant_reset``...).
        site: the site's display name, or ``"model"`` for model-wide changes.
        step: the step at which it was made.
        what: one sentence saying what changed.
        before: the metrics it targets, measured over the window that led to it.
        after: the same over the next window (filled in from an
            :class:`InterventionResult`).
        id: unique within the run; results refer to it.
        details: remedy-specific data (clip statistics, recycled units, shared sites...).
    """

    remedy: str
    site: str
    step: int
    what: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    id: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    type: Literal["intervention"] = "intervention"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["type"] = self.type
        return out


@dataclass(frozen=True)
class InterventionResult:
    """The metrics after an intervention, measured at the next logging interval.

    Attributes:
        target: the metric the intervention was judged on (None: not judged).
        before: ``{target: value}`` before the intervention, which the verdict compares
            (so that a result read alone, as a live TensorBoard text, shows both).
        verdict: ``"helped"``, ``"did not help"`` or ``"unknown"`` on ``target``.
        efficacy: for changes to units (recycling), the share of them still dead, still
            below tau (ReDo score <= tau) and still either, the quiet units a recycler
            chooses: ``{"units", "still_dead", "still_below_tau", "still_quiet"}``.
        loss_rose: where the training loss of the window judged was at least
            :data:`~relu_doctor.remedies.judging.LOSS_HARM` times that of the window the
            change was made at, how many times (``inf``: no longer finite, ``"inf"`` in
            its JSON form); the verdict is then "did not help", whatever the target did.
    """

    ref: str
    remedy: str
    site: str
    step: int
    after: dict[str, Any] | None
    target: str | None = None
    verdict: str | None = None
    efficacy: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    loss_rose: float | None = None

    type: Literal["intervention_result"] = "intervention_result"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.loss_rose is not None and not math.isfinite(self.loss_rose):
            data["loss_rose"] = "inf"  # (JSON has no inf, and null reads as "did not rise")
        return data


@dataclass(frozen=True)
class Declined:
    """A site a remedy leaves alone from ``step`` on, and why (a capped activation, an input
    that is a sum of branches...): the report then advises that remedy there no more.

    Attributes:
        remedy: the remedy's name (``leaky_relu_swap``, ``dormant_reset``...).
        site: the site's display name.
        step: the logging step it declined at.
        reason: why, in one sentence.
    """

    remedy: str
    site: str
    step: int
    reason: str

    type: Literal["declined"] = "declined"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "what": f"left this site alone: {self.reason}"}


Event = FindingEvent | Intervention | InterventionResult | Declined


def _finding(data: Mapping[str, Any]) -> Finding:
    names = {f.name for f in fields(Finding)}
    return Finding(**{k: data[k] for k in names if k in data})


def optimizer_of(event: Mapping[str, Any]) -> int | None:
    """Which of several optimizers an intervention acted on (a clipper's
    ``details["optimizer"]``), None for the only one."""
    details = event.get("details")
    part = details.get("optimizer") if isinstance(details, Mapping) else None
    return part if type(part) is int else None


def loss_ratio(value: object) -> float | None:
    """An intervention result's ``loss_rose`` as read from its JSON form (``"inf"``: the
    loss was no longer finite); None where it is absent or not a number.

    Example:
        >>> loss_ratio(3.5), loss_ratio("inf"), loss_ratio(None), loss_ratio("x")
        (3.5, inf, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return math.inf if value == "inf" else None


def loss_rose_text(rose: float) -> str:
    """What the training loss did after a change the loss guard judged, in words.

    Example:
        >>> loss_rose_text(7.04), loss_rose_text(math.inf)
        ('the training loss rose 7.0x after it', 'the training loss was no longer finite after it')
    """
    did = "was no longer finite" if math.isinf(rose) else f"rose {rose:.1f}x"
    return f"the training loss {did} after it"


def is_judged(event: Mapping[str, Any]) -> bool:
    """Whether a log judges an intervention (not a clipper's report of its window, a plan's
    stop, a swap's restore: their details say ``judged: False``)."""
    details = event.get("details")
    return not isinstance(details, Mapping) or details.get("judged", True) is not False


def event_from_dict(data: object) -> Event:
    """Read one event back from its JSON form.

    Raises:
        ValueError: ``data`` is not an event of a known type, or a field has the wrong type;
            the message says which.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"'step' must be an integer, got {step!r}")
    try:
        if kind == "finding":
            status = data.get("status", "began")
            if status not in ("began", "changed", "ended"):
                raise ValueError(f"unknown finding status {status!r}")
            return FindingEvent(status, _finding(data), step)
        if kind == "intervention":
            names = {f.name for f in fields(Intervention)} - {"type"}
            known = {k: data[k] for k in names if k in data}
            extra = {k: v for k, v in data.items() if k not in names and k != "type"}
            iv = Intervention(**known)
            iv.details = {**iv.details, **extra}
            return iv
        if kind == "declined":
            return Declined(str(data["remedy"]), str(data["site"]), step,
                            str(data.get("reason", "")))
        if kind == "intervention_result":
            return InterventionResult(
                str(data["ref"]), str(data.get("remedy", "")), str(data.get("site", "")), step,
                data.get("after"), target=data.get("target"), verdict=data.get("verdict"),
                efficacy=data.get("efficacy"), before=data.get("before"),
                loss_rose=loss_ratio(data.get("loss_rose")),
            )
    except (KeyError, TypeError) as e:
        raise ValueError(f"a {kind} event is missing or mistypes a field: {e}") from None
    raise ValueError(f"unknown event type {kind!r}")
