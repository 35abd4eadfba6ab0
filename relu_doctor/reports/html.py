"""The HTML report: one self-contained file laid out from the report context.

:func:`relu_doctor.reports.context.build_context` turns a run record into plain data;
:mod:`relu_doctor.reports.plots` draws the figures from the context's tables; a Jinja2
template with autoescaping lays them out. The file needs nothing but itself: figures are
embedded PNG data URIs, styles are inline, there is no script and no external URL (a
Content-Security-Policy forbids both), and every string that comes from the user's model or
paths is escaped by the template engine.

Example:
    >>> import torch, torch.nn as nn, relu_doctor
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     net(torch.randn(16, 4)).sum().backward()
    ...     _ = doc.step()
    >>> render_report(doc.to_run()).startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from relu_doctor._validate import path_or_none
from relu_doctor.errors import ReluDoctorError
from relu_doctor.history import Run, atomic_write_bytes
from relu_doctor.reports.context import (
    MAX_PHASES,
    FrozenChange,
    ReportContext,
    as_run,
    build_context,
)

__all__ = ["render_context", "render_report", "write_report"]


# ---------------------------------------------------------------------- figures


def _figures(ctx: ReportContext, progress: Callable[[str], object] | None = None
             ) -> dict[str, Any]:
    from relu_doctor.reports import plots

    series = ctx.series
    total = 2 if series.history.empty else 4 + len(series.heatmap_sites)  # (none: 2 drawn)
    drawn = itertools.count(1)

    def step() -> None:  # (a report of many sites draws for tens of seconds: a trial)
        if progress is not None:
            progress(f"drawing figure {next(drawn)} of {total}")

    out: dict[str, Any] = {"dead": None, "dead_omitted": [], "heatmaps": [], "heatmaps_omitted": 0,
                           "gradients": None, "training": None, "updates": None,
                           "phases": ""}
    phases = ([(c.step, c.label) for c in series.phases]
              if len(series.phases) <= MAX_PHASES else [])  # (more: a rule flapping, said)
    out["phases"] = _phases_caption(series.phases)
    step()
    fig = plots.training_curve_figure(series.metrics, series.marks, phases)
    if fig is not None:
        out["training"] = plots.figure_to_data_uri(fig)
    step()
    fig = plots.update_ratio_figure(series.layers, series.marks, phases)  # (an optimizer's)
    if fig is not None:
        out["updates"] = plots.figure_to_data_uri(fig)
    if series.history.empty:
        return out
    step()
    fig = plots.dead_fraction_figure(series.history, series.marks, phases=phases)
    if fig is not None:
        out["dead"] = plots.figure_to_data_uri(fig)
        out["dead_omitted"] = plots.pick_sites(series.history)[1]
    for name in series.heatmap_sites:
        step()
        data = plots.activity_matrix(series.units, name, named=series.named_units.get(name, ()))
        if data is None:
            continue
        caption = f"{data.units} units"
        if data.units_per_row > 1:
            caption += (", the units the findings name one row each, the others ranked by "
                        f"mean activation rate, up to {data.units_per_row} units per row")
        shown = len(series.heatmap_steps)
        if 0 < shown < len(ctx.judged_steps):
            caption += (f", {shown} of the {len(ctx.judged_steps)} logging steps with data "
                        "(evenly spread from "
                        "the first to the last; the run's unit table is read at those only)")
        if data.steps_per_col > 1:
            caption += f", {data.steps_per_col} logging steps per column"
        only = series.site_marks.get(name, [])
        if plots.heatmap_mark_columns(data.steps, series.marks, only):
            caption += ("; a dashed line follows the window an intervention was made at"
                        if data.steps_per_col == 1 else
                        "; a dashed line comes before the column of windows an intervention "
                        "was made in (after it, where made at its last)")
            caption += (" (this site's and the model-wide ones), numbered as in the "
                        "interventions table")
        out["heatmaps"].append(
            {
                "site": name,
                "anchor": ctx.anchors.get(name, ""),
                "uri": plots.figure_to_data_uri(
                    plots.activity_heatmap_figure(data, name, series.families.get(name, ""),
                                                  series.marks, only)
                ),
                "caption": caption,
                "dead_last": data.dead_last,
            }
        )
    out["heatmaps_omitted"] = series.heatmaps_omitted
    step()
    fig = plots.gradient_flow_figure(series.history, series.layers)
    if fig is not None:
        out["gradients"] = plots.figure_to_data_uri(fig)
    return out


def _phases_caption(changes: list[FrozenChange]) -> str:
    """The figures' words for the changes of what is frozen (empty where none)."""
    if not changes:
        return ""
    if len(changes) > MAX_PHASES:
        return (f"The sites fed by a frozen part changed at {len(changes)} logs, not drawn "
                f"(the first {changes[0].text}).")
    return ("Dotted blue lines: a frozen part began training, or a training one was frozen, in "
            "the window after the line (" + "; ".join(c.text for c in changes) + ").")


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


def render_context(ctx: ReportContext, *, standalone: bool = True,
                   progress: Callable[[str], object] | None = None) -> str:
    """A report context laid out as HTML.

    Args:
        ctx: the report as plain data (:func:`~relu_doctor.reports.context.build_context`).
        standalone: a whole document (True) or a fragment with scoped styles for
            embedding (notebooks).
        progress: called with a line saying what is being drawn ("drawing figure 3 of
            16"), before each figure; None: nothing said.
    """
    values = {f.name: getattr(ctx, f.name) for f in fields(ctx)}
    template = _environment_jinja().get_template("report.html")
    return template.render(**values, figures=_figures(ctx, progress), standalone=standalone)


def render_report(run: Run, *, standalone: bool = True) -> str:
    """The report of ``run`` as HTML (see :func:`render_context`)."""
    return render_context(build_context(run), standalone=standalone)


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
        ReluDoctorError: ``run_or_path`` is neither a run record nor a path (a model, say),
            or ``out_path`` is neither a path nor None.
        ValueError: no ``out_path`` for a run built in memory.
    """
    path_or_none("out_path", out_path)  # before the run directory is read
    run = as_run(run_or_path, "run_or_path")
    out = report_path(run, out_path, "out_path")
    atomic_write_bytes(out, render_report(run).encode("utf-8"))
    return out


def report_path(run: Run, out: str | os.PathLike[str] | None, name: str) -> Path:
    """Where the report of ``run`` goes: ``out`` (``out/report.html`` when it is a
    directory, or ends in a slash), or ``<run directory>/report.html``.

    Raises:
        ValueError: no ``out`` for a run built in memory.
        ReluDoctorError: ``out`` is inside the run directory and is not an HTML file at its
            top level (the report would overwrite the run's own records, ``-o
            RUN/meta.json``, or sit among a table's parts, ``-o RUN/metrics``), inside
            another run's directory, or an existing file that is not a relu_doctor report.
    """
    if out is None:
        if run.path is None:
            raise ValueError(f"{name}: required for a run record built in memory (no path).")
        return run.path / "report.html"
    path = Path(out)
    if path.is_dir() or str(out).endswith((os.sep, "/")):  # ("new/": a directory to make)
        path = path / "report.html"
    root = run.path.resolve() if run.path is not None else None
    target = path.resolve()
    written = path.parent.resolve() / path.name  # (a link there is replaced, not followed)
    other = next((a for a in written.parents if a != root and _is_run_dir(a)
                  and (root is None or not root.is_relative_to(a))), None)
    if other is not None:
        raise ReluDoctorError(
            f"{name}: {str(path)!r} is inside {str(other)!r}, another run's directory: the "
            "report would overwrite or sit among that run's records. Pass a path outside it.")
    if root is not None and target.is_relative_to(root):
        if target.parent != root:
            raise ReluDoctorError(
                f"{name}: {str(path)!r} is in a folder ({str(target.parent.relative_to(root))!r}) "
                "of the run directory the report is made from, where the run keeps its records "
                "(its tables, an evaluation stream's run). Pass a path ending in .html at the "
                "run directory's top level, or outside it."
            )
        if path.suffix.lower() not in (".html", ".htm"):
            raise ReluDoctorError(
                f"{name}: {str(path)!r} is inside the run directory the report is made from "
                "and is not an .html file: the report would overwrite that run's own records. "
                "Pass a path ending in .html."
            )
    if written.is_file() and not written.is_symlink() and written.stat().st_size and not _is_report(written):
        raise ReluDoctorError(
            f"{name}: {str(path)!r} exists and is not a relu_doctor report: it is not "
            "overwritten. Pass another path, or remove that file first.")
    return path


def _is_report(path: Path) -> bool:
    """Whether the file at ``path`` is a report this package wrote (its generator tag near
    the top), which a new report may replace."""
    try:
        with open(path, "rb") as f:
            return b'<meta name="generator" content="relu_doctor">' in f.read(8192)
    except OSError:
        return False


def _is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a run directory's ``meta.json``: its format version is its
    first key (another tool's ``meta.json`` is not one; only its start is read)."""
    try:
        with open(folder / "meta.json", "rb") as f:
            return re.match(rb'\s*\{\s*"format_version"\s*:', f.read(64)) is not None
    except OSError:
        return False
