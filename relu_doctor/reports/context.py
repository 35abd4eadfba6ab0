"""The report as plain data: everything a report shows, built once from a run record.

:func:`build_context` reads a :class:`~relu_doctor.history.Run` (never a model, a hook or a
device tensor) and returns a :class:`ReportContext`: the verdict, the key numbers, the
findings of the last logged step (``run.findings()``, exact, never rebuilt from events), one
row per site, the interventions (``run.interventions()``), the tables the figures are drawn
from, and the environment. :mod:`~relu_doctor.reports.html`, :mod:`~relu_doctor.reports.text`
and :mod:`~relu_doctor.reports.plots` read it; none of them reads the run itself again.

The parts live beside it: :mod:`~relu_doctor.reports.findings` (findings merged, remedies
that follow what was done), :mod:`~relu_doctor.reports.interventions` (each judged on its
own target) and :mod:`~relu_doctor.reports.formatting` (one cell for one number, in the HTML
and the terminal alike).

Example:
    >>> import pandas as pd
    >>> from relu_doctor.history import Run
    >>> ctx = build_context(Run(meta={"model": "Net"}, history=pd.DataFrame(),
    ...                         units=pd.DataFrame(), layers=pd.DataFrame()))
    >>> ctx.verdict.status, ctx.verdict.headline
    ('empty', 'Nothing logged')
"""

from __future__ import annotations

import itertools
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from relu_doctor.advice import REMEDY_NAMES, can_swap
from relu_doctor.diagnosis import fed_frozen, finding_order, severity_rank
from relu_doctor.history import SEEN_FIELDS, WINDOW_COLUMNS, Run, load_run
from relu_doctor.reports.findings import (
    MODEL_WIDE,
    VOCABULARY,
    FindingView,
    done_lines,
    finding_view,
    merge,
    recommend,
)
from relu_doctor.reports.formatting import (
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_value,
    json_safe,
)
from relu_doctor.reports.gaps import Gaps, read_gaps
from relu_doctor.reports.interventions import (
    CONTINUOUS_REMEDIES,
    LOSS_ROSE,
    InterventionView,
    intervention_view,
    timeline,
)

__all__ = [
    "CONTINUOUS_REMEDIES",
    "HEATMAP_ROWS",
    "MAX_HEATMAPS",
    "MAX_OPEN_FINDINGS",
    "MAX_PHASES",
    "VOCABULARY",
    "EvalView",
    "FindingView",
    "FrozenChange",
    "Gaps",
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
    "frozen_changes",
]

#: Most per-unit heatmaps drawn; sites with findings and the most dead units come first.
MAX_HEATMAPS = 12
#: Findings shown before the rest are folded away.
MAX_OPEN_FINDINGS = 12
#: Most unit rows the heatmaps read: the logged steps they show are spread evenly over the
#: run, fewer of them for wide layers (at least the first and the last), so a report of a
#: long run or a very wide layer reads a bounded part of the unit table.
HEATMAP_ROWS = 2_000_000
# Site metrics of the per-site table, as logged in the run's history.
_SITE_METRICS = (
    "units", "units_seen", "dead", "dead_fraction", "lifetime_dead", "dormant",
    "dormant_fraction", "sparsity", "grad_rms", "grad_zero_fraction", "saturated_fraction", "nonfinite",
)
# ---------------------------------------------------------------------- input


def as_run(value: object, name: str = "run") -> Run:
    """``value`` as a run record: a :class:`~relu_doctor.history.Run` as it is, a path (str
    or os.PathLike) loaded with :func:`~relu_doctor.history.load_run`; anything else (a
    model, a Doctor) is a clear error naming ``name``."""
    import os

    from relu_doctor.errors import ReluDoctorError

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


def _treat_findings(
    findings: list[FindingView],
    sites: Sequence[SiteRow],
    interventions: Sequence[InterventionView],
    anchors: Mapping[str, str],
    loop: object = "watch",
    declined: Mapping[str, Mapping[str, str]] | None = None,
) -> list[FindingView]:
    """Findings merged, linked to their site's figure, with the remedy adjusted to what was
    already done (families from meta.json, interventions from the events) or declined there
    (``declined``: ``{site: {remedy: why}}``) and named as the run's loop names it
    (``loop``: its ``DiagnosisConfig.loop``, from meta.json)."""
    names = REMEDY_NAMES.get(str(loop), REMEDY_NAMES["watch"])
    leaky = {r.site: r.leaky for r in sites}
    swappable = {r.site: r.swappable for r in sites}
    out = []
    for f in merge(findings):
        done = [e for e in interventions if e.site == f.site
                or (e.site == MODEL_WIDE and f.site != MODEL_WIDE)]
        if f.site == MODEL_WIDE:
            done = [e for e in interventions if e.site == MODEL_WIDE]
        anchor = anchors.get(f.site, "rd-gradients" if f.site == MODEL_WIDE else "rd-sites")
        out.append(replace(f, anchor=anchor, done=done_lines(done),
                           remedy=recommend(f, leaky.get(f.site, False), done, names,
                                            swappable.get(f.site),
                                            (declined or {}).get(f.site, {}))))
    return out


@dataclass(frozen=True)
class SiteRow:
    """One row of the per-site table at the last logged step: formatted cells, and the
    numbers behind them in ``raw`` (None where not measured)."""

    site: str
    family: str
    leaky: bool
    swappable: bool  # a plain ReLU, which the LeakyReLU swap can treat (advice.can_swap)
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
    #: the frozen layer feeding it at the step shown (the history's ``frozen``), else ""
    frozen: str = ""


def _site_rows(run: Run, last: pd.DataFrame, findings: Sequence[FindingView]) -> list[SiteRow]:
    worst: dict[str, str] = {}
    for f in findings:
        cur = worst.get(f.site)
        if cur is None or severity_rank(f.severity) > severity_rank(cur):
            worst[f.site] = f.severity
    by_name = {str(r["site"]): r for r in last.to_dict("records")} if not last.empty else {}
    described = {str(s.get("name")): s for s in run.site_info}
    names = list(described) + [n for n in by_name if n not in described]  # not yet in meta
    rows = []
    for i, name in enumerate(names):
        meta = described.get(name, {})
        h = by_name.get(name, {})
        raw = {k: h.get(k) for k in _SITE_METRICS}
        if raw["units"] is None:
            raw["units"] = meta.get("units")
        unit_dim = meta.get("unit_dim")
        family = str(h.get("family") or meta.get("family") or "")
        leaky = bool(h.get("leaky", meta.get("leaky", False)))
        cap = next((float(c) for c in (h.get("cap"), meta.get("cap"))
                    if isinstance(c, int | float) and math.isfinite(c)), None)  # NaN: Parquet's None
        # not run in the window shown (a branch not taken): no unit was judged, none is
        # "0 dead"
        unseen = bool(h) and h.get("units_seen") == 0
        rows.append(
            SiteRow(
                site=name,
                family=family,
                leaky=leaky,
                swappable=can_swap(family, leaky, cap, next(
                    (o for o in (meta.get("op"), h.get("op")) if isinstance(o, str)), None)),
                unit_rule=str(meta.get("unit_rule") or ""),
                unit_dim=int(unit_dim) if isinstance(unit_dim, int) else None,
                logged=bool(h),
                severity=worst.get(name, ""),
                units=fmt_int(raw["units"]),
                dead="not seen" if unseen else fmt_int(raw["dead"]),
                dead_pct=fmt_pct(raw["dead_fraction"]),
                lifetime_dead=fmt_int(raw["lifetime_dead"]),
                dormant="not seen" if unseen else fmt_int(raw["dormant"]),
                sparsity=fmt_pct(raw["sparsity"]),
                grad_rms=fmt_num(raw["grad_rms"]),
                grad_zero=fmt_pct(raw["grad_zero_fraction"]),
                raw=json_safe(raw),
                anchor=f"rd-site-{i}",
                frozen=str(h["frozen"]) if isinstance(h.get("frozen"), str) else "",
            )
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    """The first thing the report says: ``status`` is ``empty``, ``healthy``, ``warning``,
    ``critical`` or ``damaged`` (the per-site history cannot be read: there is nothing to
    judge the sites on); ``top`` holds the (up to three) most severe findings."""

    status: str
    headline: str
    detail: str
    top: list[FindingView] = field(default_factory=list)


def _verdict(
    findings: Sequence[FindingView], last_step: int | None, step: int | None,
    logged_step: int | None = None, stream: str = "train", history_lost: str = "",
    writing: bool = False, all_frozen: bool = False,
) -> Verdict:
    if last_step is None and history_lost:  # activations seen, their record unreadable
        serious = [f for f in findings if f.severity in ("critical", "warning")]
        upto = f" up to step {logged_step}" if logged_step is not None else ""
        recorded = (f" The findings below are those the run recorded at step {step}."
                    if findings and step is not None else "")
        return Verdict(
            "damaged",
            "History unreadable",
            f"The run logged{upto}, but its per-site history is lost: {history_lost}. "
            "The sites table, the unit counts and the charts drawn from it are missing; this "
            f"says nothing about whether the units were active.{recorded}",
            list(serious[:3]),
        )
    if last_step is None and logged_step is not None:  # windows logged, no site seen
        why = {
            "eval": "no evaluation pass (model.eval() or torch.no_grad()) was recorded",
            "train": "no training pass (the model in train() mode, gradients enabled) was "
            "recorded. Was the model left in eval mode? If it trains, call model.train() "
            "before training; if it never trains (a frozen teacher, a target network run "
            "under torch.no_grad()), watch it with stream='eval' (or 'all')",
        }.get(stream, "no forward pass of the model was recorded")
        return Verdict(
            "empty",
            "No activation seen",
            f"Windows were logged up to step {logged_step}, but no pass of the watched stream "
            f"ran an activation in them: {why}.",
        )
    if last_step is None:
        if writing:
            return Verdict(
                "empty",
                "Nothing logged yet",
                "Its first logging interval has not closed yet, so there are no statistics "
                "to report.",
            )
        return Verdict(
            "empty",
            "Nothing logged",
            "The run stopped before its first logging interval closed, so there are no "
            "statistics to report. Log more often (log_every_n_steps) or train longer.",
        )
    serious = [f for f in findings if f.severity in ("critical", "warning")]
    notes = len(findings) - len(serious)
    if not serious:
        detail = f"No dead, dormant or saturated units and no gradient problem at step {step}."
        if notes:
            detail = f"Nothing serious at step {step}; {notes} minor note{'s' * (notes != 1)} below."
        if all_frozen:  # ("Healthy" beside "dead now 48.7%" read oddly: a distillation trial)
            return Verdict("healthy", "Frozen: nothing here trains", (
                f"Every site is fed by layers that do not train (step {step}): its dead and "
                "dormant units cannot change while it stays frozen, and no remedy acts on "
                "them; they are noted below as information, not problems."))
        return Verdict("healthy", "Healthy", detail)
    n_crit = sum(f.severity == "critical" for f in serious)
    n_warn = len(serious) - n_crit
    parts = [f"{n_crit} critical"] if n_crit else []
    if n_warn:
        parts.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
    return Verdict(
        "critical" if n_crit else "warning",
        f"{len(serious)} problem{'s' * (len(serious) != 1)} found ({', '.join(parts)})",
        f"At step {step}"
        + (f", with {notes} minor note{'s' * (notes != 1)} besides" if notes else "")
        + ". The most severe:",
        list(serious[:3]),
    )


@dataclass(frozen=True)
class Series:
    """The tables the figures are drawn from (host-side pandas frames of the run) and the
    choices made about them.

    Attributes:
        history: one row per (step, site).
        units: the unit rows the heatmaps draw: one row per (step, site, unit) of the
            ``heatmap_sites`` at the ``heatmap_steps`` (only those are read from a run
            directory).
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
    #: the logged steps the heatmaps show (all of them up to the heatmap's width and
    #: :data:`HEATMAP_ROWS`; beyond, spread evenly from the first to the last)
    heatmap_steps: list[int] = field(default_factory=list)
    #: per drawn site, the steps of ``marks`` its heatmap draws: its own interventions and
    #: the model-wide ones
    site_marks: dict[str, list[int]] = field(default_factory=dict)
    #: where a frozen part began training, or a training one was frozen (a fine-tuning
    #: run's unfreezing): :func:`frozen_changes`, drawn dotted over the time charts
    phases: list[FrozenChange] = field(default_factory=list)


#: at most this many changes of what is frozen are drawn (more: a flapping rule, not phases)
MAX_PHASES = 4


@dataclass(frozen=True)
class FrozenChange:
    """A change of which sites are fed by a frozen part, between two logs.

    Attributes:
        step: the earlier log's step (the window the change was made in begins there: a
            part unfrozen at an epoch's start, at a log, is drawn where it was made).
        seen: the later log's step, the first whose window saw the change.
        unfrozen: sites frozen at ``step``'s log that trained in ``seen``'s window.
        frozen: sites that trained at ``step``'s log and were frozen in ``seen``'s window.
    """

    step: int
    seen: int
    unfrozen: int
    frozen: int

    @property
    def label(self) -> str:
        """The figure's short label: "unfrozen", "frozen" or "unfrozen/frozen"."""
        return "/".join(w for w, n in (("unfrozen", self.unfrozen), ("frozen", self.frozen)) if n)

    @property
    def text(self) -> str:
        """The caption's words, e.g. "step 40: 12 sites began training"."""
        said = [f"{n} site{'s' if n != 1 else ''} {what}" for n, what in
                ((self.unfrozen, "began training"), (self.frozen, "froze")) if n]
        return f"after step {self.step}: {' and '.join(said)}"


def frozen_changes(history: pd.DataFrame, steps: Sequence[int]) -> list[FrozenChange]:
    """Where the set of sites fed by a frozen layer changed between consecutive ``steps``
    (the logs whose windows saw anything), over the sites logged at both; a site marked
    only as getting no gradient is not counted (a task head some windows skip would flap).

    Example:
        >>> h = pd.DataFrame({"step": [10, 10, 20, 20, 30, 30], "site": list("ababab"),
        ...                   "frozen": ["fc", "fc", "fc", "fc", None, "fc"]})
        >>> [(c.step, c.seen, c.unfrozen, c.frozen) for c in frozen_changes(h, [10, 20, 30])]
        [(20, 30, 1, 0)]
    """
    if history.empty or "frozen" not in history or len(steps) < 2:
        return []
    keep = history[history["step"].isin(steps)]
    fz = keep["frozen"].map(fed_frozen)
    by_step = {int(step): dict(zip(part["site"].astype(str), fz[part.index], strict=True))
               for step, part in keep.groupby("step")}
    out: list[FrozenChange] = []
    order = [s for s in steps if s in by_step]
    for before, after in itertools.pairwise(order):
        a, b = by_step[before], by_step[after]
        both = a.keys() & b.keys()
        unfrozen = sum(1 for s in both if a[s] and not b[s])
        frozen = sum(1 for s in both if b[s] and not a[s])
        if unfrozen or frozen:
            out.append(FrozenChange(before, after, unfrozen, frozen))
    return out


def _heatmap_sites(run: Run, findings: Sequence[FindingView]) -> tuple[list[str], int]:
    present = run.unit_sites()
    if not present:
        return [], 0
    names = [str(s.get("name")) for s in run.site_info]
    names += [s for s in present if s not in names]
    names = [n for n in names if n in set(present)]
    if len(names) <= MAX_HEATMAPS:
        return names, 0
    sev: dict[str, int] = {}
    for f in findings:
        sev[f.site] = max(sev.get(f.site, 0), 1 + severity_rank(f.severity))
    hist = run.history  # (empty, with no columns, where it could not be read)
    peak = (hist.groupby(hist["site"].astype(str))["dead_fraction"].max()
            if {"site", "dead_fraction"} <= set(hist.columns) else pd.Series(dtype=float))
    ranked = sorted(
        names,
        key=lambda n: (-sev.get(n, 0), -float(np.nan_to_num(peak.get(n, 0.0))), names.index(n)),
    )
    keep = set(ranked[:MAX_HEATMAPS])
    return [n for n in names if n in keep], len(names) - MAX_HEATMAPS


def _heatmap_steps(steps: Sequence[int], sites: Sequence[str], rows: Sequence[SiteRow]) -> list[int]:
    """The logged steps the heatmaps show: every one up to the heatmap's width
    (``plots.MAX_COLS``) and :data:`HEATMAP_ROWS` unit rows; beyond, that many spread evenly
    from the first step to the last (at least those two)."""
    from relu_doctor.reports.plots import MAX_COLS

    if not sites or not steps:
        return []
    width = {r.site: int(r.raw["units"] or 0) for r in rows}
    units = max(1, sum(width.get(n, 0) for n in sites))
    k = min(len(steps), MAX_COLS, max(2, HEATMAP_ROWS // units))
    if k >= len(steps):
        return list(steps)
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, k)).astype(int))
    return [int(steps[i]) for i in picks]


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
        (str(k).replace("_", " "), v if isinstance(v, str) else fmt_value(str(k), v))
        for k, v in (meta.get("config") or {}).items()
    ]
    unmasked = meta.get("unmasked_sites")
    if isinstance(unmasked, list) and unmasked:  # (named in meta.json and a warning only:
        # a sequence trial's report named the mask, and not the sites it missed)
        config.append(("padding counted at", f"{len(unmasked)} site"
                       f"{'s' * (len(unmasked) != 1)} the mask does not fit: "
                       + ", ".join(map(str, unmasked))))
    return env, config


_LR_REMEDIES = frozenset({"lr_rescue"})


def _learning_rates(interventions: Sequence[InterventionView], metrics: pd.DataFrame) -> None:
    """A learning-rate change's own before -> after: the ``lr`` the run recorded at its step
    (read before the change) and at the next logging step."""
    lr = metrics[metrics["name"] == "lr"] if not metrics.empty else metrics
    if lr.empty:
        return
    by_step = {int(r.step): float(r.value) for r in lr.itertuples()}
    steps = sorted(by_step)
    for e in interventions:
        if e.remedy not in _LR_REMEDIES or e.step not in by_step:
            continue
        later = [t for t in steps if t > e.step]
        after = fmt_num(by_step[later[0]]) if later else "not yet measured"
        # after the judged target (first, in bold), before the other numbers
        e.changes.insert(1 if e.target and e.changes else 0,
                         ("learning rate", fmt_num(by_step[e.step]), after))


#: the names a training loss goes by, the likeliest first (see _losses)
_TRAINING_LOSS = ("loss", "train_loss", "train/loss", "train_loss_step", "training_loss",
                  "train_loss_epoch")


def _losses(interventions: Sequence[InterventionView], metrics: pd.DataFrame) -> None:
    """A judged intervention's training loss, its own window's and the one it was judged
    on, where it rose :data:`LOSS_ROSE` times or more: shown beside its verdict. Where the
    remedy's loss guard judged it (a surgery's rise of 2x, ``LOSS_HARM``: its result's
    ``loss_rose``), the guard's ratio is kept, the logged curve's values shown beside it
    (the loss the guard read may be an integration's own measure, not this metric)."""
    if metrics.empty:
        return
    # the training loss by the names loops give it: doc.step's, the HF Trainer's and Keras'
    # "loss", a LightningModule's "train_loss" (on_step and on_epoch: "train_loss_step");
    # no guess among other names ending in "loss" (a VAE's "kl_loss", an "eval_loss")
    names = set(pd.unique(metrics["name"]))
    name = next((n for n in _TRAINING_LOSS if n in names), None)
    if name is None:
        return
    loss = metrics[metrics["name"] == name]
    by_step = {int(r.step): float(r.value) for r in loss.itertuples()}
    for e in interventions:
        if not e.verdict or e.after_step is None:
            continue
        before, after = by_step.get(e.step), by_step.get(e.after_step)
        if e.loss_guarded:  # (judged on its own loss: the logged curve's values beside it,
            # named as logged, since the loss the guard read may differ: a review)
            if before is not None and after is not None:
                e.changes.append((f"logged {name}", fmt_num(before), fmt_num(after)))
            continue
        if before is None or after is None or not before > 0 or not math.isfinite(after):
            continue
        if after >= LOSS_ROSE * before:
            e.loss_rose = after / before
            e.changes.append(("training loss", fmt_num(before), fmt_num(after)))


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
    #: the step the sites table and key numbers are of: the last whose window saw something
    #: (``last_step`` where every logged window did)
    shown_step: int | None
    #: the logged steps whose windows saw something (those the report can draw)
    judged_steps: list[int]
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
    #: what did not reach the run directory or could not be read back
    gaps: Gaps = field(default_factory=Gaps)


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
    #: its findings at its last log that are warnings or critical, ``(severity, site,
    #: message)``, most severe first (the training findings above are the training data's)
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    path: str = ""
    #: the shell command that makes its own report (its path quoted where it must be)
    command: str = ""


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
    # (most severe first, as the training findings: a run read from its events alone lists
    # them as they began)
    serious = [(f.severity, f.site, f.message) for f in sorted(
        ev.findings(), key=lambda f: finding_order(f.severity, f.kind, f.site, f.evidence))
        if f.severity in ("warning", "critical")]
    path = str(run.path / name)
    return EvalView(name, steps, steps[-1] if steps else None, passes, _site_rows(ev, last, []),
                    findings=serious, path=path, command=f"relu-doctor report {shlex.quote(path)}")


def _logged_text(steps: Sequence[int], windows: pd.DataFrame | None, lost: bool = False) -> str:
    """The key number "steps logged": every log, those with no site seen too (``lost``:
    the history that would say which saw a site cannot be read)."""
    logged = sorted(set(steps) | ({int(x) for x in windows["step"]} if windows is not None
                                  else set()))
    if not logged:
        return "none"
    why = (", history unreadable" if lost else ", no site seen") if not steps else ""
    if len(logged) == 1:
        return f"step {logged[0]} (1 log{why})"
    return f"{logged[0]}–{logged[-1]} ({len(logged)} logs{why})"


def _windows(run: Run, hist: pd.DataFrame) -> pd.DataFrame | None:
    """A row per log (:data:`WINDOW_COLUMNS`): the run's ``windows`` table, and for the
    logs it lacks (written before it existed, the run resumed since) the history's counts,
    judged where a site saw something; None for a run that records neither."""
    table = run.tables.get("windows")
    if not isinstance(table, pd.DataFrame) or not set(WINDOW_COLUMNS) <= set(table):
        table = pd.DataFrame(columns=list(WINDOW_COLUMNS))
    parts = [table[list(WINDOW_COLUMNS)]] if not table.empty else []
    if not hist.empty and {"steps_collected", "steps_run"} <= set(hist):
        older = hist[~hist["step"].isin(table["step"])]
        if not older.empty:
            per_step = older.groupby("step")
            rows = per_step[["steps_collected", "steps_run"]].first().fillna(0)
            seen_cols = [c for c in SEEN_FIELDS if c in older]
            rows["judged"] = (per_step[seen_cols].sum().sum(axis=1) > 0 if seen_cols
                              else True)
            parts.append(rows.reset_index()[list(WINDOW_COLUMNS)])
    if not parts:
        return None
    return pd.concat(parts, ignore_index=True).sort_values("step", kind="stable")


def _own_cost(run: Run) -> str | None:
    """relu_doctor's own cost, by its overhead budget's estimate at the last log that has
    one (the ``windows`` table's ``overhead``: the estimate is refined as the run goes, its
    first logs not yet timing a log), with the budget and at how many logs the estimate was
    over it; None where no log has one (a fixed rate, a run written before it)."""
    table = run.tables.get("windows")
    if not isinstance(table, pd.DataFrame) or "overhead" not in table:
        return None
    values = pd.to_numeric(table.sort_values("step", kind="stable")["overhead"],
                           errors="coerce").dropna()
    if values.empty:
        return None
    cost = float(values.iloc[-1])
    budget = (run.meta.get("config") or {}).get("overhead_budget")
    if not isinstance(budget, int | float) or isinstance(budget, bool):
        return f"{fmt_pct(cost)} of a step (its estimate)"
    over = int((values > budget).sum())
    said = (f"; over it at {over} of {len(values)} logs" if over else "")
    return f"{fmt_pct(cost)} of a step (its estimate; budget {fmt_pct(budget)}{said})"


def _sampling(
    windows: pd.DataFrame | None, steps: Sequence[int]
) -> tuple[int, int, list[int]] | None:
    """(steps collected, steps run, the logged steps with sites whose window saw anything)
    over the logged windows (:func:`_windows`); None for a run that does not record them."""
    if windows is None:
        return None
    ok = {int(s) for s, j in zip(windows["step"], windows["judged"], strict=True) if j}
    return (int(windows["steps_collected"].sum()), int(windows["steps_run"].sum()),
            [s for s in steps if s in ok])


def build_context(run: Run) -> ReportContext:
    """The report of ``run`` as plain data.

    Args:
        run: a run record (:func:`relu_doctor.load_run` or ``Doctor.to_run()``).
    """
    hist = run.history
    steps = sorted(int(s) for s in hist["step"].unique()) if not hist.empty else []
    last_step = steps[-1] if steps else None
    windows = _windows(run, hist)
    sampling = _sampling(windows, steps)
    judged = (sampling[2] or steps) if sampling is not None else steps  # (drawn, tabled)
    shown_step = judged[-1] if judged else None
    last = hist[hist["step"] == shown_step] if shown_step is not None else pd.DataFrame()
    findings = [finding_view(f) for f in run.findings()]
    findings.sort(key=lambda f: f.order)
    findings_step = max((f.step for f in findings), default=last_step)
    if run.findings_step is not None and last_step is not None:  # brought up to the last log
        findings_step = last_step if findings_step is None else max(findings_step, last_step)
    # (findings rebuilt from events.jsonl hold the evidence of the log each began or last
    # changed at: said on each, not shown as the later step's)
    findings = [replace(f, as_of=f.step) if findings_step is not None and f.step < findings_step
                else f for f in findings]
    sites = _site_rows(run, last, findings)
    interventions = [intervention_view(e) for e in run.interventions()]
    metrics = _metrics_table(run)
    _learning_rates(interventions, metrics)
    _losses(interventions, metrics)
    line_steps = sorted({e.step for e in interventions if not e.continuous})
    numbers = {step: i + 1 for i, step in enumerate(line_steps)}
    for e in interventions:
        e.number = numbers.get(e.step, 0) if not e.continuous else 0
    heatmaps, omitted = _heatmap_sites(run, findings)
    anchors = {r.site: (f"rd-fig-{r.anchor[len('rd-site-'):]}" if r.site in heatmaps else r.anchor)
               for r in sites}
    loop = (run.meta.get("config") or {}).get("loop", "watch")
    findings = _treat_findings(findings, sites, interventions, anchors, loop, run.declined())
    named: dict[str, list[int]] = {}
    for f in findings:
        if f.site in heatmaps:
            named.setdefault(f.site, [])
            named[f.site] += [u for u in f.units_named if u not in named[f.site]]
    remedy_counts: dict[str, int] = {}
    for e in interventions:
        remedy_counts[e.remedy] = remedy_counts.get(e.remedy, 0) + 1

    # the sites that train, as a remedy's model-wide before/after (diagnosis.trained_rows;
    # not the logged health, a time series of every site): a frozen teacher's units were
    # counted as a student's (a distillation trial)
    counted = [r for r in sites if not r.frozen] or sites
    aside = [r for r in sites if r.frozen] if len(counted) < len(sites) else []

    def total(key: str, rows: Sequence[SiteRow] = counted) -> int:
        # (a site not seen in the window shown counts 0)
        return sum(int(v) for r in rows if isinstance(v := r.raw.get(key), int | float)
                   and math.isfinite(v))

    units, dead = total("units"), total("dead")
    stuck = sum(int(v) for r in counted if r.leaky  # (a leaky site's dead units fire negative)
                and isinstance(v := r.raw.get("dead"), int | float) and math.isfinite(v))
    # dead and dormant are of the units seen in the window shown (a run whose weights went
    # NaN sees none: "not seen", not "0 dead")
    seen = (total("units_seen") if any(r.raw["units_seen"] is not None for r in counted)
            else units)  # (a run written before units_seen was)
    lost = bool(run.history_lost) and last_step is None  # no count to sum: unknown, not 0
    now = "—" if lost else "not seen" if units and not seen else None
    dropped = run.meta.get("records_dropped")  # (a Doctor without run_dir= saved: to_run)
    dropped = dropped if isinstance(dropped, int) and dropped > 0 else 0
    key_numbers = [
        ("sites", str(len(sites))),
        ("units", str(units) + (
            f" that train (and {total('units', aside)} at {len(aside)} "
            f"site{'s' if len(aside) != 1 else ''} fed by a frozen part: not counted here)"
            if aside else "")),
        ("dead now", now or f"{dead} ({fmt_pct(dead / seen) if seen else '—'})"
         + (f" of {seen} seen" if seen < units else "")
         + (f", {stuck} of them stuck negative at leaky sites (they still pass a small "
            "gradient)" if stuck else "")),
        ("never active", "—" if lost else str(total("lifetime_dead")) + (
            f" since step {since} (the run was continued there without the Doctor's state: "
            "its counts began again)" if isinstance(since := run.meta.get("lifetime_since"), int)
            else "")),
        ("dormant", now or str(total("dormant"))),
        ("steps logged", _logged_text(steps, windows, lost) + (
            f"; the {dropped} before were not kept: a Doctor that writes no run directory "
            "keeps only its latest keep_records logs" if dropped else "")),
        *([("steps collected", f"{sampling[0]} of {sampling[1]} run "
            f"({fmt_pct(sampling[0] / sampling[1])})"
            + (" in the logs written" if run.unwritten else " in the logs kept" if dropped
               else ""))]
          if sampling and sampling[1] else []),
        *([("own cost", own)] if (own := _own_cost(run)) else []),
        # (a clipper's reports of its windows are one row, as the table shows them)
        ("interventions", str(len(timeline(interventions)))),
    ]
    logged_step = int(windows["step"].max()) if windows is not None else None
    verdict = _verdict(
        findings, last_step, findings_step, logged_step, str(run.meta.get("stream", "train")),
        run.history_lost, run.writer_writing, all_frozen=bool(sites) and not aside
        and all(r.frozen for r in sites),
    )
    stale = ""
    if findings_step is not None and last_step is not None and findings_step < last_step:
        stale = f"Findings are from step {findings_step}; the run logged up to step {last_step}."
    elif findings_step is not None and last_step is not None and findings_step > last_step:
        stale = (f"Findings are from step {findings_step}, the last the run logged; the sites "
                 f"table and key numbers are from step {last_step}, the last its history "
                 "holds readable.")
    if shown_step is not None and last_step is not None and shown_step < last_step:
        stale += (
            f"{' ' if stale else ''}The windows after step {shown_step} saw nothing (none of "
            "their steps collected, under the overhead budget's sampling, or no pass of the "
            f"watched stream ran): the sites table and key numbers are those of step "
            f"{shown_step}."
        )
    heatmap_steps = _heatmap_steps(judged, heatmaps, sites)
    series = Series(
        history=hist,
        units=run.read_units(steps=heatmap_steps, sites=heatmaps) if heatmaps else pd.DataFrame(),
        layers=run.layers,
        families={str(s.get("name")): str(s.get("family", "")) for s in run.site_info},
        heatmap_sites=heatmaps,
        heatmaps_omitted=omitted,
        marks=line_steps,
        metrics=metrics,
        named_units=named,
        heatmap_steps=heatmap_steps,
        site_marks={site: sorted({e.step for e in interventions if not e.continuous
                                  and e.site in (site, MODEL_WIDE)}) for site in heatmaps},
        phases=frozen_changes(hist, judged),
    )
    model = run.meta.get("model")
    config = run.meta.get("config") or {}
    env, configuration = _environment(run)
    evaluation = _evaluation(run)
    gaps = read_gaps(run)  # after every read: a damaged part found on the way is in it
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
        # the key number's count (the timeline's rows: a clipper's run of windows is one),
        # and the events the rows hold
        "interventions": len(timeline(interventions)),
        "intervention_events": len(interventions),
        "metrics": sorted(str(n) for n in pd.unique(series.metrics["name"])),
        "frozen_changes": [{"step": c.step, "seen": c.seen, "unfrozen": c.unfrozen,
                            "frozen": c.frozen} for c in series.phases],
        "unwritten": [list(r) for r in gaps.unwritten],
        "skipped": len(gaps.skipped),
    }
    return ReportContext(
        title=f"relu_doctor report: {model or 'model'}",
        model=str(model or ""),
        run_path=str(run.path) if run.path is not None else "",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        steps=steps,
        last_step=last_step,
        shown_step=shown_step,
        judged_steps=list(judged),
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
        timeline=timeline(interventions),
        environment=env,
        configuration=configuration,
        series=series,
        data=json_safe(data),
        evaluation=evaluation,
        gaps=gaps,
    )
