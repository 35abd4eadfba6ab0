"""Findings as the report shows them: the unit indices they name, folded together where one
explains another at the same site, and remedies rewritten from what the run already is and
already did (the site's family, the interventions made), so the report names the next step.

Example:
    >>> from relu_doctor.diagnosis import REMEDY_NAMES, Finding
    >>> v = finding_view(Finding("dead", "fc.1", "warning", "2 of 8 units dead",
    ...                          {"dead_units": [1, 5]}, "Swap ReLU for LeakyReLU"))
    >>> v.kind_label, v.units_text
    ('dead units', '1, 5')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from relu_doctor.advice import RECYCLERS, REMEDY_NAMES, feeding, recycle_dead
from relu_doctor.diagnosis import Finding, finding_order
from relu_doctor.reports.formatting import UNIT_LISTS, fmt_value
from relu_doctor.reports.interventions import LOSS_ROSE, InterventionView

__all__ = ["MODEL_WIDE", "VOCABULARY", "FindingView", "done_lines", "finding_view", "kind_label", "merge",
           "recommend"]

#: The report's words (tiles, findings, tables): **dead** = no activation in the logging
#: window; **never active** = no activation since monitoring began; **dormant** = active,
#: but with a ReDo score at or below tau (dead units are not counted as dormant); **ReDo
#: score ≤ tau** = what ReDo recycles, dead units included (the interventions table).
VOCABULARY: tuple[tuple[str, str], ...] = (
    ("dead", "no activation on any sample in the logging window (in its collected steps, "
     "where the overhead budget samples: see \"steps collected\")"),
    ("never active", "no activation since monitoring began"),
    ("dormant", "active, but with a ReDo score (mean |h| over the layer's mean) at or below tau"),
    ("ReDo score ≤ tau", "dormant, or dead with a score that low: the units ReDo recycles, "
     "and what a recycling is judged on"),
)
_KIND_LABELS = {
    "dead": "dead units",
    "lifetime_dead": "never active",
    "dormant": "dormant units",
    "saturated": "saturated units",
    "too_sparse": "too sparse",
    "vanishing_gradient": "vanishing gradient",
    "exploding_gradient": "exploding gradient",
    "nonfinite": "NaN / Inf",
    "loss_scale_overflow": "loss-scale overflow",
    "activation_collapse": "activation collapse",
}


@dataclass(frozen=True)
class FindingView:
    """One finding as the report shows it: the finding's fields, the unit indices it names
    and the rest of its evidence as ``(label, formatted value)`` pairs."""

    kind: str
    kind_label: str
    site: str
    severity: str
    message: str
    remedy: str
    step: int
    began: int
    unit_label: str
    units_named: list[int]
    units_text: str
    evidence: list[tuple[str, str]]
    #: the id of the element that shows this site (its heatmap, else its table row)
    anchor: str = ""
    #: findings at the same site that this one explains, as ``(label, message)``
    merged: list[tuple[str, str]] = field(default_factory=list)
    #: what was already done at this site (or to the whole model), one line each
    done: list[str] = field(default_factory=list)
    #: the step of its evidence, where it is older than the other findings' (a finding
    #: rebuilt from events.jsonl: the log it began or last changed at); else None
    as_of: int | None = None
    #: where it goes among the findings, most severe first (diagnosis.finding_order)
    order: tuple[Any, ...] = ()
    #: a dead finding whose dead units never fired since monitoring began (its evidence's
    #: ``never_fired``): what the initialisation or a bias made, not training
    never_fired: bool = False
    #: of a dead finding's dead units, (those scoring above tau, all of them) where some do
    #: (a leaky or GELU family's units stuck negative): no recycler takes those (its
    #: evidence's ``above_tau``)
    above_tau: tuple[int, int] = (0, 0)


#: The advice a remedy's refusal ends with, for whoever configures it: not the report's
_EXCLUDE = "Exclude this site."


def _reason(why: str) -> str:
    """A remedy's reason for leaving a site alone, as the report's advice quotes it."""
    return why.strip().removesuffix(_EXCLUDE).strip().rstrip(".")


def kind_label(kind: str) -> str:
    """The report's name for a finding kind (``lifetime_dead`` -> ``never active``)."""
    return _KIND_LABELS.get(kind, kind.replace("_", " "))


def finding_view(f: Finding) -> FindingView:
    ev = dict(f.evidence)
    unit_key = next((k for k in UNIT_LISTS if isinstance(ev.get(k), list) and ev[k]), None)
    units_named = [int(x) for x in ev[unit_key]] if unit_key else []
    # how many units the list is of: "dead" for "dead_units" (a NaN/Inf finding's plain
    # "units" list has none: its "nonfinite" counts unit-steps)
    count = ev.get(unit_key.removesuffix("_units")) if unit_key not in (None, "units") else None
    evidence = [
        (k.replace("_", " "), fmt_value(k, v))
        for k, v in ev.items()
        if k != unit_key and k not in ("family", "leaky", "never_fired", "above_tau")
    ]
    above = ev.get("above_tau")
    return FindingView(
        kind=f.kind,
        kind_label=kind_label(f.kind),
        site=f.site,
        severity=f.severity,
        message=f.message,
        remedy=f.remedy,
        step=f.step,
        began=f.began,
        unit_label=(unit_key or "").replace("_", " "),
        units_named=units_named,
        units_text=fmt_value(unit_key, units_named, total=count if type(count) is int else None)
        if unit_key else "",
        evidence=evidence,
        order=finding_order(f.severity, f.kind, f.site, f.evidence),
        never_fired=ev.get("never_fired") is True,
        above_tau=(int(above[0]), int(above[1])) if isinstance(above, (list, tuple))
        and len(above) == 2 else (0, 0),
    )


# Findings explained by another at the same site: (explained kind, explaining kind). Dead
# units are never active in the window, so they make the layer sparse; units never active
# since the start are dead in the window too.
_EXPLAINED_BY = (("too_sparse", "dead"), ("lifetime_dead", "dead"))
MODEL_WIDE = "model"
_SWAP = "leaky_relu_swap"
_LR = "lr_rescue"
_CLIP = "adaptive_grad_clip"


def merge(findings: list[FindingView]) -> list[FindingView]:
    """Fold each finding that another at the same site explains into that one."""
    by_key = {(f.kind, f.site): f for f in findings}
    folded: dict[tuple[str, str], list[tuple[str, str]]] = {}
    gone: set[tuple[str, str]] = set()
    for f in findings:
        for kind, by in _EXPLAINED_BY:
            if f.kind == kind and (by, f.site) in by_key and (by, f.site) not in gone:
                folded.setdefault((by, f.site), []).append((f.kind_label, f.message))
                gone.add((f.kind, f.site))
                break
    return [
        replace(f, merged=f.merged + folded.get((f.kind, f.site), []))
        for f in findings
        if (f.kind, f.site) not in gone
    ]


def done_lines(done: Sequence[InterventionView]) -> list[str]:
    """One line per remedy: the one intervention with its judged change, or how many, when,
    and how they went."""
    by_remedy: dict[str, list[InterventionView]] = {}
    for e in done:
        by_remedy.setdefault(e.remedy, []).append(e)
    lines = []
    for remedy, evs in by_remedy.items():
        if len(evs) == 1 and evs[0].count <= 1:
            e = evs[0]
            change = "; ".join(f"{k} {b} → {a}" for k, b, a in e.changes[:1])
            verdict = (f", {e.verdict}" if e.verdict else "") + e.loss_text
            lines.append(f"{remedy} at step {e.step}{': ' + change if change else ''}{verdict}")
            continue
        n = sum(max(e.count, 1) for e in evs)
        first, last = evs[0].step, max(e.last_step for e in evs)
        verdicts: dict[str, int] = {}
        for e in evs:
            if e.verdict:
                verdicts[e.verdict] = verdicts.get(e.verdict, 0) + 1
        rose = sum(1 for e in evs if e.loss_rose)
        how = ", ".join([*(f"{k} {v}" for k, v in verdicts.items()), *(
            [f"the training loss rose {LOSS_ROSE}x or more after {rose}"] if rose else [])])
        lines.append(f"{remedy} ×{n} at steps {first}–{last}{' (' + how + ')' if how else ''}")
    return lines


def _bad_recyclings(judged: Sequence[InterventionView]) -> list[InterventionView]:
    """The ``judged`` recyclings that advise stopping: any that did not help, or those the
    training loss rose after (``loss_rose``, known for judged ones) where it rose after at
    least half of them (one rise among many that helped is said beside them, not a reason
    to stop)."""
    rose = [e for e in judged if e.loss_rose]
    if any(e.verdict == "did not help" for e in judged) or 2 * len(rose) >= len(judged) > 0:
        return [e for e in judged if e.verdict == "did not help" or e.loss_rose]
    return []


def _rose_after(judged: Sequence[InterventionView]) -> str:
    """After which of the ``judged`` recyclings the training loss rose: "the recycling" for
    the only one, "N of the M judged recyclings" otherwise."""
    if len(judged) == 1:
        return "the recycling"
    return f"{sum(1 for e in judged if e.loss_rose)} of the {len(judged)} judged recyclings"


def recommend(
    f: FindingView,
    leaky: bool,
    done: Sequence[InterventionView],
    names: Mapping[str, str | None] = REMEDY_NAMES["watch"],
    swappable: bool | None = None,
    declined: Mapping[str, str] | None = None,
) -> str:
    """The finding's remedy, rewritten for what this site already is and what was already
    done to it: no LeakyReLU for a leaky site, nor for one the swap cannot treat
    (``swappable``: see :func:`~relu_doctor.advice.can_swap`; by default, any site that
    is not leaky), no second try of a remedy that did not help, none that left this site
    alone (``declined``: ``{remedy: why}``, said instead); the remedies named as the run's
    loop names them (``names``: of :data:`~relu_doctor.advice.REMEDY_NAMES`); recycling
    advised only for the dead units scoring at most tau where some score above it."""
    swappable = not leaky if swappable is None else swappable
    declined = declined or {}
    tried = {e.remedy for e in done}
    failed = {e.remedy for e in done if e.verdict == "did not help"}
    if any(label in ("frozen layer", "no gradient") for label, _ in f.evidence):
        return f.remedy  # (no remedy of training reaches a frozen layer's units)
    if f.kind not in ("dead", "lifetime_dead", "too_sparse", "dormant"):
        if f.kind == "exploding_gradient" and {_CLIP, _LR} & tried:
            return ("Clipping and a lower learning rate were already applied (see Interventions): "
                    "lower the learning rate further or add normalisation; consider stopping "
                    "early if the loss diverges.")
        return f.remedy
    if not tried and not declined and (not leaky or f.never_fired):
        return f.remedy  # diagnosis's own words fit a first treatment (and its reasons)
    steps = []
    cuts = sum(max(e.count, 1) for e in done if e.remedy == _LR)
    norm = next((str(v) for label, v in f.evidence if label == "norm"), "")
    if f.never_fired:  # (no learning rate revives units that never fired: a review)
        check = f"first check {feeding(norm)}" if norm else f"check {feeding(norm)} first"
        steps.append(f"{check}: these units have not fired since monitoring began, and a "
                     "lower learning rate cannot revive them")  # (not "... fires first")
    elif not cuts:  # (first: the gentlest, where a swap can send a run diverging)
        steps.append(f"lower the learning rate (step or exponential decay; {names['lr']})")
    else:
        steps.append("lower the learning rate further or warm it up more slowly (it was "
                     f"already lowered {'once' if cuts == 1 else f'{cuts} times'})")
    if swappable and _SWAP not in tried and _SWAP not in declined:
        steps.append("swap ReLU for LeakyReLU with a negative slope of 0.01 to 0.3 "
                     f"({names['swap']}) or PReLU")
    recycled = set(RECYCLERS) & tried
    judged = [e for e in done if e.remedy in RECYCLERS and e.verdict]  # (their losses known)
    cannot = next((str(v) for label, v in f.evidence if label == "not recyclable"), None)
    if cannot is None and not recycled and names["recycle"] and not (
            set(RECYCLERS) & declined.keys()):
        # (Keras offers no recycling; dead units scoring above tau, a GELU's, are recycled
        # by none: a trial's were advised dormant_reset=True, which recycled 3 dormant units
        # and left 52 dead ones, and recycling them would take their outputs away)
        again = (recycle_dead(f.above_tau, names) if f.above_tau[0] else
                 f"recycle the units ({names['recycle']})")
        steps.extend([again] if again else [])
    elif bad := _bad_recyclings(judged):
        # (a trial's recyclings under Adam, each judged "helped" on its units, each raised
        # the training loss 1.5-3x and were advised "go on recycling"; reset_adam_step=True
        # kept the loss down)
        reasons = [*(["the recycled units went quiet again"] if recycled & failed else []),
                   *([f"the training loss rose {LOSS_ROSE}x or more after {_rose_after(judged)}"]
                     if any(e.loss_rose for e in bad) else [])]
        adam = [e for e in bad if e.adam_step_kept]
        steps.append(f"stop recycling here ({'; '.join(reasons)})" + (
            ", or recycle with reset_adam_step=True: under Adam its recycled units' zeroed "
            "moments took the tensor's old bias correction, so their first updates were "
            "larger than a fresh Adam's (about 3x the learning rate at the default betas), "
            "which can kill them again" + (" and jolt the loss" if any(e.loss_rose for e in adam)
                                           else "") if adam else ""))
    elif helped := sorted({e.remedy for e in done if e.remedy in RECYCLERS and e.verdict == "helped"}):
        # (it helped: named among the steps, not dropped from them)
        steps.append(f"go on recycling where units go quiet again ({', '.join(helped)} "
                     "helped here" + (f"; the training loss rose {LOSS_ROSE}x or more after "
                                      f"{_rose_after(judged)}" if any(e.loss_rose for e in judged)
                                      else "") + ")")
    if norm and not f.never_fired:  # (a norm is there: its shift and scale, not "add one")
        steps.append(f"check {feeding(norm)}")
    elif not norm:
        steps.append("check the normalisation before this activation (BatchNorm or LayerNorm, "
                     "where there is none)" + ("" if f.never_fired else " and the initialisation "
                                               "and bias of the layer that feeds it"))
    already = "This site is already leaky, so a LeakyReLU swap is not the answer. " if leaky else ""
    if tried:
        already += "Already tried: " + ", ".join(sorted(tried)) + ". "
    for remedy, why in sorted(declined.items()):
        already += f"{remedy} left this site alone: {_reason(why)}. "
    if cannot is not None and not set(RECYCLERS) & declined.keys():  # (said once)
        already += f"Recycling cannot treat this site: {_reason(cannot)}. "
    return already + "Next: " + "; ".join(steps) + "."
