"""Interventions as the report shows them: each judged on its own target metric (its before ->
after first), repeated clipping summarised in one row, numbered like their lines on the charts.

Reads the dict form of ``Run.interventions()`` only; names remedies by their event names (the
report never imports :mod:`relu_doctor.remedies`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from relu_doctor.events import is_judged, loss_ratio, loss_rose_text, optimizer_of
from relu_doctor.reports.formatting import fmt_num, fmt_pct

__all__ = ["CLIP_FIRST", "CONTINUOUS_REMEDIES", "InterventionView", "intervention_view",
           "snapshots", "timeline"]

#: Remedies that act on every step (gradient clipping): summarised in one timeline row per
#: site, not drawn over the time chart.
CONTINUOUS_REMEDIES = frozenset({"adaptive_grad_clip"})
#: Metrics an intervention's before/after snapshots carry (site snapshots and model-wide
#: snapshots of the remedies), with their labels.
_CHANGE_KEYS: tuple[tuple[str, str], ...] = (
    ("dead_fraction", "dead"),
    ("lifetime_dead_fraction", "never active"),
    ("changed_units_quiet", "changed units dead or with ReDo score ≤ tau"),
    ("changed_units_below_tau", "changed units with ReDo score ≤ tau"),  # (older runs)
    ("below_tau_fraction", "ReDo score ≤ tau"),
    ("dormant_fraction", "dormant"),
    ("clip_fraction", "steps clipped"),
    ("unclipped_grad_norm", "gradient norm before clipping"),
    ("lr", "learning rate"),
    ("sparsity", "sparsity"),
    ("activation_rate", "activation rate"),
    ("mean_abs", "mean |h|"),
    ("grad_rms", "gradient RMS"),
    ("grad_norm", "parameter-gradient norm"),
)


@dataclass
class InterventionView:
    """One intervention as the timeline shows it. ``changes`` holds ``(metric, before,
    after)`` formatted; ``count`` > 1 for a continuous remedy's summarised row, which spans
    ``step`` to ``last_step``."""

    step: int
    after_step: int | None
    site: str
    remedy: str
    what: str
    changes: list[tuple[str, str, str]]
    count: int = 1
    last_step: int = 0
    #: the metric it was judged on, and how that went (``helped``, ``did not help``)
    target: str = ""
    verdict: str = ""
    #: the number drawn on the charts' intervention lines (0: not drawn)
    number: int = 0
    #: the raw first and last snapshots (a summarised row's before/after span)
    before_raw: dict[str, Any] = field(default_factory=dict)
    after_raw: dict[str, Any] = field(default_factory=dict)
    #: a clipper's per-interval report (clip statistics), not a one-off change: summarised
    continuous: bool = False
    #: which of several optimizers it acted on (its own summarised row), None for the only one
    optimizer: int | None = None
    #: a recycling that zeroed Adam's moments of its slices and kept the tensor's step (no
    #: ``reset_adam_step``): their first updates larger than a fresh Adam's
    adam_step_kept: bool = False
    #: how many times the training loss rose from its step's window to the window it was
    #: judged on (``inf``: no longer finite): where the remedy's loss guard judged on it
    #: (``loss_guarded``), the ratio it judged; else where the logged loss rose
    #: :data:`LOSS_ROSE` times or more (0: it did not, or unknown)
    loss_rose: float = 0.0
    #: the verdict is the remedy's loss guard's (the intervention result's ``loss_rose``):
    #: "did not help" for the loss it made rise, whatever its target did
    loss_guarded: bool = False

    @property
    def loss_text(self) -> str:
        """What the training loss did after the change, as the verdict's tail ("" where it
        did not rise): the guard's reason, or a rise beside another verdict."""
        if not self.loss_rose:
            return ""
        if self.loss_guarded:
            return f": {loss_rose_text(self.loss_rose)}"
        joint = ", and" if self.verdict == "did not help" else ", but"
        return f"{joint} {loss_rose_text(self.loss_rose)}"


#: A judged intervention whose window after it held a training loss this many times that of
#: its own window says so beside its verdict (judged on its target alone, a swap read
#: "helped" where the loss rose 4x).
LOSS_ROSE = 1.5

#: The metric a remedy's intervention is judged on when its events do not say (older runs).
_DEFAULT_TARGETS = {
    "adaptive_grad_clip": "clip_fraction",
    "lr_rescue": "dead_fraction",
    "leaky_relu_swap": "dead_fraction",
    "dormant_reset": "below_tau_fraction",
    "continual_backprop": "below_tau_fraction",
}
#: Shares shown as percentages besides the ``*_fraction`` metrics.
_SHARES = frozenset({"changed_units_quiet", "changed_units_below_tau"})
#: Rows of before -> after shown per intervention: its target first.
_MAX_CHANGES = 3
#: What a clipper's report of its window shows first (it is not judged): the share of steps
#: it clipped and the gradient norm before clipping.
CLIP_FIRST = ("clip_fraction", "unclipped_grad_norm")


def _clip_details(ev: Mapping[str, Any]) -> dict[str, Any]:
    details = ev.get("details")
    clip = details.get("clip") if isinstance(details, Mapping) else None
    return dict(clip) if isinstance(clip, Mapping) else {}


def _changes(before: Mapping[str, Any], after: Mapping[str, Any], first: str | Sequence[str],
             measured: bool, unmeasured: str = "not yet measured") -> list[tuple[str, str, str]]:
    """``(label, before, after)`` formatted: the ``first`` metric (or metrics: the target),
    then the others; ``unmeasured`` in place of the numbers after while not ``measured``."""
    labels = dict(_CHANGE_KEYS)
    firsts = [first] if isinstance(first, str) else list(first)
    keys = [(t, labels.get(t, t.replace("_", " "))) for t in firsts if t]
    keys += [(k, lbl) for k, lbl in _CHANGE_KEYS if k not in firsts]
    out = []
    for key, label in keys:
        # a metric not measured either side (the gradient norm under Keras) is no change
        if (key in before or key in after) and (
                key in firsts or before.get(key) is not None or after.get(key) is not None):
            fmt = fmt_pct if "fraction" in key or key in _SHARES else fmt_num
            out.append((label, fmt(before.get(key)),
                        fmt(after.get(key)) if measured else unmeasured))
    return out[:_MAX_CHANGES]


def snapshots(ev: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An intervention's metrics before and after, with the numbers it is judged on that its
    details carry: a clipper's share of steps clipped, and for a recycling the share of the
    changed units dead or below tau (its snapshot's share before, all of them in older runs;
    ``efficacy["still_quiet"]`` after; below tau in runs recorded before that)."""
    b_raw, a_raw = ev.get("before"), ev.get("after")
    before: dict[str, Any] = dict(b_raw) if isinstance(b_raw, Mapping) else {}
    after: dict[str, Any] = dict(a_raw) if isinstance(a_raw, Mapping) else {}
    clip = _clip_details(ev)
    if "clip_fraction" in clip:  # the clipper's own number: the share of steps it clipped
        before["clip_fraction"] = clip["clip_fraction"]
    efficacy = ev.get("efficacy")
    if isinstance(efficacy, Mapping) and "still_quiet" in efficacy:
        before.setdefault("changed_units_quiet", 1.0)  # (what runs recorded before judged)
        after["changed_units_quiet"] = efficacy["still_quiet"]
    elif isinstance(efficacy, Mapping) and "still_below_tau" in efficacy:
        before["changed_units_below_tau"] = 1.0
        after["changed_units_below_tau"] = efficacy["still_below_tau"]
    return before, after


def _shown_verdict(verdict: str, before: Any, after: Any) -> str:
    """The verdict as the report words it: a remedy judged on "no worse, within a
    tolerance" that helped with its target unchanged or a little higher reads "no worse",
    not "helped" beside a number that did not fall, as the report shows it ("dead 56.2% ->
    56.2%, helped": a trial; a fall within the shown rounding is none)."""
    numbers = isinstance(before, (int, float)) and isinstance(after, (int, float))
    level = numbers and (after >= before or math.isclose(after, before, rel_tol=5e-3, abs_tol=5e-4))
    return "no worse (within tolerance)" if verdict == "helped" and level else verdict


def intervention_view(ev: Mapping[str, Any]) -> InterventionView:
    before, after = snapshots(ev)
    clip = _clip_details(ev)
    remedy = str(ev.get("remedy") or "intervention")
    judged = is_judged(ev)
    target = str(ev.get("target") or (_DEFAULT_TARGETS.get(remedy, "") if judged else ""))
    after_step = ev.get("after_step")
    step = int(ev.get("step", 0))
    continuous = remedy in CONTINUOUS_REMEDIES and bool(clip)
    rose = loss_ratio(ev.get("loss_rose"))  # (the loss guard's, where it judged)
    return InterventionView(
        step=step,
        after_step=int(after_step) if isinstance(after_step, int) else None,
        site=str(ev.get("site") or ""),
        optimizer=optimizer_of(ev),
        remedy=remedy,
        what=str(ev.get("what") or ""),
        # (a clipper's row of an older run, judged on its target: that target first)
        changes=_changes(before, after, CLIP_FIRST if continuous and not (
                             judged and ev.get("target")) else target, bool(after),
                         "not yet measured" if judged else "not judged"),
        last_step=step,
        target=target,
        verdict=_shown_verdict(str(ev.get("verdict") or ""), before.get(target), after.get(target)),
        before_raw=before,
        after_raw=after,
        continuous=continuous,
        adam_step_kept=_adam_step_kept(ev),
        loss_rose=rose or 0.0,
        loss_guarded=rose is not None,
    )


def _adam_step_kept(ev: Mapping[str, Any]) -> bool:
    """Whether a recycling zeroed Adam's (or AdamW's: those ``reset_adam_step`` takes)
    moments of its slices without restarting their step."""
    details = ev.get("details")
    if not isinstance(details, Mapping):
        return False
    state, opts = details.get("optimizer_state"), details.get("optimizers")
    return (isinstance(state, list) and "exp_avg_sq" in state and "step" not in state
            and isinstance(opts, list) and bool(opts) and set(opts) <= {"Adam", "AdamW"})


def timeline(interventions: Sequence[InterventionView]) -> list[InterventionView]:
    """Timeline rows: every discrete intervention, plus one row per (continuous remedy,
    site) summarising its repeated events (first step, last step, count, last message)."""
    rows: list[InterventionView] = []
    groups: dict[tuple[str, str, int | None], InterventionView] = {}
    for e in interventions:
        if not e.continuous:
            rows.append(replace(e))
            continue
        key = (e.remedy, e.site, e.optimizer)  # (several optimizers' clippers: one row each)
        g = groups.get(key)
        if g is None:
            g = groups[key] = replace(e, count=0)
            rows.append(g)
        g.count += 1
        g.last_step = e.step
        g.what = e.what
        g.after_raw = e.before_raw  # the span: first interval's numbers -> last interval's
    for g in rows:
        if g.count > 1:
            g.changes = _changes(g.before_raw, g.after_raw, CLIP_FIRST, True)
            g.what = (f"acted at {g.count} logging intervals, steps {g.step}–{g.last_step}; "
                      f"last: {g.what}")
            g.verdict = ""
    return rows
