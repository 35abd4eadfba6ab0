"""The report as plain data: everything a report shows, built once from a run record.

:func:`build_context` reads a :class:`~relu_doctor.history.Run` (never a model, a hook or a
device tensor) and returns a :class:`ReportContext`: the verdict, the key numbers, the
findings of the last logged step (``run.findings()``, exact, never rebuilt from events), one
row per site, the interventions (``run.interventions()``), the tables the figures are drawn
from, and the environment. :mod:`~relu_doctor.reports.html`, :mod:`~relu_doctor.reports.text`
and :mod:`~relu_doctor.reports.plots` read it; none of them reads the run itself again.

Numbers are formatted here too (:func:`fmt_pct`, :func:`fmt_num`), so that the HTML table
and the terminal summary print the same cell for the same number.

Example:
    >>> import pandas as pd
    >>> from relu_doctor.history import Run
    >>> ctx = build_context(Run(meta={"model": "Net"}, history=pd.DataFrame(),
    ...                         units=pd.DataFrame(), layers=pd.DataFrame()))
    >>> ctx.verdict.status, ctx.verdict.headline
    ('empty', 'Nothing logged yet')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from relu_doctor._validate import finite_or_none
from relu_doctor.diagnosis import Finding, severity_rank
from relu_doctor.history import Run, load_run

__all__ = [
    "CONTINUOUS_REMEDIES",
    "MAX_HEATMAPS",
    "MAX_OPEN_FINDINGS",
    "VOCABULARY",
    "EvalView",
    "FindingView",
    "InterventionView",
    "ReportContext",
    "Series",
    "SiteRow",
    "Verdict",
    "as_run",
    "build_context",
    "fmt_int",
    "fmt_num",
    "fmt_pct",
]

#: Most per-unit heatmaps drawn; sites with findings and the most dead units come first.
MAX_HEATMAPS = 12
#: Findings shown before the rest are folded away.
MAX_OPEN_FINDINGS = 12
#: Remedies that act on every step (gradient clipping): summarised in one timeline row per
#: site, not drawn over the time chart.
CONTINUOUS_REMEDIES = frozenset({"adaptive_grad_clip"})

#: The report's words (tiles, findings, tables): **dead** = no activation in the logging
#: window; **never active** = no activation since monitoring began; **dormant** = active,
#: but with a ReDo score at or below tau (dead units are not counted as dormant).
VOCABULARY: tuple[tuple[str, str], ...] = (
    ("dead", "no activation on any sample in the logging window"),
    ("never active", "no activation since monitoring began"),
    ("dormant", "active, but with a ReDo score (mean |h| over the layer's mean) at or below tau"),
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
}
# The evidence keys under which diagnosis lists unit indices (at most _UNIT_LIST_LIMIT).
_UNIT_LISTS = ("dead_units", "dormant_units", "saturated_units", "units")
_UNIT_LIST_LIMIT = 64
# Site metrics of the per-site table, as logged in the run's history.
_SITE_METRICS = (
    "units", "dead", "dead_fraction", "lifetime_dead", "dormant", "dormant_fraction",
    "sparsity", "grad_rms", "grad_zero_fraction", "saturated_fraction", "nonfinite",
)
#: Metrics an intervention's before/after snapshots carry (site snapshots and model-wide
#: snapshots of the remedies), with their labels.
_CHANGE_KEYS: tuple[tuple[str, str], ...] = (
    ("dead_fraction", "dead"),
    ("lifetime_dead_fraction", "never active"),
    ("dormant_fraction", "dead or dormant"),  # the record's dormant counts dead units too
    ("clip_fraction", "steps clipped"),
    ("lr", "learning rate"),
    ("sparsity", "sparsity"),
    ("activation_rate", "activation rate"),
    ("mean_abs", "mean |h|"),
    ("grad_rms", "gradient RMS"),
    ("grad_norm", "parameter-gradient norm"),
)


# ---------------------------------------------------------------------- input


def as_run(value: object, name: str = "run") -> Run:
    """``value`` as a run record: a :class:`~relu_doctor.history.Run` as it is, a path (str
    or os.PathLike) loaded with :func:`~relu_doctor.history.load_run`; anything else (a
    model, a Doctor) is a clear error naming ``name``."""
    import os

    from relu_doctor.errors import ReluDoctorError
    from relu_doctor.history import load_run

    if isinstance(value, Run):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_run(value)
    hint = ""
    if hasattr(value, "to_run"):
        hint = " (for a Doctor, pass doc.to_run())"
    elif hasattr(value, "parameters") and hasattr(value, "forward"):
        hint = (" (a report is made from what was recorded, not from the model: pass the "
                "run_dir given to watch(), or doc.to_run())")
    raise ReluDoctorError(
        f"{name}: expected a run record (relu_doctor.load_run(...), doc.to_run()) or the path "
        f"of a run directory, got {type(value).__name__}{hint}."
    )


# ---------------------------------------------------------------------- formatting


def fmt_pct(v: Any) -> str:
    """``0.125`` -> ``'12.5%'``; missing or NaN -> ``'—'``."""
    f = None if isinstance(v, bool) else finite_or_none(v)
    return "—" if f is None else f"{f:.1%}"


def fmt_num(v: Any) -> str:
    """Three significant digits; integers as integers; missing or NaN -> ``'—'``."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = finite_or_none(v)
    if f is None:
        return "—"
    if f == int(f) and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.3g}"


def fmt_int(v: Any) -> str:
    """An integer count; missing or NaN -> ``'—'``."""
    f = None if isinstance(v, bool) else finite_or_none(v)
    return "—" if f is None else str(int(f))


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, (list, tuple)):
        if key in _UNIT_LISTS and all(isinstance(x, (int, float)) for x in v):
            text = ", ".join(str(int(x)) for x in v)
            return text + (f" … (first {len(v)} listed)" if len(v) >= _UNIT_LIST_LIMIT else "")
        return ", ".join(_fmt_value("", x) for x in v)
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_fmt_value(str(k), x)}" for k, x in v.items())
    if isinstance(v, str):
        return v
    if key.endswith("fraction") or key in ("sparsity", "threshold"):
        return fmt_pct(v)
    return fmt_num(v)


def _json_safe(v: Any) -> Any:
    """Plain JSON data for the report's data island: NaN/Inf as null, numpy as Python."""
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return finite_or_none(v)
    if v is None or isinstance(v, (int, str)):
        return v
    return str(v)


# ---------------------------------------------------------------------- the parts


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


def _finding_view(f: Finding) -> FindingView:
    ev = dict(f.evidence)
    unit_key = next((k for k in _UNIT_LISTS if isinstance(ev.get(k), list) and ev[k]), None)
    units_named = [int(x) for x in ev[unit_key]] if unit_key else []
    evidence = [
        (k.replace("_", " "), _fmt_value(k, v))
        for k, v in ev.items()
        if k != unit_key and k not in ("family", "leaky")
    ]
    return FindingView(
        kind=f.kind,
        kind_label=_KIND_LABELS.get(f.kind, f.kind.replace("_", " ")),
        site=f.site,
        severity=f.severity,
        message=f.message,
        remedy=f.remedy,
        step=f.step,
        began=f.began,
        unit_label=(unit_key or "").replace("_", " "),
        units_named=units_named,
        units_text=_fmt_value(unit_key, units_named) if unit_key else "",
        evidence=evidence,
    )


# Findings explained by another at the same site: (explained kind, explaining kind). Dead
# units are never active in the window, so they make the layer sparse; units never active
# since the start are dead in the window too.
_EXPLAINED_BY = (("too_sparse", "dead"), ("lifetime_dead", "dead"))
_MODEL_WIDE = "model"
_SWAP = "leaky_relu_swap"
_RECYCLERS = ("dormant_reset", "continual_backprop")
_LR = "lr_rescue"
_CLIP = "adaptive_grad_clip"


def _merge(findings: list[FindingView]) -> list[FindingView]:
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


def _done_lines(done: Sequence[InterventionView]) -> list[str]:
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
            verdict = f", {e.verdict}" if e.verdict else ""
            lines.append(f"{remedy} at step {e.step}{': ' + change if change else ''}{verdict}")
            continue
        n = sum(max(e.count, 1) for e in evs)
        first, last = evs[0].step, max(e.last_step for e in evs)
        verdicts: dict[str, int] = {}
        for e in evs:
            if e.verdict:
                verdicts[e.verdict] = verdicts.get(e.verdict, 0) + 1
        how = ", ".join(f"{k} {v}" for k, v in verdicts.items())
        lines.append(f"{remedy} ×{n} at steps {first}–{last}{' (' + how + ')' if how else ''}")
    return lines


def _recommend(f: FindingView, leaky: bool, done: Sequence[InterventionView]) -> str:
    """The finding's remedy, rewritten for what this site already is and what was already
    done to it: no LeakyReLU for a leaky site, no second try of a remedy that did not help."""
    tried = {e.remedy for e in done}
    failed = {e.remedy for e in done if e.verdict == "did not help"}
    if f.kind not in ("dead", "lifetime_dead", "too_sparse", "dormant"):
        if f.kind == "exploding_gradient" and {_CLIP, _LR} & tried:
            return ("Clipping and a lower learning rate were already applied (see Interventions): "
                    "lower the learning rate further or add normalisation; consider stopping "
                    "early if the loss diverges.")
        return f.remedy
    if not leaky and not tried:
        return f.remedy  # diagnosis's own words fit a first treatment
    steps = []
    if not leaky and _SWAP not in tried:
        steps.append("swap ReLU for LeakyReLU (alpha 0.01 to 0.3; LeakyReluSwap) or PReLU")
    if _LR not in tried:
        steps.append("lower the learning rate (step or exponential decay; LRRescue)")
    else:
        steps.append("lower the learning rate further or warm it up more slowly (it was "
                     "already lowered once)")
    recycled = set(_RECYCLERS) & tried
    if not recycled:
        steps.append("recycle the units (DormantReset)")
    elif recycled & failed:
        steps.append("stop recycling here (the recycled units went quiet again)")
    steps.append("add normalisation (BatchNorm or LayerNorm) before this activation, and check "
                 "the initialisation and bias of the layer that feeds it")
    already = "This site is already leaky, so a LeakyReLU swap is not the answer. " if leaky else ""
    if tried:
        already += "Already tried: " + ", ".join(sorted(tried)) + ". "
    return already + "Next: " + "; ".join(steps) + "."


def _treat_findings(
    findings: list[FindingView],
    sites: Sequence[SiteRow],
    interventions: Sequence[InterventionView],
    anchors: Mapping[str, str],
) -> list[FindingView]:
    """Findings merged, linked to their site's figure, with the remedy adjusted to what was
    already done (families from meta.json, interventions from the events)."""
    leaky = {r.site: r.leaky for r in sites}
    out = []
    for f in _merge(findings):
        done = [e for e in interventions if e.site == f.site
                or (e.site == _MODEL_WIDE and f.site != _MODEL_WIDE)]
        if f.site == _MODEL_WIDE:
            done = [e for e in interventions if e.site == _MODEL_WIDE]
        own = None
        anchor = anchors.get(f.site, "rd-gradients" if f.site == _MODEL_WIDE else "rd-sites")
        del own
        out.append(replace(f, anchor=anchor, done=_done_lines(done),
                           remedy=_recommend(f, leaky.get(f.site, False), done)))
    return out


@dataclass(frozen=True)
class SiteRow:
    """One row of the per-site table at the last logged step: formatted cells, and the
    numbers behind them in ``raw`` (None where not measured)."""

    site: str
    family: str
    leaky: bool
    unit_rule: str
    unit_dim: int | None
    logged: bool
    severity: str
    units: str
    dead: str
    dead_pct: str
    lifetime_dead: str
    dormant: str
    sparsity: str
    grad_rms: str
    grad_zero: str
    raw: dict[str, Any]
    anchor: str = ""


def _dormant_not_dead(units: pd.DataFrame, step: int | None) -> dict[str, int]:
    """Per site, the units the run record marks dormant and not dead at ``step`` (the
    record's ``dormant`` flag counts dead units too; the report's "dormant" does not)."""
    if units.empty or step is None or not {"dormant", "dead", "site", "step"} <= set(units):
        return {}
    u = units[units["step"] == step]
    mask = u["dormant"].astype(bool) & ~u["dead"].astype(bool)
    return {str(k): int(v) for k, v in mask.groupby(u["site"].astype(str)).sum().items()}


def _site_rows(run: Run, last: pd.DataFrame, findings: Sequence[FindingView]) -> list[SiteRow]:
    worst: dict[str, str] = {}
    for f in findings:
        cur = worst.get(f.site)
        if cur is None or severity_rank(f.severity) > severity_rank(cur):
            worst[f.site] = f.severity
    by_name = {str(r["site"]): r for r in last.to_dict("records")} if not last.empty else {}
    described = {str(s.get("name")): s for s in run.site_info}
    names = list(described) + [n for n in by_name if n not in described]  # not yet in meta
    step = int(last["step"].max()) if not last.empty and "step" in last else None
    quiet = _dormant_not_dead(run.units, step)
    rows = []
    for i, name in enumerate(names):
        meta = described.get(name, {})
        h = by_name.get(name, {})
        raw = {k: h.get(k) for k in _SITE_METRICS}
        if name in quiet:
            raw["dormant"] = quiet[name]
        elif raw["dormant"] is not None and not bool(h.get("leaky", meta.get("leaky", False))):
            # no unit rows: for a plain ReLU every dead unit has score 0, hence is dormant
            raw["dormant"] = int(raw["dormant"]) - int(raw["dead"] or 0)
        if raw["units"] is None:
            raw["units"] = meta.get("units")
        unit_dim = meta.get("unit_dim")
        rows.append(
            SiteRow(
                site=name,
                family=str(h.get("family") or meta.get("family") or ""),
                leaky=bool(h.get("leaky", meta.get("leaky", False))),
                unit_rule=str(meta.get("unit_rule") or ""),
                unit_dim=int(unit_dim) if isinstance(unit_dim, int) else None,
                logged=bool(h),
                severity=worst.get(name, ""),
                units=fmt_int(raw["units"]),
                dead=fmt_int(raw["dead"]),
                dead_pct=fmt_pct(raw["dead_fraction"]),
                lifetime_dead=fmt_int(raw["lifetime_dead"]),
                dormant=fmt_int(raw["dormant"]),
                sparsity=fmt_pct(raw["sparsity"]),
                grad_rms=fmt_num(raw["grad_rms"]),
                grad_zero=fmt_pct(raw["grad_zero_fraction"]),
                raw=_json_safe(raw),
                anchor=f"rd-site-{i}",
            )
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    """The first thing the report says: ``status`` is ``empty``, ``healthy``, ``warning`` or
    ``critical``; ``top`` holds the (up to three) most severe findings."""

    status: str
    headline: str
    detail: str
    top: list[FindingView] = field(default_factory=list)


def _verdict(findings: Sequence[FindingView], last_step: int | None, step: int | None) -> Verdict:
    if last_step is None:
        return Verdict(
            "empty",
            "Nothing logged yet",
            "The run stopped before its first logging interval closed, so there are no "
            "statistics to report. Log more often (log_every_n_steps) or train longer.",
        )
    serious = [f for f in findings if f.severity in ("critical", "warning")]
    notes = len(findings) - len(serious)
    if not serious:
        detail = f"No dead, dormant or saturated units and no gradient problem at step {step}."
        if notes:
            detail = f"Nothing serious at step {step}; {notes} minor note{'s' * (notes != 1)} below."
        return Verdict("healthy", "Healthy", detail)
    n_crit = sum(f.severity == "critical" for f in serious)
    n_warn = len(serious) - n_crit
    parts = [f"{n_crit} critical"] if n_crit else []
    if n_warn:
        parts.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
    return Verdict(
        "critical" if n_crit else "warning",
        f"{len(serious)} problem{'s' * (len(serious) != 1)} found ({', '.join(parts)})",
        f"At step {step}. The most severe:",
        list(serious[:3]),
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


#: The metric a remedy's intervention is judged on when its events do not say (older runs).
_DEFAULT_TARGETS = {
    "adaptive_grad_clip": "clip_fraction",
    "lr_rescue": "dead_fraction",
    "leaky_relu_swap": "dead_fraction",
    "dormant_reset": "dormant_fraction",
    "continual_backprop": "dormant_fraction",
}
#: Rows of before -> after shown per intervention: its target first.
_MAX_CHANGES = 3


def _clip_details(ev: Mapping[str, Any]) -> dict[str, Any]:
    details = ev.get("details")
    clip = details.get("clip") if isinstance(details, Mapping) else None
    return dict(clip) if isinstance(clip, Mapping) else {}


def _changes(before: Mapping[str, Any], after: Mapping[str, Any], target: str,
             measured: bool) -> list[tuple[str, str, str]]:
    """``(label, before, after)`` formatted: the target metric first, then the others."""
    labels = dict(_CHANGE_KEYS)
    keys = [(target, labels.get(target, target.replace("_", " ")))] if target else []
    keys += [(k, lbl) for k, lbl in _CHANGE_KEYS if k != target]
    out = []
    for key, label in keys:
        if key in before or key in after:
            fmt = fmt_pct if "fraction" in key else fmt_num
            out.append((label, fmt(before.get(key)),
                        fmt(after.get(key)) if measured else "not yet measured"))
    return out[:_MAX_CHANGES]


def _intervention_view(ev: Mapping[str, Any]) -> InterventionView:
    b_raw, a_raw = ev.get("before"), ev.get("after")
    before: dict[str, Any] = dict(b_raw) if isinstance(b_raw, Mapping) else {}
    after: dict[str, Any] = dict(a_raw) if isinstance(a_raw, Mapping) else {}
    clip = _clip_details(ev)
    if "clip_fraction" in clip:  # the clipper's own number: the share of steps it clipped
        before["clip_fraction"] = clip["clip_fraction"]
    remedy = str(ev.get("remedy") or "intervention")
    target = str(ev.get("target") or _DEFAULT_TARGETS.get(remedy, ""))
    after_step = ev.get("after_step")
    step = int(ev.get("step", 0))
    return InterventionView(
        step=step,
        after_step=int(after_step) if isinstance(after_step, int) else None,
        site=str(ev.get("site") or ""),
        remedy=remedy,
        what=str(ev.get("what") or ""),
        changes=_changes(before, after, target, bool(after)),
        last_step=step,
        target=target,
        verdict=str(ev.get("verdict") or ""),
        before_raw=before,
        after_raw=after,
    )


def _timeline(interventions: Sequence[InterventionView]) -> list[InterventionView]:
    """Timeline rows: every discrete intervention, plus one row per (continuous remedy,
    site) summarising its repeated events (first step, last step, count, last message)."""
    rows: list[InterventionView] = []
    groups: dict[tuple[str, str], InterventionView] = {}
    for e in interventions:
        if e.remedy not in CONTINUOUS_REMEDIES:
            rows.append(replace(e))
            continue
        g = groups.get((e.remedy, e.site))
        if g is None:
            g = groups[(e.remedy, e.site)] = replace(e, count=0)
            rows.append(g)
        g.count += 1
        g.last_step = e.step
        g.what = e.what
        g.after_raw = e.before_raw  # the span: first interval's numbers -> last interval's
    for g in rows:
        if g.count > 1:
            g.changes = _changes(g.before_raw, g.after_raw, "clip_fraction", True)
            g.what = (f"acted at {g.count} logging intervals, steps {g.step}–{g.last_step}; "
                      f"last: {g.what}")
            g.verdict = ""
    return rows


@dataclass(frozen=True)
class Series:
    """The tables the figures are drawn from (host-side pandas frames of the run) and the
    choices made about them.

    Attributes:
        history: one row per (step, site).
        units: one row per (step, site, unit).
        layers: one row per (step, layer).
        families: the family of each site, by name.
        heatmap_sites: the sites whose per-unit heatmap is drawn, in depth order.
        heatmaps_omitted: how many sites with unit rows were left out of the heatmaps.
        marks: the steps of the interventions drawn over the time charts (not the continuous
            ones), one line per step, labelled with its number (1, 2, ...).
        metrics: the training metrics, long format (``step``, ``name``, ``value``).
    """

    history: pd.DataFrame
    units: pd.DataFrame
    layers: pd.DataFrame
    families: dict[str, str]
    heatmap_sites: list[str]
    heatmaps_omitted: int
    marks: list[int]
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: per drawn site, the unit indices its findings name (drawn one row each)
    named_units: dict[str, list[int]] = field(default_factory=dict)


def _heatmap_sites(run: Run, findings: Sequence[FindingView]) -> tuple[list[str], int]:
    if run.units.empty:
        return [], 0
    names = [str(s.get("name")) for s in run.site_info]
    names += [s for s in pd.unique(run.units["site"].astype(str)) if s not in names]
    present = set(run.units["site"].astype(str))
    names = [n for n in names if n in present]
    if len(names) <= MAX_HEATMAPS:
        return names, 0
    sev: dict[str, int] = {}
    for f in findings:
        sev[f.site] = max(sev.get(f.site, 0), 1 + severity_rank(f.severity))
    peak = run.history.groupby(run.history["site"].astype(str))["dead_fraction"].max()
    ranked = sorted(
        names,
        key=lambda n: (-sev.get(n, 0), -float(np.nan_to_num(peak.get(n, 0.0))), names.index(n)),
    )
    keep = set(ranked[:MAX_HEATMAPS])
    return [n for n in names if n in keep], len(names) - MAX_HEATMAPS


def _environment(run: Run) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(versions, device and where the run lives; the monitoring configuration)."""
    meta = run.meta
    env = [(str(k), str(v)) for k, v in (meta.get("versions") or {}).items()]
    for key in ("device", "model"):
        if meta.get(key) not in (None, ""):
            env.append((key, str(meta[key])))
    env.append(("run directory", str(run.path) if run.path is not None else "(in memory)"))
    env.append(("run-directory format", str(meta.get("format_version", "?"))))
    config = [
        (str(k).replace("_", " "), v if isinstance(v, str) else _fmt_value(str(k), v))
        for k, v in (meta.get("config") or {}).items()
    ]
    return env, config


def _metrics_table(run: Run) -> pd.DataFrame:
    """The run's training metrics (``step``, ``name``, ``value``): empty for a run that
    logged none (or was written before they were recorded)."""
    table = getattr(run, "metrics", None)
    if not isinstance(table, pd.DataFrame) or table.empty:
        return pd.DataFrame(columns=["step", "name", "value"])
    if not {"step", "name", "value"} <= set(table):
        return pd.DataFrame(columns=["step", "name", "value"])
    return table


# ---------------------------------------------------------------------- the whole


@dataclass(frozen=True)
class ReportContext:
    """Everything a report shows, as plain data (the figures are drawn from ``series``).

    ``data`` is a JSON-ready summary (embedded in the HTML report for machines to read).
    """

    title: str
    model: str
    run_path: str
    generated: str
    steps: list[int]
    last_step: int | None
    log_every: Any
    tau: Any
    max_open: int
    verdict: Verdict
    key_numbers: list[tuple[str, str]]
    findings: list[FindingView]
    findings_step: int | None
    findings_stale: str
    sites: list[SiteRow]
    anchors: dict[str, str]
    vocabulary: list[tuple[str, str]]
    interventions: list[InterventionView]
    remedy_counts: list[tuple[str, int]]
    timeline: list[InterventionView]
    environment: list[tuple[str, str]]
    configuration: list[tuple[str, str]]
    series: Series
    data: dict[str, Any]
    evaluation: EvalView | None = None


@dataclass(frozen=True)
class EvalView:
    """The evaluation stream (``watch(..., eval_stream=True)``, the Lightning callback's
    ``monitor_validation``): passes in eval mode or without gradients, kept out of the
    training statistics and recorded in a run directory of their own (``<run>/<name>``,
    named by the training run's ``meta.json``). ``note`` says why it could not be read."""

    name: str
    steps: list[int]
    last_step: int | None
    passes: int | None
    sites: list[SiteRow]
    note: str = ""


def _evaluation(run: Run) -> EvalView | None:
    name = run.meta.get("eval_stream")
    if not isinstance(name, str) or not name or run.path is None:
        return None
    try:
        ev = load_run(run.path / name)
    except Exception as e:  # missing or damaged: say so in the section, never fail the report
        return EvalView(name, [], None, None, [], note=f"{type(e).__name__}: {e}")
    hist = ev.history
    steps = sorted(int(s) for s in hist["step"].unique()) if not hist.empty else []
    last = hist[hist["step"] == steps[-1]] if steps else pd.DataFrame()
    passes = int(last["window_steps"].iloc[0]) if "window_steps" in last and len(last) else None
    return EvalView(name, steps, steps[-1] if steps else None, passes, _site_rows(ev, last, []))


def build_context(run: Run) -> ReportContext:
    """The report of ``run`` as plain data.

    Args:
        run: a run record (:func:`relu_doctor.load_run` or ``Doctor.to_run()``).
    """
    hist = run.history
    steps = sorted(int(s) for s in hist["step"].unique()) if not hist.empty else []
    last_step = steps[-1] if steps else None
    last = hist[hist["step"] == last_step] if last_step is not None else pd.DataFrame()
    findings = [_finding_view(f) for f in run.findings()]
    findings.sort(key=lambda f: (-severity_rank(f.severity), f.kind, f.site))
    findings_step = max((f.step for f in findings), default=last_step)
    sites = _site_rows(run, last, findings)
    interventions = [_intervention_view(e) for e in run.interventions()]
    line_steps = sorted({e.step for e in interventions if e.remedy not in CONTINUOUS_REMEDIES})
    numbers = {step: i + 1 for i, step in enumerate(line_steps)}
    for e in interventions:
        e.number = numbers.get(e.step, 0) if e.remedy not in CONTINUOUS_REMEDIES else 0
    heatmaps, omitted = _heatmap_sites(run, findings)
    anchors = {r.site: (f"rd-fig-{r.anchor[len('rd-site-'):]}" if r.site in heatmaps else r.anchor)
               for r in sites}
    findings = _treat_findings(findings, sites, interventions, anchors)
    named: dict[str, list[int]] = {}
    for f in findings:
        if f.site in heatmaps:
            named.setdefault(f.site, [])
            named[f.site] += [u for u in f.units_named if u not in named[f.site]]
    remedy_counts: dict[str, int] = {}
    for e in interventions:
        remedy_counts[e.remedy] = remedy_counts.get(e.remedy, 0) + 1

    def total(key: str) -> int:
        return sum(int(r.raw[key] or 0) for r in sites)

    units, dead = total("units"), total("dead")
    key_numbers = [
        ("sites", str(len(sites))),
        ("units", str(units)),
        ("dead now", f"{dead} ({fmt_pct(dead / units) if units else '—'})"),
        ("never active", str(total("lifetime_dead"))),
        ("dormant", str(total("dormant"))),
        ("steps logged", f"{steps[0]}–{steps[-1]} ({len(steps)} logs)" if steps else "none"),
        ("interventions", str(len(interventions))),
    ]
    verdict = _verdict(findings, last_step, findings_step)
    stale = ""
    if findings_step is not None and last_step is not None and findings_step < last_step:
        stale = f"Findings are from step {findings_step}; the run logged up to step {last_step}."
    series = Series(
        history=hist,
        units=run.units,
        layers=run.layers,
        families={str(s.get("name")): str(s.get("family", "")) for s in run.site_info},
        heatmap_sites=heatmaps,
        heatmaps_omitted=omitted,
        marks=line_steps,
        metrics=_metrics_table(run),
        named_units=named,
    )
    model = run.meta.get("model")
    config = run.meta.get("config") or {}
    env, configuration = _environment(run)
    data = {
        "relu_doctor_report": 1,
        "model": model,
        "steps": steps,
        "last_step": last_step,
        "findings_step": findings_step,
        "verdict": verdict.status,
        "sites": [{"site": r.site, "family": r.family, **r.raw} for r in sites],
        "findings": [
            {"severity": f.severity, "kind": f.kind, "site": f.site, "message": f.message,
             "units_named": f.units_named}
            for f in findings
        ],
        "interventions": len(interventions),
        "metrics": sorted(str(n) for n in pd.unique(series.metrics["name"])),
    }
    return ReportContext(
        title=f"relu_doctor report: {model or 'model'}",
        model=str(model or ""),
        run_path=str(run.path) if run.path is not None else "",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        steps=steps,
        last_step=last_step,
        log_every=config.get("log_every_n_steps"),
        tau=config.get("tau"),
        max_open=MAX_OPEN_FINDINGS,
        verdict=verdict,
        key_numbers=key_numbers,
        findings=findings,
        findings_step=findings_step,
        findings_stale=stale,
        sites=sites,
        anchors=anchors,
        vocabulary=list(VOCABULARY),
        interventions=interventions,
        remedy_counts=sorted(remedy_counts.items()),
        timeline=_timeline(interventions),
        environment=env,
        configuration=configuration,
        series=series,
        data=_json_safe(data),
        evaluation=_evaluation(run),
    )
