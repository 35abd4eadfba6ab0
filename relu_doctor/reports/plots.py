"""Figures of a run (seaborn on matplotlib), as PNG data URIs for the HTML report.

Presentation only: every function takes host-side tables of the report context
(:class:`relu_doctor.reports.context.Series`: ``history``, ``units``, ``layers``) and returns a
``matplotlib.figure.Figure`` (or None when there is nothing to draw). Figures are built
without ``pyplot``, so nothing here touches global matplotlib state or needs a display, and
the report can be made on a headless machine or inside a notebook without side effects.

Names that come from the user's model (site and layer names) are escaped for matplotlib's
mathtext (a ``$`` would otherwise start a formula) and shortened in the middle when long; the
PNG holds only pixels, so nothing in a figure can run in a browser.

Example:
    >>> import pandas as pd
    >>> h = pd.DataFrame({"step": [10, 20], "site": ["fc.1", "fc.1"], "order": [0, 0],
    ...                   "dead_fraction": [0.0, 0.5], "sparsity": [0.4, 0.7]})
    >>> fig = dead_fraction_figure(h)
    >>> figure_to_data_uri(fig).startswith("data:image/png;base64,")
    True
"""

from __future__ import annotations

import base64
import bisect
import io
import math
import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

__all__ = [
    "HeatmapData",
    "activity_heatmap_figure",
    "activity_matrix",
    "dead_fraction_figure",
    "figure_to_data_uri",
    "gradient_flow_figure",
    "heatmap_mark_columns",
    "mpl_label",
    "pick_sites",
    "training_curve_figure",
    "update_ratio_figure",
]

#: Most sites drawn as separate lines in one chart; the rest are named in the caption.
MAX_LINES = 12
#: Rows of a heatmap before units are aggregated into bins of similar activity.
MAX_ROWS = 64
#: Columns (logging steps) of a heatmap before steps are aggregated into bins.
MAX_COLS = 60
_DPI = 110
#: Figure width in inches: at _DPI a figure is drawn at about its natural size in a
#: page 800 px wide, so its text stays legible there.
_WIDTH = 7.4


def _rc() -> Any:  # matplotlib's stubs type rc keys as literals
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.8))
    rc.update({"figure.facecolor": "white", "savefig.facecolor": "white"})
    return rc


def mpl_label(name: str, width: int = 36) -> str:
    """A user-controlled name made safe for matplotlib text: ``$`` escaped (no mathtext),
    newlines flattened, and shortened in the middle beyond ``width`` characters.

    >>> mpl_label("a$b")
    'a\\\\$b'
    >>> mpl_label("encoder.layers.10.mlp.act", width=12)
    'encode…p.act'
    """
    s = " ".join(str(name).split()) or "(root)"
    if len(s) > width:
        keep = width - 1
        s = s[: keep // 2 + keep % 2] + "…" + s[len(s) - keep // 2 :]
    return s.replace("$", r"\$")


def _abbreviated(name: str, width: int) -> str:
    """``name``'s dotted words shortened to their initials from the left (a snake_case
    word's, one a part: ``down_blocks`` -> ``db``), the last kept whole and indices kept,
    until it fits ``width`` (``encoder.stages.0.layers.1.act``: ``e.s.0.layers.1.act``): a
    path's indices tell its sites apart, and a middle cut lost them.

    >>> _abbreviated("encoder.stages.0.layers.1.activation", 24)
    'e.s.0.l.1.activation'
    >>> _abbreviated("stage_at_full_resolution.0.act1", 12), _abbreviated("stage_at_half_resolution.0.act1", 12)
    ('safr.0.act1', 'sahr.0.act1')
    """
    words = name.split(".")
    for i in range(len(words) - 1):
        if len(".".join(words)) <= width:
            break
        if not words[i].isdigit() and len(words[i]) > 1 and words[i] != "…":
            lead = "…" if words[i].startswith("…") else ""
            parts = [p for p in re.split(r"[_\-]+", words[i].removeprefix("…")) if p]
            words[i] = lead + "".join(p[0] for p in parts) if parts else words[i]
    return ".".join(words)


def _labels(names: Iterable[str], width: int = 36) -> dict[str, str]:
    """Unique matplotlib-safe labels for names: the dotted prefix they all share left out
    (as ``…``: Hugging Face paths share a long one, and shortening in the middle kept it and
    cut what differs), then shortened in the middle; where two still read alike, their
    ends; then numbered.

    >>> list(_labels(["resnet.encoder.stages.0.layers.0.act", "resnet.encoder.stages.1.layers.0.act"], 24).values())
    ['…0.layers.0.act', '…1.layers.0.act']
    """
    names = [str(n) for n in names]
    split = [n.split(".") for n in names]
    common = 0
    if len(names) > 1:
        while all(len(p) > common + 1 for p in split) and len({p[common] for p in split}) == 1:
            common += 1
    out: dict[str, str] = {}
    used: set[str] = set()
    for n, parts in zip(names, split, strict=True):
        rest = "…" + ".".join(parts[common:]) if common else n
        label = mpl_label(_abbreviated(rest, width), width)
        if label in used and len(rest) > width:
            label = mpl_label("…" + rest[len(rest) - width + 1:], width)
        k = 2
        base = label
        while label in used:
            label = f"{base} ({k})"
            k += 1
        used.add(label)
        out[n] = label
    return out


def figure_to_data_uri(fig: Figure, dpi: int = _DPI) -> str:
    """Render ``fig`` to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    with matplotlib.rc_context(_rc()):
        fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _site_order(history: pd.DataFrame) -> list[str]:
    if "order" in history:
        firsts = history.groupby("site", sort=False)["order"].min()
        return [str(s) for s in firsts.sort_values(kind="stable").index]
    return [str(s) for s in pd.unique(history["site"])]


def pick_sites(
    history: pd.DataFrame, metric: str = "dead_fraction", limit: int = MAX_LINES
) -> tuple[list[str], list[str]]:
    """The ``limit`` sites with the largest peak ``metric`` (ties: depth order), then the
    rest; both in depth order."""
    order = _site_order(history)
    if len(order) <= limit:
        return order, []
    peak = history.groupby("site")[metric].max().fillna(-1.0)
    rank = sorted(order, key=lambda s: (-float(peak.get(s, -1.0)), order.index(s)))
    keep = set(rank[:limit])
    return [s for s in order if s in keep], [s for s in order if s not in keep]


def _dashed(ax: Any, x: float, text: str | None, *, color: str, fontsize: float,
            **line: Any) -> None:
    """One intervention line at ``x`` (data coordinates), ``text`` (its numbers) above the
    axes."""
    ax.axvline(x, color=color, linestyle="--", linewidth=1, **line)
    if text is not None:
        ax.annotate(text, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=fontsize,
                    fontweight="bold", color="0.2")


def _draw_marks(ax: Any, marks: Sequence[int], *, label: bool = True) -> None:
    """Interventions as dashed vertical lines, numbered 1, 2, ... at the top (the numbers of
    the report's interventions table)."""
    for i, step in enumerate(marks, start=1):
        _dashed(ax, float(step), str(i) if label else None, color="0.3", fontsize=8, zorder=1)


#: A training metric whose largest value is this many times its smallest (all above 0) is
#: drawn on a log scale.
WIDE_RANGE = 100.0


def _draw_phases(ax: Any, phases: Sequence[tuple[int, str]]) -> None:
    """Changes of what is frozen (a part unfrozen) as dotted vertical lines, each labelled at
    the foot of the axes (the interventions' numbers are at the top)."""
    for step, label in phases:
        ax.axvline(float(step), color="tab:blue", linestyle=":", linewidth=1.3, zorder=1)
        ax.annotate(label, xy=(float(step), 0.0), xycoords=("data", "axes fraction"),
                    xytext=(3, 3), textcoords="offset points", rotation=90, ha="left",
                    va="bottom", fontsize=7, color="tab:blue",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})


def training_curve_figure(metrics: pd.DataFrame, marks: Sequence[int] = (),
                          phases: Sequence[tuple[int, str]] = ()) -> Figure | None:
    """The training curve: one panel per training metric (``loss`` first, learning rates
    together on a log scale, as any metric above 0 spanning :data:`WIDE_RANGE` or more),
    against step, with the interventions numbered.

    Args:
        metrics: long format, columns ``step``, ``name``, ``value``.
        marks: steps of the interventions (dashed, numbered lines).
        phases: (step, label) of changes of what is frozen (dotted, labelled lines).

    Returns:
        The figure, or None when no metric was recorded.
    """
    if metrics.empty or not {"step", "name", "value"} <= set(metrics):
        return None
    m = metrics[np.isfinite(metrics["value"].astype(float))]
    names = [str(n) for n in pd.unique(m["name"])]
    lrs = [n for n in names if n == "lr" or n.startswith("lr/")]
    others = sorted((n for n in names if n not in lrs), key=lambda n: (n != "loss", n))
    panels: list[tuple[str, list[str]]] = [(n, [n]) for n in others[:5]]
    if lrs:
        panels.append(("learning rate", lrs))
    if not panels:
        return None
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(_WIDTH, 2.5 * rows + 0.2), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, (title, series) in zip(axes, panels, strict=False):
            for n in series:
                part = m[m["name"] == n].sort_values("step")
                ax.plot(part["step"], part["value"].astype(float), marker="o" if len(part) <= 40 else None,
                        markersize=3, linewidth=1.6, label=mpl_label(n, 20))
            values = m.loc[m["name"].isin(series), "value"].astype(float)
            if title == "learning rate":
                if (values > 0).all():
                    ax.set_yscale("log")  # not with a rate of 0 (a schedule's end): no point lost
                if len(series) > 1:
                    ax.legend(frameon=False, fontsize=7)
            elif (values > 0).all() and values.max() >= WIDE_RANGE * values.min():
                # (a loss from 4e6 to 8e3 drew flat at 0 after the first window: a trial's)
                ax.set_yscale("log")
            ax.set_title(mpl_label(title, 40), pad=16)
            ax.set_xlabel("step")
            ax.set_ylabel(mpl_label(title, 24))
            _draw_marks(ax, marks)
            _draw_phases(ax, phases)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    return fig


def dead_fraction_figure(
    history: pd.DataFrame,
    marks: Sequence[int] = (),
    *,
    max_lines: int = MAX_LINES,
    phases: Sequence[tuple[int, str]] = (),
) -> Figure | None:
    """Dead fraction (over each logging window), sparsity and the share of units ReDo calls
    dormant (score <= tau, dead ones included: what it recycles, and the dormant-neuron
    curve of Sokar et al.) per site, against step.

    Args:
        history: one row per (step, site) with ``dead_fraction``, and ``sparsity`` and
            ``below_tau_fraction`` where known.
        marks: steps drawn as dashed vertical lines (interventions).
        max_lines: most sites drawn; the sites with the highest peak dead fraction win.
        phases: (step, label) of changes of what is frozen (dotted, labelled lines).

    Returns:
        The figure, or None when ``history`` is empty. :func:`pick_sites` tells which sites
        were left out.
    """
    if history.empty or "dead_fraction" not in history:
        return None
    shown, _omitted = pick_sites(history, "dead_fraction", max_lines)
    labels = _labels(shown)
    df = history[history["site"].astype(str).isin(shown)].copy()
    df["site_label"] = df["site"].astype(str).map(labels)
    hue_order = [labels[s] for s in shown]
    n_steps = df["step"].nunique()
    metrics = [("dead_fraction", "dead (no activation in the window)")]
    if "sparsity" in df:
        metrics.append(("sparsity", "sparsity (outputs not active)"))
    if "below_tau_fraction" in df and df["below_tau_fraction"].notna().any():
        metrics.append(("below_tau_fraction", "ReDo-dormant (score ≤ tau)"))
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(_WIDTH * max(1.0, len(metrics) / 2.5), 3.9),
                     layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        palette = sns.color_palette("tab10" if len(shown) <= 10 else "husl", len(shown))
        for i, (ax, (col, title)) in enumerate(zip(axes, metrics, strict=True)):
            sns.lineplot(
                data=df, x="step", y=col, hue="site_label", hue_order=hue_order,
                palette=palette, marker="o" if n_steps <= 40 else None, markersize=4,
                linewidth=1.6, ax=ax, legend=(i == len(metrics) - 1),
            )
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(title, pad=16)
            ax.set_ylabel("fraction of outputs" if col == "sparsity" else "fraction of units")
            _draw_marks(ax, marks)
            _draw_phases(ax, phases)
        if len(shown) > 0 and axes[-1].get_legend() is not None:
            leg = axes[-1].get_legend()
            handles, texts = list(leg.legend_handles), [t.get_text() for t in leg.get_texts()]
            leg.remove()
            # as many columns as the figure's width holds at the longest label (at 8 pt,
            # about 0.075 in a character, with the line's handle): none cut at the edges
            longest = max(len(t) for t in texts)
            cols = max(1, min(len(shown), 4, int(fig.get_figwidth() / (0.075 * longest + 0.6))))
            fig.legend(handles, texts, loc="outside lower center", ncol=cols,
                       frameon=False, title="site", fontsize=8)
    return fig


@dataclass
class HeatmapData:
    """A site's (unit x step) activation-rate matrix, sorted and aggregated for drawing.

    Attributes:
        matrix: ``(rows, cols)`` activation rates; NaN where a unit was not seen.
        steps: the step labelling each column (the last step of a bin).
        row_labels: unit indices (one unit per row) or 1-based rank ranges (binned rows).
        units_per_row: how many units each row aggregates (1: not aggregated).
        steps_per_col: how many logging steps each column aggregates.
        units: number of units of the site.
        dead_last: units with activation rate 0 at the last logged step.
        named_rows: the rows that hold one named unit each, each labelled.
    """

    matrix: np.ndarray
    steps: list[int]
    row_labels: list[str]
    units_per_row: int
    steps_per_col: int
    units: int
    dead_last: int
    named_rows: tuple[int, ...] = ()


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without the 'mean of empty slice' warning (all-NaN stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out: np.ndarray = np.nanmean(a, axis=axis)
    return out


def _bin_mean(a: np.ndarray, limit: int, axis: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Average consecutive slices along ``axis`` in chunks of equal size (the last may be
    smaller) so that at most ``limit`` remain. Returns the means, the index groups and the
    chunk size."""
    n = a.shape[axis]
    per = math.ceil(n / limit)
    idx = [np.arange(i, min(i + per, n)) for i in range(0, n, per)]
    parts = [_nanmean(np.take(a, i, axis=axis), axis=axis) for i in idx]
    return np.stack(parts, axis=axis), idx, per


def activity_matrix(
    units: pd.DataFrame,
    site: str,
    *,
    max_rows: int = MAX_ROWS,
    max_cols: int = MAX_COLS,
    value: str = "activation_rate",
    named: Sequence[int] = (),
) -> HeatmapData | None:
    """The (unit x step) matrix of ``value`` for one site, ready to draw legibly.

    Units are sorted by their mean activation rate over the run (least active first, so dead
    units form one block at the top). Beyond ``max_rows`` units, the ``named`` units (those
    a finding lists) keep one row each, labelled with their index, and the other sorted
    units are averaged into the remaining rows; beyond ``max_cols`` logging steps,
    consecutive steps are averaged too. Nothing is ever drawn at less than one text line per
    row.
    """
    part = units[units["site"].astype(str) == str(site)]
    if part.empty or value not in part:
        return None
    wide = part.pivot_table(index="unit", columns="step", values=value, aggfunc="mean", dropna=False)
    wide = wide.sort_index(axis=1)
    m = wide.to_numpy(dtype=np.float64)
    steps = [int(s) for s in wide.columns]
    unit_ids = [int(u) for u in wide.index]
    last = m[:, -1]
    dead_last = int(np.sum(last == 0.0))
    mean = _nanmean(m, axis=1)
    mean = np.where(np.isnan(mean), -1.0, mean)  # never-seen units first
    order = np.lexsort((np.asarray(unit_ids), mean))
    m = m[order]
    ids = [unit_ids[i] for i in order]
    n = m.shape[0]
    keep: list[int] = []
    if n > max_rows:
        keep = [i for i, u in enumerate(ids) if u in set(named)][: max_rows // 2]
        rest = [i for i in range(n) if i not in set(keep)]
        binned, groups, per_row = _bin_mean(m[rest], max_rows - len(keep), axis=0)
        m = np.concatenate([m[keep], binned], axis=0) if keep else binned
        row_labels = [f"unit {ids[i]}" for i in keep] + [
            f"#{len(keep) + g[0] + 1}–{len(keep) + g[-1] + 1}" if len(g) > 1
            else f"unit {ids[rest[g[0]]]}" for g in groups
        ]
    else:
        row_labels = [str(u) for u in ids]
        per_row = 1
        # the named units (a finding's dead units): a label each, where every other row of
        # a tall site was labelled; wherever the order puts them (a unit that died in the
        # last window sorts among the living by its mean over the run)
        keep = [i for i, u in enumerate(ids) if u in set(named)]
    per_col = 1
    if m.shape[1] > max_cols:
        m, col_groups, per_col = _bin_mean(m, max_cols, axis=1)
        steps = [steps[g[-1]] for g in col_groups]
    named_rows = tuple(range(len(keep))) if per_row > 1 else tuple(keep)
    return HeatmapData(m, steps, row_labels, per_row, per_col, n, dead_last, named_rows)


def heatmap_mark_columns(
    steps: Sequence[int], marks: Sequence[int], only: Collection[int] | None = None
) -> list[tuple[int, int]]:
    """Where :func:`activity_heatmap_figure` draws each intervention: (its number in
    ``marks``, from 1; the column edge it is drawn at), the edge after the columns of the
    logging steps up to the intervention's step (its effect shows in the next window), for
    the marks within the steps shown (and in ``only``, where given: those at one site).
    (A column of several windows, ``steps`` its last: an intervention made within it is
    drawn before it.)

    Example:
        >>> heatmap_mark_columns([10, 20, 30], [5, 20, 25, 40])
        [(2, 2), (3, 2)]
    """
    out = []
    for i, step in enumerate(marks, start=1):
        if only is not None and step not in only:
            continue
        edge = bisect.bisect_right(steps, step)
        if 0 < edge < len(steps):
            out.append((i, edge))
    return out


def activity_heatmap_figure(
    data: HeatmapData, site: str, family: str = "", marks: Sequence[int] = (),
    only: Collection[int] | None = None,
) -> Figure:
    """Draw :func:`activity_matrix` output: rows are units (or bins of units ranked by
    activity), columns logging steps, colour the activation rate (0 = dead); ``marks``: the
    interventions' steps, drawn as numbered dashed lines between the columns before and after
    each (the numbers of the report's interventions table); ``only``: the steps of those to
    draw (this site's and the model-wide ones), where given."""
    rows, cols = data.matrix.shape
    # a row per named unit must stay a readable text line: such figures grow taller
    per_line, cap = (0.125, 9.5) if len(data.named_rows) > 16 else (0.085, 5.6)
    height = min(cap, max(2.2, 1.3 + per_line * rows))
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(_WIDTH * 0.75, height), layout="constrained")
        ax = fig.subplots()
        frame = pd.DataFrame(data.matrix, index=data.row_labels, columns=data.steps)
        sns.heatmap(
            frame, ax=ax, vmin=0.0, vmax=1.0, cmap="rocket",
            cbar_kws={"label": "activation rate", "shrink": 0.9},
            xticklabels=max(1, math.ceil(cols / 8)), yticklabels=max(1, math.ceil(rows / 40)),
        )
        if data.named_rows:  # every named unit labelled; the bins as space allows
            others = [i for i in range(rows) if i not in set(data.named_rows)]
            every = max(1, math.ceil(len(others) / 12))
            ticks = sorted({*data.named_rows, *others[::every]})
            ax.set_yticks([t + 0.5 for t in ticks])
            ax.set_yticklabels([data.row_labels[t] for t in ticks])
        ax.tick_params(axis="y", labelsize=6.5 if rows > 24 else 7, rotation=0)
        ax.tick_params(axis="x", labelsize=7, rotation=0)
        drawn: dict[int, list[str]] = {}
        for number, edge in heatmap_mark_columns(data.steps, marks, only):
            drawn.setdefault(edge, []).append(str(number))
        for edge, numbers in drawn.items():  # (several in one window: one line, all numbers)
            _dashed(ax, float(edge), ",".join(numbers), color="0.85", fontsize=7)
        ax.set_xlabel("step")
        if data.units_per_row > 1:
            ax.set_ylabel("units the findings name, then\nbins by activity rank (least first)")
        else:
            ax.set_ylabel("unit index (least active first)")
        fam = f" ({mpl_label(family, 16)})" if family else ""
        ax.set_title(  # the site on a line of its own: one line was wider than the figure
            f"{mpl_label(_abbreviated(site, 48), 48)}{fam}\n"
            f"{data.units} units, {data.dead_last} dead at last step",
            fontsize=9, pad=14 if drawn else 6,  # (above the interventions' numbers)
        )
    return fig


def gradient_flow_figure(
    history: pd.DataFrame, layers: pd.DataFrame | None = None, *, max_steps: int = 4
) -> Figure | None:
    """Gradient flow across depth: RMS of dL/d(activation output) by site in depth order,
    and (when recorded) the parameter-gradient norm by layer, for up to ``max_steps``
    logging steps spread over the run.

    Returns None when no gradient statistic was recorded.
    """
    if history.empty or "grad_rms" not in history:
        return None
    g = history[np.isfinite(history["grad_rms"].astype(float))]  # 0 kept: no gradient came
    has_layers = (
        layers is not None
        and not layers.empty
        and "grad_norm" in layers
        and bool(np.isfinite(layers["grad_norm"].astype(float)).any())
    )
    if g.empty and not has_layers:
        return None
    lay = (layers[np.isfinite(layers["grad_norm"].astype(float))]
           if has_layers and layers is not None else None)
    # The steps with a gradient recorded (a window that collected no step has none: a legend
    # entry without a line, and the last step with data left out, otherwise).
    held = set(g["step"].astype(int)) | (set(lay["step"].astype(int)) if lay is not None else set())
    all_steps = sorted(held)
    k = min(max_steps, len(all_steps))  # the first, the last, and evenly between
    pick = sorted({all_steps[round(i * (len(all_steps) - 1) / max(k - 1, 1))] for i in range(k)})
    panels = (0 if g.empty else 1) + (1 if has_layers else 0)
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(_WIDTH, 3.8), layout="constrained")
        axes = list(fig.subplots(1, panels, squeeze=False)[0])
        palette = dict(zip(pick, sns.color_palette("crest", len(pick)), strict=True))
        if not g.empty:
            _by_depth(axes.pop(0), g, "site", "grad_rms", _site_order(history), palette, "o",
                      "activation gradient by site", "RMS of dL/dh")
        if lay is not None and layers is not None:
            # the layers with a gradient norm at some log: a frozen one has none (a LoRA
            # trial's 21 frozen base layers of 49 left blank slots and crowded the labels)
            trained = set(lay["layer"].astype(str))
            names = [str(n) for n in pd.unique(layers["layer"]) if str(n) in trained]
            left = len(pd.unique(layers["layer"])) - len(names)
            lsteps = sorted(int(s) for s in lay["step"].unique())
            lpick = [s for s in pick if s in lsteps] or lsteps[-1:]
            lpal = dict(zip(lpick, sns.color_palette("flare", len(lpick)), strict=True))
            _by_depth(axes.pop(0), lay, "layer", "grad_norm", names, lpal, "s",
                      "parameter gradient by layer", "gradient norm",
                      # (their order is the model's, not the pass's: a Llama layer's norms
                      # come after its MLP there, an LLM trial)
                      xlabel="layers in the model's registration order" + (
                          f" ({left} with no gradient, frozen, left out)" if left else ""))
    return fig


#: The update ratio that rules of thumb call healthy (Karpathy's "about 1e-3"): drawn as a
#: guide on the update ratio figure, not judged.
UPDATE_RATIO_GUIDE = 1e-3


def update_ratio_figure(layers: pd.DataFrame | None, marks: Sequence[int] = (),
                        phases: Sequence[tuple[int, str]] = ()) -> Figure | None:
    """The per-layer update ratio (``||W_after - W_before|| / ||W_after||`` at one optimizer
    step of each window) against step, on a log scale: one line per layer that has a ratio
    at some log, coloured by its place in the model (registration order: light on the
    input side, dark on the output side), the rule of thumb's 1e-3 dashed, the
    interventions numbered, changes of what is frozen dotted (``phases``: (step, label)).

    Returns None when no update ratio was recorded (no optimizer watched, or every window's
    ratio unread).
    """
    if layers is None or layers.empty or not {"step", "layer", "update_ratio"} <= set(layers):
        return None
    u = layers[np.isfinite(layers["update_ratio"].astype(float))]
    if u.empty:
        return None
    # each layer's rows, grouped once (a set of every row's, made per layer, and a mask of
    # every row per layer took 15 s of a 120-layer report's 29: a report trial)
    parts = {str(k): g for k, g in u.groupby(u["layer"].astype(str), sort=False)}
    names = [str(n) for n in pd.unique(layers["layer"]) if str(n) in parts]
    left = len(pd.unique(layers["layer"])) - len(names)
    legend = len(names) <= MAX_LINES  # else the first and the last named, the colours said
    labels = _labels(names if legend else [names[0], names[-1]], 30)
    colors = dict(zip(names, sns.color_palette("crest", len(names)), strict=True))
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(_WIDTH, 3.6), layout="constrained")
        ax = fig.subplots()
        for i, name in enumerate(names):
            part = parts[name].sort_values("step")
            shown = legend or i in (0, len(names) - 1)
            ax.plot(part["step"], part["update_ratio"].astype(float),
                    marker="o" if len(part) <= 40 else None, markersize=3, linewidth=1.2,
                    color=colors[name], label=mpl_label(labels[name], 30) if shown else None)
        scale = _log_scale(ax, u["update_ratio"].astype(float), zero="no update")
        ax.axhline(UPDATE_RATIO_GUIDE, color="0.5", linestyle=":", linewidth=1)
        ax.annotate("1e-3", xy=(1.0, UPDATE_RATIO_GUIDE), xycoords=("axes fraction", "data"),
                    xytext=(2, 0), textcoords="offset points", va="center", fontsize=7,
                    color="0.4")
        _draw_marks(ax, marks)
        _draw_phases(ax, phases)
        ax.set_title("update ratio by layer", pad=16)
        ax.set_xlabel("step")
        ax.set_ylabel(f"||ΔW|| / ||W|| ({scale})")
        what = f"{len(names)} layers" + (f"\n({left} never updated, left out)" if left else "")
        if not legend:
            what += "\nlight: input side\ndark: output side"
        ax.legend(frameon=False, fontsize=7, title=what, title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.04, 1.0))
    return fig


def _by_depth(
    ax: Any, frame: pd.DataFrame, where: str, value: str, order: list[str],
    palette: dict[int, Any], marker: str, title: str, ylabel: str,
    xlabel: str = "input side → output side",
) -> None:
    """One line per step in ``palette``: ``value`` at each place of ``order`` (column ``where``)."""
    labels = _labels(order, 30)
    pos = {s: i for i, s in enumerate(order)}
    for step, color in palette.items():
        part = frame[frame["step"] == step].copy()
        if part.empty:  # nothing recorded at that step on this panel: no empty legend entry
            continue
        part["x"] = part[where].astype(str).map(pos)
        part = part.sort_values("x")
        ax.plot(part["x"], part[value].astype(float), marker=marker, markersize=4,
                color=color, label=f"step {step}")
    _depth_axis(ax, [labels[s] for s in order])
    ax.set_title(title)
    ax.set_ylabel(f"{ylabel} ({_log_scale(ax, frame[value].astype(float))})")
    ax.set_xlabel(xlabel)
    ax.legend(frameon=False, fontsize=7)


def _log_scale(ax: Any, values: pd.Series, zero: str = "no gradient") -> str:
    """A log axis, one rule for every run so that two reports compare at a glance; where a
    value is exactly 0 (``zero``: no gradient came there, or no update), linear from 0 to
    the smallest positive value and log above it, or linear when every value is 0. Returns
    the scale in words."""
    positive = values[values > 0]
    if len(positive) == len(values):
        ax.set_yscale("log")
        return "log scale"
    if len(positive):
        ax.set_yscale("symlog", linthresh=float(positive.min()))
        ax.set_ylim(bottom=0)
        return f"log scale; 0: {zero}"
    ax.set_ylim(-0.05, 1.0)
    return f"all 0: {zero}"


def _depth_axis(ax: Any, labels: list[str]) -> None:
    n = len(labels)
    every = max(1, math.ceil(n / 30))
    ticks = list(range(0, n, every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=45 if n > 4 else 0,
                       ha="right" if n > 4 else "center", fontsize=7)
    ax.set_xlim(-0.5, n - 0.5)
