"""The HTML report: one self-contained file made from a run record.

Computation, storage and presentation stay apart: :func:`report_context` turns a
:class:`~relu_doctor.history.Run` into plain data (verdict, findings with evidence, per-site
table, interventions, environment), :mod:`relu_doctor.reports.plots` draws the figures, and a
Jinja2 template with autoescaping lays them out. The file needs nothing but itself: figures
are embedded PNG data URIs, styles are inline, there is no script and no external URL (a
Content-Security-Policy forbids both), and every string that comes from the user's model or
paths is escaped by the template engine.

Example:
    >>> import torch, torch.nn as nn, relu_doctor
    >>> from relu_doctor.reports.html import Report
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     net(torch.randn(16, 4)).sum().backward()
    ...     _ = doc.step()
    >>> html = Report(doc.to_run()).html()
    >>> html.startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import numpy as np
import pandas as pd

from relu_doctor.history import Run, _atomic_write_bytes, load_run

__all__ = ["Report", "render_report", "report_context", "write_report"]

#: Most per-unit heatmaps drawn; sites with findings and the most dead units come first.
MAX_HEATMAPS = 12
#: Findings shown before the rest are folded away.
MAX_OPEN_FINDINGS = 12
_SEVERITY_RANK = {"critical": 2, "warning": 1, "info": 0}
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
_UNIT_LISTS = ("dead_units", "dormant_units", "saturated_units", "units")
_UNIT_LIST_LIMIT = 64  # diagnosis lists at most this many unit indices


# ---------------------------------------------------------------------- formatting


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_pct(v: Any) -> str:
    """``0.125`` -> ``'12.5%'``; missing or NaN -> ``'—'``."""
    f = _finite(v)
    return "—" if f is None else f"{f:.1%}"


def fmt_num(v: Any) -> str:
    """Three significant digits; integers as integers; missing or NaN -> ``'—'``."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = _finite(v)
    if f is None:
        return "—"
    if f == int(f) and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.3g}"


def fmt_int(v: Any) -> str:
    f = _finite(v)
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
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if v is None or isinstance(v, (int, str)):
        return v
    return str(v)


# ---------------------------------------------------------------------- context


def _finding_dict(f: Mapping[str, Any]) -> dict[str, Any]:
    ev = dict(f.get("evidence") or {})
    unit_key = next((k for k in _UNIT_LISTS if isinstance(ev.get(k), list) and ev[k]), None)
    units_named = [int(x) for x in ev[unit_key]] if unit_key else []
    evidence = [
        (k.replace("_", " "), _fmt_value(k, v))
        for k, v in ev.items()
        if k != unit_key and k not in ("family", "leaky")
    ]
    kind = str(f.get("kind", ""))
    return {
        "kind": kind,
        "kind_label": _KIND_LABELS.get(kind, kind.replace("_", " ")),
        "site": str(f.get("site", "")),
        "severity": str(f.get("severity", "info")),
        "message": str(f.get("message", "")),
        "remedy": str(f.get("remedy", "")),
        "step": f.get("step"),
        "began": f.get("began"),
        "unit_label": (unit_key or "").replace("_", " "),
        "units_named": units_named,
        "units_text": _fmt_value(unit_key, units_named) if unit_key else "",
        "evidence": evidence,
    }


def _last_findings(run: Run) -> tuple[list[dict[str, Any]], int | None]:
    rows = [e for e in run.events if e.get("type") == "finding" and "step" in e]
    if not rows:
        return [], None
    last = max(int(e["step"]) for e in rows)
    found = [_finding_dict(e) for e in rows if int(e["step"]) == last]
    found.sort(key=lambda f: (-_SEVERITY_RANK.get(f["severity"], 0), f["kind"], f["site"]))
    return found, last


def _site_rows(run: Run, last: pd.DataFrame, findings: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    worst: dict[str, str] = {}
    for f in findings:
        cur = worst.get(f["site"])
        if cur is None or _SEVERITY_RANK.get(f["severity"], 0) > _SEVERITY_RANK.get(cur, 0):
            worst[f["site"]] = f["severity"]
    by_name = {str(r["site"]): r for r in last.to_dict("records")} if not last.empty else {}
    described = {str(s.get("name")): s for s in run.sites}
    names = list(described)
    for n in by_name:  # a site in the history but not (yet) in meta.json
        if n not in described:
            names.append(n)
    rows = []
    for name in names:
        meta = described.get(name, {})
        h = by_name.get(name, {})
        family = h.get("family") or meta.get("family") or ""
        leaky = bool(h.get("leaky", meta.get("leaky", False)))
        raw = {
            k: h.get(k)
            for k in ("units", "dead", "dead_fraction", "lifetime_dead", "dormant",
                      "dormant_fraction", "sparsity", "grad_rms", "grad_zero_fraction",
                      "saturated_fraction", "nonfinite")
        }
        if raw["units"] is None:
            raw["units"] = meta.get("units")
        rows.append(
            {
                "site": name,
                "family": str(family),
                "leaky": leaky,
                "unit_rule": str(meta.get("unit_rule") or ""),
                "unit_dim": meta.get("unit_dim"),
                "logged": bool(h),
                "severity": worst.get(name, ""),
                "units": fmt_int(raw["units"]),
                "dead": fmt_int(raw["dead"]),
                "dead_pct": fmt_pct(raw["dead_fraction"]),
                "lifetime_dead": fmt_int(raw["lifetime_dead"]),
                "dormant": fmt_int(raw["dormant"]),
                "sparsity": fmt_pct(raw["sparsity"]),
                "grad_rms": fmt_num(raw["grad_rms"]),
                "grad_zero": fmt_pct(raw["grad_zero_fraction"]),
                "raw": _json_safe(raw),
            }
        )
    return rows


def _verdict(
    findings: Sequence[Mapping[str, Any]], last_step: int | None, findings_step: int | None
) -> dict[str, Any]:
    if last_step is None:
        return {
            "status": "empty",
            "headline": "Nothing logged yet",
            "detail": "The run stopped before its first logging interval closed, so there are "
            "no statistics to report. Log more often (log_every_n_steps) or train longer.",
            "top": [],
        }
    serious = [f for f in findings if f["severity"] in ("critical", "warning")]
    notes = len(findings) - len(serious)
    step = findings_step if findings_step is not None else last_step
    if not serious:
        detail = f"No dead, dormant or saturated units and no gradient problem at step {step}."
        if notes:
            detail = f"Nothing serious at step {step}; {notes} minor note{'s' * (notes != 1)} below."
        return {"status": "healthy", "headline": "Healthy", "detail": detail, "top": []}
    n_crit = sum(f["severity"] == "critical" for f in serious)
    status = "critical" if n_crit else "warning"
    parts = []
    if n_crit:
        parts.append(f"{n_crit} critical")
    if len(serious) - n_crit:
        parts.append(f"{len(serious) - n_crit} warning{'s' * (len(serious) - n_crit != 1)}")
    return {
        "status": status,
        "headline": f"{len(serious)} problem{'s' * (len(serious) != 1)} found "
        f"({', '.join(parts)})",
        "detail": f"At step {step}. The most severe:",
        "top": serious[:3],
    }


#: Metrics an intervention's before/after snapshots may carry, with their labels.
_CHANGE_KEYS: tuple[tuple[str, str], ...] = (
    ("dead_fraction", "dead"),
    ("lifetime_dead_fraction", "lifetime dead"),
    ("dormant_fraction", "dormant"),
    ("sparsity", "sparsity"),
    ("activation_rate", "activation rate"),
    ("mean_abs", "mean |h|"),
    ("grad_rms", "gradient RMS"),
    ("grad_norm", "parameter-gradient norm"),
)


def _intervention_dict(ev: Mapping[str, Any]) -> dict[str, Any]:
    remedy = next(
        (str(ev[k]) for k in ("remedy", "action", "kind", "name") if ev.get(k) not in (None, "")),
        "intervention",
    )
    what = next(
        (str(ev[k]) for k in ("what", "message", "detail", "description")
         if isinstance(ev.get(k), str) and ev[k]),
        "",
    )
    b_raw, a_raw = ev.get("before"), ev.get("after")
    before: Mapping[str, Any] = b_raw if isinstance(b_raw, Mapping) else {}
    after: Mapping[str, Any] = a_raw if isinstance(a_raw, Mapping) else {}
    changes = []
    for key, label in _CHANGE_KEYS:
        if key in before or key in after:
            b = fmt_pct(before.get(key)) if "fraction" in key else fmt_num(before.get(key))
            a = fmt_pct(after.get(key)) if "fraction" in key else fmt_num(after.get(key))
            changes.append((label, b, a if after else "not yet measured"))
    site = ev.get("site")
    sites = ev.get("sites")
    if site in (None, "") and isinstance(sites, list):
        site = ", ".join(str(s) for s in sites)
    return {
        "step": ev.get("step", "?"),
        "after_step": ev.get("after_step"),
        "site": "" if site is None else str(site),
        "remedy": remedy,
        "what": what,
        "changes": changes,
    }


#: Remedies that act on every step (clipping): one timeline row each, not drawn over the
#: time chart.
CONTINUOUS_REMEDIES = frozenset({"adaptive_grad_clip", "autoclip", "agc"})


def _timeline(interventions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Timeline rows: every discrete intervention, plus one row per (continuous remedy,
    site) summarising its repeated events (first step, last step, count, last message)."""
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for e in interventions:
        if e["remedy"] not in CONTINUOUS_REMEDIES:
            rows.append({**e, "count": 1, "last_step": e["step"]})
            continue
        key = (e["remedy"], e["site"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {**e, "count": 0}
            rows.append(g)
        g["count"] += 1
        g["last_step"] = e["step"]
        g["what"] = e["what"]
    for g in rows:
        if g["count"] > 1:
            g["changes"] = []
            g["what"] = f"acted at {g['count']} logging intervals, steps {g['step']}–{g['last_step']}; last: {g['what']}"
    return rows


def _environment(run: Run) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(versions, device and where the run lives; the monitoring configuration)."""
    meta = run.meta
    env: list[tuple[str, str]] = []
    for k, v in (meta.get("versions") or {}).items():
        env.append((str(k), str(v)))
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


def report_context(run: Run) -> dict[str, Any]:
    """Everything the report shows, as plain data (no figures): verdict, findings, per-site
    table, interventions, environment and a JSON-ready summary.

    Args:
        run: a run record (:func:`relu_doctor.load_run` or ``Doctor.to_run()``).
    """
    hist = run.history
    steps = sorted(int(s) for s in hist["step"].unique()) if not hist.empty else []
    last_step = steps[-1] if steps else None
    last = hist[hist["step"] == last_step] if last_step is not None else pd.DataFrame()
    findings, findings_step = _last_findings(run)
    sites = _site_rows(run, last, findings)
    interventions = [_intervention_dict(e) for e in run.interventions()]
    remedy_counts: dict[str, int] = {}
    for e in interventions:
        remedy_counts[e["remedy"]] = remedy_counts.get(e["remedy"], 0) + 1
    timeline = _timeline(interventions)
    total_units = sum(int(r["raw"]["units"] or 0) for r in sites)
    total_dead = sum(int(r["raw"]["dead"] or 0) for r in sites)
    life_dead = sum(int(r["raw"]["lifetime_dead"] or 0) for r in sites)
    dormant = sum(int(r["raw"]["dormant"] or 0) for r in sites)
    config = run.meta.get("config") or {}
    key_numbers = [
        ("sites", str(len(sites))),
        ("units", str(total_units)),
        ("dead now", f"{total_dead} ({fmt_pct(total_dead / total_units) if total_units else '—'})"),
        ("never active", str(life_dead)),
        ("dormant", str(dormant)),
        ("steps logged", f"{steps[0]}–{steps[-1]} ({len(steps)} logs)" if steps else "none"),
        ("interventions", str(len(interventions))),
    ]
    data = {
        "relu_doctor_report": 1,
        "model": run.meta.get("model"),
        "steps": steps,
        "last_step": last_step,
        "findings_step": findings_step,
        "verdict": None,
        "sites": [{"site": r["site"], "family": r["family"], **r["raw"]} for r in sites],
        "findings": [
            {k: f[k] for k in ("severity", "kind", "site", "message", "units_named")}
            for f in findings
        ],
        "interventions": len(interventions),
    }
    verdict = _verdict(findings, last_step, findings_step)
    data["verdict"] = verdict["status"]
    if findings_step is not None and last_step is not None and findings_step < last_step:
        stale = f"Findings are from step {findings_step}; the run logged up to step {last_step}."
    else:
        stale = ""
    return {
        "title": f"relu_doctor report: {run.meta.get('model') or 'model'}",
        "model": str(run.meta.get("model") or ""),
        "run_path": str(run.path) if run.path is not None else "",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "steps": steps,
        "last_step": last_step,
        "log_every": config.get("log_every_n_steps"),
        "tau": config.get("tau"),
        "max_open": MAX_OPEN_FINDINGS,
        "verdict": verdict,
        "key_numbers": key_numbers,
        "findings": findings,
        "findings_step": findings_step,
        "findings_stale": stale,
        "sites": sites,
        "interventions": interventions,
        "remedy_counts": sorted(remedy_counts.items()),
        "timeline": timeline,
        "environment": _environment(run)[0],
        "configuration": _environment(run)[1],
        "data": _json_safe(data),
    }


# ---------------------------------------------------------------------- figures


def _heatmap_sites(run: Run, findings: Sequence[Mapping[str, Any]]) -> tuple[list[str], int]:
    if run.units.empty:
        return [], 0
    names = [str(s.get("name")) for s in run.sites]
    for s in pd.unique(run.units["site"].astype(str)):
        if s not in names:
            names.append(s)
    present = set(run.units["site"].astype(str))
    names = [n for n in names if n in present]
    if len(names) <= MAX_HEATMAPS:
        return names, 0
    sev: dict[str, int] = {}
    for f in findings:
        sev[f["site"]] = max(sev.get(f["site"], 0), 1 + _SEVERITY_RANK.get(f["severity"], 0))
    peak = run.history.groupby(run.history["site"].astype(str))["dead_fraction"].max()
    ranked = sorted(
        names,
        key=lambda n: (-sev.get(n, 0), -float(np.nan_to_num(peak.get(n, 0.0))), names.index(n)),
    )
    keep = set(ranked[:MAX_HEATMAPS])
    return [n for n in names if n in keep], len(names) - MAX_HEATMAPS


def _figures(run: Run, ctx: Mapping[str, Any]) -> dict[str, Any]:
    from relu_doctor.reports import plots

    out: dict[str, Any] = {"dead": None, "dead_omitted": [], "heatmaps": [], "heatmaps_omitted": 0,
                           "gradients": None}
    if run.history.empty:
        return out
    events = [e for e in run.interventions()
              if str(e.get("remedy", e.get("action", ""))) not in CONTINUOUS_REMEDIES]
    fig = plots.dead_fraction_figure(run.history, events)
    if fig is not None:
        out["dead"] = plots.figure_to_data_uri(fig)
        out["dead_omitted"] = plots.pick_sites(run.history)[1]
    families = {str(s.get("name")): str(s.get("family", "")) for s in run.sites}
    names, omitted = _heatmap_sites(run, ctx["findings"])
    for name in names:
        data = plots.activity_matrix(run.units, name)
        if data is None:
            continue
        caption = f"{data.units} units"
        if data.units_per_row > 1:
            caption += f", ranked by mean activation rate, {data.units_per_row} units per row"
        if data.steps_per_col > 1:
            caption += f", {data.steps_per_col} logging steps per column"
        out["heatmaps"].append(
            {
                "site": name,
                "uri": plots.figure_to_data_uri(
                    plots.activity_heatmap_figure(data, name, families.get(name, ""))
                ),
                "caption": caption,
                "dead_last": data.dead_last,
            }
        )
    out["heatmaps_omitted"] = omitted
    fig = plots.gradient_flow_figure(run.history, run.layers)
    if fig is not None:
        out["gradients"] = plots.figure_to_data_uri(fig)
    return out


# ---------------------------------------------------------------------- rendering


@cache
def _environment_jinja() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("relu_doctor.reports", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["breakable"] = _breakable
    return env


def _breakable(name: str) -> markupsafe.Markup:
    """Escape ``name``, then allow line breaks after its dots (long module paths)."""
    parts = re.split(r"(?<=\.)|(?=#)", str(name))
    return markupsafe.Markup("<wbr>").join(p for p in parts if p)


def render_report(run: Run, *, standalone: bool = True) -> str:
    """The report of ``run`` as HTML.

    Args:
        run: a run record.
        standalone: a whole document (True) or a fragment with scoped styles for
            embedding (notebooks).
    """
    ctx = report_context(run)
    figs = _figures(run, ctx)
    template = _environment_jinja().get_template("report.html")
    return template.render(**ctx, figures=figs, standalone=standalone)


def write_report(
    run_or_path: Run | str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None
) -> Path:
    """Write the report of a run (or of the run directory at a path) to ``out_path``.

    Args:
        run_or_path: a :class:`~relu_doctor.history.Run` or a run directory.
        out_path: the HTML file; default ``<run directory>/report.html``. Parent
            directories are created. Written atomically.

    Returns:
        The path written.

    Raises:
        RunDirError: the run directory is missing, empty, foreign or of another format.
        ValueError: no ``out_path`` for a run built in memory.
    """
    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    if out_path is None:
        if run.path is None:
            raise ValueError("out_path: required for a run record built in memory (no path).")
        out_path = run.path / "report.html"
    out = Path(out_path)
    _atomic_write_bytes(out, render_report(run).encode("utf-8"))
    return out


class Report:
    """A run's report: shows inline in Jupyter, saves as a self-contained HTML file.

    Args:
        run: a run record, or the path of a run directory.

    Example:
        >>> Report("runs/exp1")            # doctest: +SKIP  (a notebook cell shows it)
        >>> Report("runs/exp1").save("exp1.html")   # doctest: +SKIP
    """

    def __init__(self, run: Run | str | os.PathLike[str]) -> None:
        self.run = run if isinstance(run, Run) else load_run(run)
        self._html: str | None = None
        self._fragment: str | None = None

    def html(self) -> str:
        """The whole standalone document."""
        if self._html is None:
            self._html = render_report(self.run)
        return self._html

    def _repr_html_(self) -> str:
        if self._fragment is None:
            self._fragment = render_report(self.run, standalone=False)
        return self._fragment

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the standalone document (default ``<run directory>/report.html``)."""
        if path is None:
            if self.run.path is None:
                raise ValueError("path: required for a run record built in memory (no path).")
            path = self.run.path / "report.html"
        out = Path(path)
        _atomic_write_bytes(out, self.html().encode("utf-8"))
        return out

    def summary(self) -> str:
        """A short plain-text summary for a terminal."""
        from relu_doctor.reports.text import summary

        return summary(self.run)

    def __repr__(self) -> str:
        where = self.run.path if self.run.path is not None else "in memory"
        return f"Report({str(where)!r}, steps={self.run.last_step})"
