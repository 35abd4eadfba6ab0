"""The steps of a treatment plan: which remedies a :class:`~relu_doctor.remedies.TreatmentPlan`
tries, in which order, and what counts as help for each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relu_doctor._validate import nonnegative, number_in
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies.base import MODEL
from relu_doctor.remedies.judging import MIN_GAIN

__all__ = ["DEFAULT_STEPS", "PLAN_REMEDIES", "PlanStep", "plan_steps"]

#: The remedies a plan step can name, and whether they act on the model or on one site.
PLAN_REMEDIES = {"clip": MODEL, "lr": MODEL, "swap": "site", "recycle": "site",
                 "continual_backprop": "site"}


@dataclass(frozen=True)
class PlanStep:
    """One step of a :class:`~relu_doctor.remedies.TreatmentPlan`.

    Attributes:
        remedy: ``"clip"`` (AutoClip), ``"lr"`` (halve the learning rate), ``"swap"``
            (ReLU -> LeakyReLU), ``"recycle"`` (ReDo) or ``"continual_backprop"``.
        min_gain: the relative fall of the target metric, one interval later, that counts
            as help (0: "no worse").
        tolerance: absolute slack added to that test (noise of a fraction).
        options: keyword arguments of the remedy (``percentile`` for clip; ``factor`` and
            ``min_lr`` for lr; ``slope`` and ``threshold`` (a site's dead fraction) for swap;
            ``threshold`` (a site's dead fraction), ``max_fraction`` and ``reset_adam_step``
            for recycle; those of
            :class:`~relu_doctor.remedies.continual_backprop.ContinualBackprop`).
    """

    remedy: str
    min_gain: float = 0.0
    tolerance: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.remedy not in PLAN_REMEDIES:
            raise ReluDoctorError(
                f"remedy: expected one of {list(PLAN_REMEDIES)}, got {self.remedy!r}."
            )
        number_in("min_gain", self.min_gain, 0.0, 1.0, low_open=False, high_open=True)
        nonnegative("tolerance", self.tolerance)
        known = _OPTIONS.get(self.remedy)  # (continual_backprop's: its own arguments')
        unknown = sorted(str(k) for k in self.options if known is not None and k not in known)
        if unknown:
            raise ReluDoctorError(
                f"options: the plan's {self.remedy!r} step takes {sorted(known or ())}, got "
                f"{unknown}: it would be ignored."
            )
        if self.remedy == "continual_backprop" and "threshold" in self.options:
            raise ReluDoctorError(
                "options: the plan's 'continual_backprop' step takes no threshold: it acts by "
                "its own rule (replacement_rate, maturity) at every log; it would "
                "be ignored."
            )


#: the options each step's remedy takes in a plan (see PlanStep.options)
_OPTIONS = {"clip": {"percentile"}, "lr": {"factor", "min_lr"}, "swap": {"slope", "threshold"},
            "recycle": {"threshold", "max_fraction", "reset_adam_step"}}


#: Gentlest first: clipping and the learning rate before surgery.
DEFAULT_STEPS = (
    PlanStep("clip", tolerance=0.02),
    PlanStep("lr", tolerance=0.1),
    PlanStep("recycle", min_gain=MIN_GAIN["dormant_reset"],
             options={"threshold": 0.3, "max_fraction": 0.25}),
    PlanStep("swap", min_gain=MIN_GAIN["leaky_relu_swap"], options={"threshold": 0.3, "slope": 0.05}),
)


_DEFAULT_BY_NAME = {s.remedy: s for s in DEFAULT_STEPS}


def plan_steps(steps: object) -> tuple[PlanStep, ...]:
    """A ``steps`` argument as PlanSteps: each a PlanStep or a remedy's name (its step as
    :data:`DEFAULT_STEPS` has it, thresholds and all; a bare ``PlanStep`` for a remedy the
    default plan leaves out), each remedy once, at least one."""
    expected = (f"a non-empty sequence of PlanStep or remedy names ({list(PLAN_REMEDIES)}), "
                "each remedy once")
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise ReluDoctorError(f"steps: expected {expected}, got {steps!r}.")
    given = list(steps)
    out = []
    for s in given:
        if isinstance(s, str):
            if s not in PLAN_REMEDIES:
                raise ReluDoctorError(
                    f"steps: {s!r} is not a remedy of the plan: expected one of "
                    f"{list(PLAN_REMEDIES)} (or a PlanStep)."
                )
            s = _DEFAULT_BY_NAME.get(s) or PlanStep(s)
        out.append(s)
    names = [s.remedy for s in out if isinstance(s, PlanStep)]
    if len(names) != len(out) or not out or len(set(names)) != len(names):
        raise ReluDoctorError(f"steps: expected {expected}, got {given!r}.")
    return tuple(out)
