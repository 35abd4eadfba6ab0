"""TensorBoard output: scalars, per-unit histograms, a custom-scalars layout, findings as text.

Presentation only. Every function takes plain host data (site rows as dicts, per-unit and
per-layer tables as pandas DataFrames, findings and events as dicts) and a writer with the
``torch.utils.tensorboard.SummaryWriter`` methods (``tensorboardX`` and the ``experiment`` of
Lightning's ``TensorBoardLogger`` qualify). It never touches a model, a hook or a device
tensor, so a run directory copied to another machine can be turned into TensorBoard logs
there (:func:`write_run`).

Tags:

=====================================  ==============================================
``<prefix>/<metric>/<site>``           site metrics (``relu_doctor/dead_fraction/net.1``)
``<prefix>/<metric>/<layer>``          per-layer ``grad_norm`` and ``update_ratio``
``<prefix>/unit_activation_rate/<site>``  histogram of the per-unit activation rates
``<prefix>/findings``                  the findings (Markdown), where they changed
``<prefix>/finding_events``            findings that began, changed severity or ended
``<prefix>/events``                    interventions (a Markdown table)
``<prefix>/definitions``               what dead, never active and dormant mean
``train/<name>``                       training metrics of the interval (loss, lr...)
=====================================  ==============================================

The findings' table holds the :data:`FINDINGS_ROWS` most severe findings (and how many
more there are), written at a writer's first log, at each log where those rows' findings
began, changed severity or ended, and at the last (:class:`FindingsText`); not at every
log: a 256-site model's ~700 findings made ~180 KB of event file and ~4 ms a log, and on
many sites some dormant finding began or ended at nearly every log (46 of a 101 MB event
file). Every finding that began, changed or ended is in the ``finding_events`` table of
its log.

:class:`RunTensorBoard` is the Doctor's listener that writes the event files of a plain
``watch(model, run_dir=...)`` loop. A run's event files lie in its run directory itself
(:func:`run_log_dir`): TensorBoard names a run by the folder that holds its event files,
relative to ``--logdir``, so ``tensorboard --logdir runs`` shows the run directories
``runs/treated`` and ``runs/untreated`` as the runs ``treated`` and ``untreated``.

``prefix`` is ``relu_doctor`` for training statistics and ``relu_doctor_val`` for the
validation stream of the Lightning callback.

Example:
    >>> scalars([{"site": "net.1", "dead_fraction": 0.25, "sparsity": 0.5}],
    ...         metrics=("dead_fraction", "sparsity"))
    {'relu_doctor/dead_fraction/net.1': 0.25, 'relu_doctor/sparsity/net.1': 0.5}
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.events import is_judged, loss_ratio, loss_rose_text
from relu_doctor.reports.interventions import CLIP_FIRST, snapshots

if TYPE_CHECKING:
    from relu_doctor.diagnosis import Finding
    from relu_doctor.events import FindingEvent
    from relu_doctor.history import Run

__all__ = [
    "DEFAULT_METRICS",
    "LAYER_METRICS",
    "PREFIX",
    "SITE_METRICS",
    "VAL_PREFIX",
    "FindingsText",
    "RunTensorBoard",
    "SummaryWriterLike",
    "add_histograms",
    "add_scalars",
    "custom_scalars_layout",
    "events_markdown",
    "finding_events_markdown",
    "findings_markdown",
    "has_cap",
    "open_writer",
    "run_log_dir",
    "scalars",
    "tag",
    "training_scalars",
    "warn_stopped",
    "write_events",
    "write_layout",
    "write_record",
    "write_run",
]

PREFIX = "relu_doctor"
VAL_PREFIX = "relu_doctor_val"

#: Every numeric site-level metric of a record (the columns of ``history``).
SITE_METRICS: tuple[str, ...] = (
    "units",
    "units_seen",
    "elements",
    "dead",
    "dead_fraction",
    "inconclusive",
    "lifetime_dead",
    "lifetime_dead_fraction",
    "dormant",
    "dormant_fraction",
    "below_tau",
    "below_tau_fraction",
    "dead_above_tau",
    "sparsity",
    "activation_rate",
    "mean_abs",
    "rms",
    "saturated_fraction",
    "fully_saturated",
    "grad_rms",
    "grad_zero_fraction",
    "nonfinite",
    "grad_nonfinite",
)

#: The site metrics logged as scalars unless told otherwise.
DEFAULT_METRICS: tuple[str, ...] = (
    "dead_fraction",
    "lifetime_dead_fraction",
    "dormant_fraction",
    "sparsity",
    "mean_abs",
    "saturated_fraction",
    "grad_rms",
    "grad_zero_fraction",
)

#: Per-layer metrics (parameter gradients), logged with every record that has them.
LAYER_METRICS: tuple[str, ...] = ("grad_norm", "update_ratio")

# Meaningful only for sites with an upper cap (ReLU6, Hardtanh); 0 elsewhere.
_CAPPED_ONLY = frozenset({"saturated_fraction", "fully_saturated"})
#: Tag prefix of the training metrics (``Doctor.step(loss=...)``, learning rates, ...).
TRAIN_PREFIX = "train"
#: The words of the report, written once beside the charts.
DEFINITIONS = (
    "| word | scalar | meaning |\n|---|---|---|\n"
    "| dead | `dead_fraction` | no activation on any sample of the logging window's "
    "collected steps (`steps_collected_fraction` of its steps, where the overhead budget "
    "samples) |\n"
    "| never active | `lifetime_dead_fraction` | no activation since monitoring began |\n"
    "| dormant | `dormant_fraction` | active, but with a ReDo score (mean \\|h\\| over the "
    "layer's mean) at or below tau (dead units are not dormant) |\n"
    "| below tau | `below_tau_fraction` | ReDo score at or below tau, dead units included: "
    "the units ReDo recycles (the recycling remedies are judged on it) |\n"
    "| dead above tau | `dead_above_tau` | dead units scoring above tau: a leaky family's "
    "units stuck negative whose outputs are a share of the layer's (working, where fewer "
    "than half are stuck) |\n"
    "| sparsity | `sparsity` | fraction of outputs not active |"
)
_HIST = "unit_activation_rate"
_HIST_BINS = np.linspace(0.0, 1.0, 21)


def check_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    """A ``metrics=`` argument: the site metrics logged as scalars (default
    :data:`DEFAULT_METRICS`)."""
    chosen = tuple(DEFAULT_METRICS if metrics is None else metrics)
    if isinstance(metrics, str):
        chosen = (metrics,)
    unknown = [m for m in chosen if m not in SITE_METRICS]
    if unknown or not chosen:
        raise ReluDoctorError(
            f"metrics: unknown site metric(s) {unknown or chosen!r}; choose from "
            f"{list(SITE_METRICS)}."
        )
    return chosen


class SummaryWriterLike(Protocol):
    """The part of ``SummaryWriter`` this module uses."""

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None) -> Any: ...

    def add_histogram(
        self, tag: str, values: Any, global_step: int | None = None, bins: Any = ...
    ) -> Any: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> Any: ...

    def add_custom_scalars(self, layout: dict[str, Any]) -> Any: ...

    def flush(self) -> Any: ...


def tag(metric: str, name: str, prefix: str = PREFIX) -> str:
    """The scalar tag of ``metric`` at site (or layer) ``name``: ``prefix/metric/name``."""
    return f"{prefix}/{metric}/{name}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        return None if math.isnan(v) else v
    return None


def scalars(
    sites: Sequence[Mapping[str, Any]],
    layers: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    prefix: str = PREFIX,
) -> dict[str, float]:
    """Flat ``{tag: value}`` of the site metrics (and per-layer metrics) of one record.

    NaN values (a metric with nothing to measure: no gradient seen, no element seen) are left
    out, as are saturation metrics of sites without a cap.

    Args:
        sites: one dict per site with a ``site`` key and the metrics.
        layers: one row per layer (``layer``, ``grad_norm``, ``update_ratio``), or None.
        metrics: which site metrics to include.
        prefix: the first part of every tag.
    """
    out: dict[str, float] = {}
    heads = [(m, tag(m, "", prefix), m in _CAPPED_ONLY) for m in metrics]
    for row in sites:
        name = str(row["site"])
        uncapped = "cap" in row and _number(row["cap"]) is None  # None (or NaN from Parquet)
        for m, head, capped_only in heads:
            if capped_only and uncapped:
                continue
            v = row.get(m)
            if type(v) is not float:  # (a float, the common case: NaN is not v == v)
                v = _number(v)
            if v is not None and v == v:
                out[head + name] = v
    if layers is not None and not layers.empty and "layer" in layers:
        names = [str(x) for x in layers["layer"].tolist()]  # columns, not to_dict's rows
        for m in LAYER_METRICS:
            if m in layers:
                for name, raw in zip(names, layers[m].tolist(), strict=True):
                    v = _number(raw)
                    if v is not None:
                        out[tag(m, name, prefix)] = v
    return out


def custom_scalars_layout(
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    prefixes: Mapping[str, str] | None = None,
    layer_metrics: Sequence[str] = LAYER_METRICS,
    capped: bool = True,
) -> dict[str, dict[str, list[Any]]]:
    """A custom-scalars layout: one chart per metric holding every site (or layer).

    Args:
        metrics: site metrics to chart.
        prefixes: ``{tag prefix: category title}``; default ``{"relu_doctor": "relu_doctor"}``.
        layer_metrics: per-layer metrics to chart.
        capped: whether any site has an upper cap (ReLU6, Hardtanh); without one the
            saturation charts would stay empty and are left out.

    Returns:
        The layout for ``SummaryWriter.add_custom_scalars``.
    """
    prefixes = dict(prefixes or {PREFIX: PREFIX})
    layout: dict[str, dict[str, list[Any]]] = {}
    for prefix, title in prefixes.items():
        charts: dict[str, list[Any]] = {}
        for m in (*metrics, *layer_metrics):
            if m in _CAPPED_ONLY and not capped:
                continue
            charts[m] = ["Multiline", [f"^{re.escape(prefix)}/{re.escape(m)}/"]]
        layout[title] = charts
    return layout


def _cell(v: Any) -> str:
    s = json.dumps(v, default=str) if isinstance(v, (Mapping, list, tuple)) else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


#: the findings the findings' table lists, the most severe (the rest are counted)
FINDINGS_ROWS = 40


def findings_markdown(findings: Sequence[Finding | Mapping[str, Any]],
                      limit: int | None = FINDINGS_ROWS) -> str:
    """A Markdown table of findings (:class:`~relu_doctor.diagnosis.Finding`, or dicts with
    ``severity``, ``kind``, ``site``, ``message``, ``remedy``), most severe first as given,
    the first ``limit`` of them (None: all) and how many more; or a line saying there is
    none."""
    if not findings:
        return "No findings."
    from relu_doctor.diagnosis import finding_order
    from relu_doctor.reports.findings import kind_label

    lines = ["| severity | kind | site | finding | remedy |", "|---|---|---|---|---|"]
    rows = [f if isinstance(f, Mapping) else f.to_dict(copy=False) for f in findings]
    # most severe first, whatever order they came in (findings rebuilt from events.jsonl)
    rows.sort(key=lambda f: finding_order(str(f.get("severity", "")), str(f.get("kind", "")),
                                          str(f.get("site", "")), f.get("evidence") or {}))
    more = len(rows) - limit if limit is not None and len(rows) > limit else 0
    for f in rows[:len(rows) - more]:
        cells = (f.get("severity", ""), kind_label(str(f.get("kind", ""))), f.get("site", ""),
                 f.get("message", ""), f.get("remedy", ""))
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    if more:
        lines.append(f"| | | | and {more} more findings (see the report) | |")
    return "\n".join(lines)


def finding_events_markdown(events: Sequence[FindingEvent]) -> str:
    """A Markdown table of findings that began, changed severity or ended."""
    from relu_doctor.reports.findings import kind_label

    lines = ["| status | severity | kind | site | finding |", "|---|---|---|---|---|"]
    for e in events:
        f = e.finding
        cells = (e.status, f.severity, kind_label(f.kind), f.site, f.message)
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _change(ev: Mapping[str, Any]) -> str:
    """``metric before -> after`` for the metric an intervention is judged on (its
    ``target``), else for each metric it recorded both before and after."""
    before, after = snapshots(ev)
    if not is_judged(ev):  # never measured after: what it recorded, said so
        keys = [k for k in CLIP_FIRST if k in before] or list(before)
        return "; ".join(f"{k} {_short(before[k])}" for k in keys) + " (not judged)"
    target = ev.get("target")
    keys = [target] if isinstance(target, str) and (target in before or target in after) else [
        k for k in before if k in after or not after
    ]
    parts = []
    for k in keys:
        b = _short(before[k]) if k in before else "?"
        a = _short(after[k]) if k in after else "not yet measured"
        parts.append(f"{k} {b} → {a}")
    verdict = ev.get("verdict")
    text = "; ".join(parts)
    if (rose := loss_ratio(ev.get("loss_rose"))) is not None and isinstance(verdict, str):
        verdict = f"{verdict}: {loss_rose_text(rose)}"  # (the loss guard's)
    return f"{text} ({verdict})" if isinstance(verdict, str) and verdict else text


def events_markdown(events: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of interventions (as ``Run.interventions()`` gives them, or as
    recorded: an ``intervention_result`` gives a row of its own): step, remedy, site, what
    was done, the judged metric before and after."""
    lines = ["| step | remedy | site | what | before → after |", "|---|---|---|---|---|"]
    for ev in events:
        what = ev.get("what", "")
        if ev.get("type") == "intervention_result":
            what = f"measured one interval after ({ev.get('ref', '')})"
        cells = (ev.get("step", "?"), ev.get("remedy", "intervention"), ev.get("site", ""),
                 what, _change(ev))
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def training_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{train/<name>: value}`` of an interval's training metrics (NaN left out)."""
    out = {}
    for name, value in metrics.items():
        v = _number(value)
        if v is not None:
            out[f"{TRAIN_PREFIX}/{name}"] = v
    return out


def _file_writer(writer: SummaryWriterLike) -> Any:
    """The event file writer of torch's ``SummaryWriter`` (relu_doctor's own; Lightning's
    ``TensorBoardLogger``'s where tensorboardX is not installed), else None (tensorboardX's
    writer, another writer). To it a log's values go as one event whose summary holds them
    all, which TensorBoard reads value by value, each its own series, as the ``add_*``
    methods write them: one event to make and one record to frame, not one per value (a
    log of a 256-site model made over 2,000 events)."""
    module = sys.modules.get("torch.utils.tensorboard.writer")  # imported if writer is one
    if module is not None and isinstance(writer, module.SummaryWriter):
        return writer._get_file_writer()
    return None


def add_scalars(writer: SummaryWriterLike, values: Mapping[str, float], step: int) -> None:
    """Write ``{tag: value}`` at ``step``, each its own series as ``add_scalar`` writes it:
    in one event where :func:`_file_writer` allows, else ``add_scalar`` per tag."""
    if not values:
        return
    file_writer = _file_writer(writer)
    if file_writer is None:
        for t, v in values.items():
            writer.add_scalar(t, v, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    from relu_doctor.reports import _summary

    data = _summary.scalar_values(values, map(float, values.values()))
    file_writer.add_summary(Summary.FromString(data), step)


def add_histograms(
    writer: SummaryWriterLike, values: Mapping[str, np.ndarray], step: int, bins: np.ndarray
) -> None:
    """Write ``{tag: values}`` at ``step`` as ``add_histogram(tag, values, step, bins=bins)``
    writes each (torch's ``make_histogram``; see :func:`_histograms`): in one event where
    :func:`_file_writer` allows, else ``add_histogram`` per tag."""
    if not values:
        return
    file_writer = _file_writer(writer)
    if file_writer is None:
        for t, v in values.items():
            writer.add_histogram(t, v, step, bins=bins)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    from relu_doctor.reports import _summary

    data = _summary.histogram_values(values, _histograms(list(values.values()), bins))
    file_writer.add_summary(Summary.FromString(data), step)


def _histograms(parts: Sequence[np.ndarray], bins: np.ndarray) -> list[bytes]:
    """The bytes of torch's ``make_histogram(part, bins)`` of each part, equal to it field
    for field once parsed (``sum`` and ``sum_squares`` to rounding: summed in another
    order), every part's buckets counted in one ``bincount`` and its sums in one
    ``reduceat`` (a call per part cost a 256-site log 8 ms, then 3 ms), and encoded directly
    (:mod:`relu_doctor.reports._summary`). A part with a value outside the bins (or NaN)
    gets torch's own call."""
    from torch.utils.tensorboard.summary import make_histogram

    from relu_doctor.reports import _summary

    def torchs(p: np.ndarray) -> bytes:
        return make_histogram(p, bins).SerializeToString()  # type: ignore[no-any-return,no-untyped-call]

    parts = [np.asarray(p, dtype=np.float64).reshape(-1) for p in parts]
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    if not parts or not sizes.all():
        return [torchs(p) for p in parts]
    n_bins = len(bins) - 1
    flat = np.concatenate(parts)
    which = np.repeat(np.arange(len(parts)), sizes)
    inside = (flat >= bins[0]) & (flat <= bins[-1])
    # np.histogram's bins: [edge, next edge), the last one closed
    idx = np.minimum(np.searchsorted(bins, flat, side="right") - 1, n_bins - 1)
    counts = np.bincount((which * n_bins + idx)[inside], minlength=len(parts) * n_bins)
    counts = counts.reshape(len(parts), n_bins)
    outside = np.bincount(which[~inside], minlength=len(parts))
    starts = np.cumsum(sizes) - sizes
    lows, highs = np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)
    sums, squares = np.add.reduceat(flat, starts), np.add.reduceat(flat * flat, starts)
    # the support, as torch trims it: from the bin before the first nonzero one (a zero bin
    # of its own when that is the first) to the last nonzero one
    nonzero = counts > 0
    first = nonzero.argmax(axis=1)
    end = n_bins - nonzero[:, ::-1].argmax(axis=1)
    # each part's counts after a zero bin, so that its buckets are columns first..end of
    # its row whether or not the zero is its own; bins and counts as bytes, sliced per part
    row = 8 * (n_bins + 1)
    padded = np.zeros((len(parts), n_bins + 1), dtype="<f8")
    padded[:, 1:] = counts
    limits, buckets = bins.astype("<f8").tobytes(), padded.tobytes()
    out = []
    for i, (lo, hi, a, b, n, t, q) in enumerate(zip(
        first.tolist(), end.tolist(), lows.tolist(), highs.tolist(), sizes.tolist(),
        sums.tolist(), squares.tolist(), strict=True,
    )):
        if outside[i]:
            out.append(torchs(parts[i]))
            continue
        out.append(_summary.histogram(a, b, n, t, q, limits[8 * lo:8 * (hi + 1)],
                                      buckets[i * row + 8 * lo:i * row + 8 * (hi + 1)]))
    return out


def _rates_by_site(units: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each site's finite per-unit activation rates (float64), sites in their first
    appearance's order, a site with none left out: no group-by, and no sort where the rows
    come grouped by site (a record's unit table), one stable sort where not. One
    ``isfinite`` for every row and one split, not a call per site: with iterating the sites'
    names from Arrow, those cost a 256-site log ~2 ms."""
    codes, names = pd.factorize(units["site"], sort=False)
    rates = units["activation_rate"].to_numpy(dtype=np.float64)
    if (np.diff(codes) < 0).any():  # not grouped: factorize numbers sites as they appear
        order = np.argsort(codes, kind="stable")
        codes, rates = codes[order], rates[order]
    finite = np.isfinite(rates)
    codes, rates = codes[finite], rates[finite]
    counts = np.bincount(codes, minlength=len(names))
    parts = np.split(rates, np.cumsum(counts)[:-1])
    return {str(name): part
            for name, part, n in zip(names.tolist(), parts, counts.tolist(), strict=True) if n}


class FindingsText:
    """When the findings' table goes to a writer: at the first record it is given, at one
    where a finding of its :data:`FINDINGS_ROWS` most severe began, changed severity or
    ended, and at a ``final`` one; the others hold the findings of the last table written
    (their numbers as of that step). The last record's findings, when not written with it,
    are written by :meth:`flush_last` at the end of training (a run that ends at a logging
    step has no ``final`` record). Keyed by whatever names a series of records (a writer
    and a prefix)."""

    def __init__(self) -> None:
        self._shown: dict[Any, frozenset[tuple[str, str, str]]] = {}  # each table's rows
        self._unwritten: dict[Any, tuple[int, list[Finding]]] = {}

    def take(self, key: Any, record: Any) -> list[Finding] | None:
        """The findings of ``record`` (an :class:`~relu_doctor.record.IntervalRecord`) to
        write with it under ``key``, or None."""
        # (a set: two sites trading places as their shares move is no change)
        rows = frozenset((f.kind, f.site, f.severity) for f in record.findings[:FINDINGS_ROWS])
        if self._shown.get(key) != rows or record.final:
            self._shown[key] = rows
            self._unwritten.pop(key, None)
            return list(record.findings)
        self._unwritten[key] = (int(record.step), list(record.findings))
        return None

    def flush_last(self) -> dict[Any, tuple[int, list[Finding]]]:
        """``{key: (step, findings)}`` of each series whose last record's findings were not
        written, forgotten here (write them)."""
        out, self._unwritten = self._unwritten, {}
        return out


def write_record(
    writer: SummaryWriterLike,
    step: int,
    *,
    sites: Sequence[Mapping[str, Any]],
    units: pd.DataFrame | None = None,
    layers: pd.DataFrame | None = None,
    findings: Sequence[Finding | Mapping[str, Any]] | None = (),
    finding_events: Sequence[FindingEvent] = (),
    metrics: Sequence[str] = DEFAULT_METRICS,
    prefix: str = PREFIX,
    histograms: bool = True,
    training: Mapping[str, Any] | None = None,
) -> None:
    """Write one logging step: scalars, per-unit activation-rate histograms, findings text.

    Args:
        writer: a ``SummaryWriter`` (or anything with its methods).
        step: the global step.
        sites: one dict per site (``site`` and metrics).
        units: one row per (site, unit) with ``site`` and ``activation_rate``, or None.
        layers: one row per layer, or None.
        findings: the findings of this step (as :func:`findings_markdown` takes them),
            written as a Markdown table; None writes no findings text (see
            :class:`FindingsText`).
        finding_events: the findings that began, changed severity or ended at this step,
            written as a Markdown table where there are any.
        metrics: site metrics to write as scalars.
        prefix: the first part of every tag.
        histograms: write the per-unit histograms.
        training: the interval's training metrics (``IntervalRecord.metrics``), written as
            ``train/<name>``.
    """
    values = scalars(sites, layers, metrics=metrics, prefix=prefix)
    values.update(training_scalars(training or {}))
    got, ran = (_number(sites[0].get(k)) for k in ("steps_collected", "steps_run")) if sites else (None, None)
    if got is not None and ran:  # the window's sampling: how much of it the statistics saw
        values[f"{prefix}/steps_collected_fraction"] = got / ran
    add_scalars(writer, values, step)
    if histograms and units is not None and not units.empty and "activation_rate" in units:
        rates = _rates_by_site(units)
        add_histograms(writer, {tag(_HIST, site, prefix): r for site, r in rates.items()},
                       step, _HIST_BINS)
    if findings is not None:
        writer.add_text(f"{prefix}/findings", findings_markdown(findings), step)
    if finding_events:
        writer.add_text(f"{prefix}/finding_events", finding_events_markdown(finding_events),
                        step)


def write_layout(writer: SummaryWriterLike, layout: dict[str, Any]) -> None:
    """Write a custom-scalars layout (see :func:`custom_scalars_layout`) and the
    definitions of the words the charts use."""
    writer.add_custom_scalars(layout)
    writer.add_text(f"{PREFIX}/definitions", DEFINITIONS, 0)


def has_cap(sites: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any site row has an upper cap (ReLU6, Hardtanh)."""
    return any(_number(r.get("cap")) is not None for r in sites)


def write_events(
    writer: SummaryWriterLike, events: Iterable[Mapping[str, Any]], prefix: str = PREFIX
) -> None:
    """Write interventions (``Run.interventions()``), one text entry per step that has any."""
    by_step: dict[int, list[Mapping[str, Any]]] = {}
    for ev in events:
        by_step.setdefault(int(ev.get("step", 0)), []).append(ev)
    for step, evs in sorted(by_step.items()):
        writer.add_text(f"{prefix}/events", events_markdown(evs), step)


def run_log_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where the event files of the run written to ``run_dir`` go: ``run_dir`` itself, so
    TensorBoard names the run after its run directory (``tensorboard --logdir`` the folder
    that holds the run directories).

    Example:
        >>> run_log_dir("runs/treated").as_posix()
        'runs/treated'
    """
    return Path(run_dir)


def open_writer(
    log_dir: str | os.PathLike[str], purge_step: int | None = None
) -> SummaryWriterLike:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``log_dir`` in the calling
    thread: a failing write (a full disk...) warns once, naming the cause and the file, and
    is retried at later flushes; it is never raised, in this thread or another
    (:class:`relu_doctor.reports.eventfile.SafeSummaryWriter`; ``purge_step``: there)."""
    from relu_doctor.reports.eventfile import SafeSummaryWriter

    writer: SummaryWriterLike = SafeSummaryWriter(log_dir, purge_step=purge_step)
    return writer


def write_run(
    run: Run,
    log_dir: str | os.PathLike[str] | None = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    histograms: bool = True,
) -> Path:
    """Write a whole run record as TensorBoard event files.

    Args:
        run: a run record (:func:`relu_doctor.load_run`).
        log_dir: where to write; default the run directory (:func:`run_log_dir`).
        metrics: site metrics to write as scalars.
        histograms: write per-unit histograms.

    Returns:
        The directory written.
    """
    if log_dir is None:
        if run.path is None:
            raise ValueError("log_dir: required for a run record built in memory (no path).")
        log_dir = run_log_dir(run.path)
    writer = open_writer(log_dir)
    try:
        hist = run.history
        write_layout(writer, custom_scalars_layout(
            metrics, capped=hist.empty or "cap" not in hist or has_cap(hist.to_dict("records"))))
        steps = sorted(int(s) for s in hist["step"].unique()) if not hist.empty else []
        training: dict[int, dict[str, float]] = {}
        table = getattr(run, "metrics", None)
        if isinstance(table, pd.DataFrame) and not table.empty:
            for row in table.to_dict("records"):
                training.setdefault(int(row["step"]), {})[str(row["name"])] = row["value"]
        for step in steps:
            write_record(
                writer,
                step,
                sites=hist[hist["step"] == step].to_dict("records"),
                units=run.units[run.units["step"] == step] if not run.units.empty else None,
                layers=run.layers[run.layers["step"] == step] if not run.layers.empty else None,
                findings=None,
                metrics=metrics,
                histograms=histograms,
                training=training.get(step),
            )
        if steps:  # the findings are known exactly at the last step only
            writer.add_text(f"{PREFIX}/findings",
                            findings_markdown(run.findings()), steps[-1])
        by_step: dict[int, list[FindingEvent]] = {}
        for fe in run.finding_events():
            by_step.setdefault(fe.step, []).append(fe)
        for step, evs in sorted(by_step.items()):
            writer.add_text(f"{PREFIX}/finding_events", finding_events_markdown(evs), step)
        write_events(writer, run.interventions())
        writer.flush()
    finally:
        close = getattr(writer, "close", None)
        if close is not None:
            close()
    return Path(log_dir)


def warn_stopped(where: object, error: BaseException, *, stacklevel: int = 2) -> None:
    """The one warning for a TensorBoard writer that failed and was left out (``where``: its
    folder): training goes on, the run directory is still written."""
    warnings.warn(
        f"relu_doctor: TensorBoard logging to {str(where)!r} stopped: "
        f"{type(error).__name__}: {error}. Training goes on; the run directory is still written.",
        ReluDoctorWarning,
        stacklevel=stacklevel + 1,
    )


class RunTensorBoard:
    """The TensorBoard event files of a ``watch(model, run_dir=...)`` loop: a Doctor
    listener (:meth:`write_record`) and event listener (:meth:`write_event`) writing to
    ``log_dir``. The writer opens on the first record. A failing write (a full disk...) warns
    once and is retried at later records (:func:`open_writer`); any other failure warns once
    and the writer steps aside. Training goes on either way.

    Args:
        log_dir: where the event files go (:func:`run_log_dir` of the run directory).
        metrics: site metrics written as scalars.
        continued: the run continues one whose event files are there: the first record's
            window begins a new session, TensorBoard hiding their steps from there on
            (logged again: a resume from an older checkpoint).
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, metrics: Sequence[str] = DEFAULT_METRICS,
        continued: bool = False,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.metrics = tuple(metrics)
        self.continued = continued
        self._writer: SummaryWriterLike | None = None
        self._failed = False
        self._findings = FindingsText()

    def _guard(self, fn: Any, *args: Any) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception as e:  # never stop the training for a log file
            self._failed = True
            warn_stopped(self.log_dir, e, stacklevel=3)

    def write_record(self, record: Any) -> None:
        """Write one :class:`~relu_doctor.history.IntervalRecord`."""
        self._guard(self._write_record, record)

    def _opened(self, purge_step: int | None = None) -> SummaryWriterLike:
        """The writer, opened at first use."""
        if self._writer is None:
            self._writer = open_writer(self.log_dir, purge_step=purge_step)
        return self._writer

    def _write_record(self, record: Any) -> None:
        first = self._writer is None
        steps = int(getattr(record, "steps_run", 0) or 0)
        writer = self._opened(
            max(record.step - steps + 1, 1) if first and self.continued and steps else None)
        if first:
            write_layout(writer, custom_scalars_layout(
                self.metrics, capped=has_cap(record.site_rows)))
        write_record(
            writer, record.step, sites=record.site_rows, units=record.unit_table,
            layers=record.layer_table, findings=self._findings.take(PREFIX, record),
            finding_events=record.finding_events, metrics=self.metrics,
            training=getattr(record, "metrics", None),
        )
        writer.flush()

    def write_training(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write training metrics of ``step`` that came after its record (``train/<name>``)."""
        self._guard(self._write_training, step, metrics)

    def _write_training(self, step: int, metrics: Mapping[str, Any]) -> None:
        writer = self._opened()
        add_scalars(writer, training_scalars(metrics), step)
        writer.flush()

    def write_event(self, event: Mapping[str, Any]) -> None:
        """Write an intervention (its result, a site a remedy declined) as a row of the
        interventions table."""
        if event.get("type") in ("intervention", "intervention_result", "declined"):
            self._guard(self._write_event, event)

    def _write_event(self, event: Mapping[str, Any]) -> None:
        write_events(self._opened(), [event])

    def flush(self) -> None:
        """Write the last record's findings where they were not (:class:`FindingsText`)
        and flush what was written (the Doctor calls it when it detaches)."""
        if self._writer is not None:
            self._guard(self._flush, self._writer)

    def _flush(self, writer: SummaryWriterLike) -> None:
        for step, findings in self._findings.flush_last().values():
            writer.add_text(f"{PREFIX}/findings", findings_markdown(findings), step)
        writer.flush()
