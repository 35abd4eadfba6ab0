"""The run record: what each logging interval saw (:class:`IntervalRecord`, defined in
:mod:`relu_doctor.record`), which findings
began, changed or ended (:class:`FindingTracker`), and a run as plain data (:class:`Run`).

The run directory's writer and reader (``RunWriter``, ``load_run``) live in
:mod:`relu_doctor.rundir` and are importable from here too. Imports no model, hook or
device code: reports read a run record on any machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from relu_doctor.diagnosis import Finding
from relu_doctor.events import (
    Declined,
    Event,
    FindingEvent,
    Intervention,
    InterventionResult,
    event_from_dict,
    loss_ratio,
)
from relu_doctor.record import WINDOW_COLUMNS, IntervalRecord

if TYPE_CHECKING:  # importable from here at run time through __getattr__ (no import cycle)
    from relu_doctor.rundir import RunWriter, atomic_write_bytes, load_run, read_table

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "SEEN_FIELDS",
    "WINDOW_COLUMNS",
    "Event",
    "FindingEvent",
    "FindingTracker",
    "IntervalRecord",
    "Intervention",
    "InterventionResult",
    "LogRecord",
    "Run",
    "RunWriter",
    "UnitSource",
    "atomic_write_bytes",
    "clean_json",
    "event_dict",
    "finding_from_dict",
    "json_text",
    "load_run",
    "merge_interventions",
    "read_table",
]

FORMAT_VERSION = 4
# 1: findings re-written every interval, no findings.json; 2: one Parquet part per log;
# 3: ``dormant`` counted dead units too (ReDo's score <= tau, now ``below_tau``)
READABLE_VERSIONS = (1, 2, 3, 4)


LogRecord = IntervalRecord  # the name before 0.2; kept as an alias

#: The fields that say a window saw something (``IntervalRecord.judged``): finite elements,
#: or non-finite calls (a site whose every output was NaN has elements == 0 yet must be
#: reported). A site's window rows and the run's history columns carry these names.
SEEN_FIELDS: tuple[str, ...] = ("elements", "nonfinite", "grad_nonfinite")


def _frozen_finding(f: Finding) -> bool:
    """Whether ``f`` is of a frozen site (diagnosis' ``frozen_layer``/``no_gradient``)."""
    return "frozen_layer" in f.evidence or "no_gradient" in f.evidence


class FindingTracker:
    """Which findings began, changed severity or ended between logging steps.

    A finding is identified by ``(kind, site)``; its ``began`` step is the first step of
    the unbroken run of logs it has been present in, as a frozen site's or not (a part
    unfrozen ends its frozen findings, and those of its training begin).
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Finding] = {}
        self._restarted: set[str] = set()  # sites whose findings end and begin anew

    @property
    def restarted(self) -> frozenset[str]:
        """The sites whose findings end and begin anew at the next committed step."""
        return frozenset(self._restarted)

    def restart(self, site: str) -> None:
        """End ``site``'s open findings at the next committed step, and begin the ones it
        has then anew: its layer was replaced, and what the old one showed is not the new
        one's (nor its ``began`` step)."""
        self._restarted.add(site)

    def update(
        self, findings: list[Finding], step: int, *, commit: bool = True
    ) -> tuple[list[Finding], list[Finding], list[FindingEvent]]:
        """``(findings with began set, new findings, events)`` for the findings of ``step``.

        With ``commit=False`` (a look at the open window) nothing is remembered.
        """
        out: list[Finding] = []
        new: list[Finding] = []
        events: list[FindingEvent] = []
        now: dict[tuple[str, str], Finding] = {}
        restarted = self._restarted
        events += [FindingEvent("ended", prev, step) for (_, site), prev in self._open.items()
                   if site in restarted]
        for f in findings:
            key = (f.kind, f.site)
            prev = self._open.get(key) if f.site not in restarted else None
            if prev is not None and _frozen_finding(prev) != _frozen_finding(f):
                # (a part unfrozen, or frozen: what training does there is another matter,
                # whose finding begins now; a fine-tuning trial's backbone read "warning
                # since step 10", frozen information until step 40)
                events.append(FindingEvent("ended", prev, step))
                prev = None
            g = f.since(prev.began if prev is not None else f.step)
            now[key] = g
            out.append(g)
            if prev is None:
                new.append(g)
                events.append(FindingEvent("began", g, f.step))
            elif prev.severity != g.severity:
                events.append(FindingEvent("changed", g, f.step))
        for key, prev in self._open.items():
            if key not in now and key[1] not in restarted:
                events.append(FindingEvent("ended", prev, step))
        if commit:
            self.commit(out)
        return out, new, events

    def commit(self, findings: list[Finding]) -> None:
        """Remember ``findings``, as :meth:`update` returned them with ``commit=False``, as
        those of the last committed step (a read commits once its record is made)."""
        self._open = {(f.kind, f.site): f for f in findings}
        self._restarted = set()

    def open_findings(self) -> list[Finding]:
        """The findings of the last committed step, as :meth:`update` returned them."""
        return list(self._open.values())

    def state_dict(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self._open.values()]

    def load_state_dict(self, state: Any, restarted: Iterable[str] = ()) -> None:
        self._open = {}
        self._restarted = {str(site) for site in restarted}
        for item in state or []:
            if isinstance(item, Mapping):
                f = Finding(**{k: item[k] for k in Finding.__dataclass_fields__ if k in item})
            else:  # [kind, site, began]: checkpoints written before 0.2
                kind, site, began = item
                f = Finding(str(kind), str(site), "", "", step=int(began), began=int(began))
            self._open[(f.kind, f.site)] = f


def json_text(value: Any) -> str:
    """``json.dumps(clean_json(value))``, on the C encoder alone where ``value`` is already
    JSON-safe (the common case: :func:`clean_json`'s walk in Python cost a 256-site model's
    log some 10 ms over its findings' unit lists)."""
    try:
        return _STRICT_JSON.encode(value)
    except (TypeError, ValueError):  # NaN/Inf, a tensor or numpy scalar, another type
        return json.dumps(clean_json(value))


# json.dumps(value, allow_nan=False) makes an encoder at each call: a log's 725 findings,
# a millisecond
_STRICT_JSON = json.JSONEncoder(allow_nan=False)


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, tensors and numpy scalars become numbers."""
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def event_dict(event: Event | Mapping[str, Any]) -> dict[str, Any]:
    """The plain-data (JSON) form of an event."""
    if isinstance(event, (FindingEvent, Intervention, InterventionResult, Declined)):
        return event.to_dict()
    return dict(event)


class UnitSource(Protocol):
    """Where a run's per-unit rows are read from when asked (a run directory's ``units``
    parts: :class:`relu_doctor.runread.TableParts`)."""

    def read(
        self,
        *,
        steps: Iterable[int] | None = None,
        sites: Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame: ...

    def sites(self) -> list[str]: ...


class Run:
    """A run record loaded from a run directory (or built in memory).

    Attributes:
        meta: the contents of ``meta.json`` (with ``unwritten`` and ``write_error`` from
            ``status.json``).
        history: one row per (step, site): site-level metrics.
        units: one row per (step, site, unit): activation rate, mean |h|, dormant score...
            Loaded from the run directory on first use (the largest table by far); to read
            some steps or sites only, use :meth:`read_units`.
        layers: one row per (step, layer): parameter-gradient norm, update-to-weight ratio.
        events: finding transitions and interventions, in order (their JSON form).
        path: where it was loaded from (None when built in memory).
        last_findings: the findings of the last logged step (``findings.json``, brought up
            to that step from the events: see ``findings_step``); None for a format-1
            directory, whose events hold them.
        findings_step: the earlier step ``findings.json`` held the findings of, where the
            run logged after it and was not closed (its writer rewrites the file at most
            every few seconds, and at close): the findings that began, changed severity or
            ended after it are the events', the others' numbers that step's. None when it
            held the last log's.
        tables: other tables by name (``metrics``: step, name, value).
        problems: what could not be read back (damaged files or lines, skipped with a
            warning); a damaged unit part found when the units are read is added then.
        unit_source: where ``units`` is read from when it is None (a run directory's
            parts); with neither, ``units`` is empty.
        history_lost: why ``history`` is empty although the run logged activations (its
            parts damaged, its folder missing), naming the files; "" when nothing is lost.
            The report says it instead of "no activation seen".
        writer_open: why the run's writer has not closed it ("" when it did): still
            writing, or ended without closing it (killed, crashed); the report says so.
        writer_writing: whether that writer may still be writing it (a live process);
            False when it closed the run or is gone without closing it.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        history: pd.DataFrame,
        units: pd.DataFrame | None = None,
        layers: pd.DataFrame | None = None,
        events: list[dict[str, Any]] | None = None,
        path: Path | None = None,
        last_findings: list[Finding] | None = None,
        tables: dict[str, pd.DataFrame] | None = None,
        problems: list[str] | None = None,
        *,
        unit_source: UnitSource | None = None,
        history_lost: str = "",
        writer_open: str = "",
        writer_writing: bool = False,
        findings_step: int | None = None,
    ) -> None:
        self.meta = meta
        self.history = history
        self.layers = pd.DataFrame() if layers is None else layers
        self.events = [] if events is None else events
        self.path = path
        self.last_findings = last_findings
        self.tables = {} if tables is None else tables
        self.problems = [] if problems is None else problems
        self._units = units
        self._unit_source = unit_source
        self.history_lost = history_lost
        self.writer_open = writer_open
        self.writer_writing = writer_writing
        self.findings_step = findings_step

    @property
    def units(self) -> pd.DataFrame:
        """One row per (step, site, unit), read from the run directory on first use."""
        if self._units is None:
            source = self._unit_source
            self._units = source.read() if source is not None else pd.DataFrame()
        return self._units

    @units.setter
    def units(self, frame: pd.DataFrame) -> None:
        self._units = frame

    def read_units(
        self,
        *,
        steps: Iterable[int] | None = None,
        sites: Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """The unit rows of ``steps`` and ``sites`` only (every one when None), in
        ``columns`` (every one when None). From a run directory only those rows are read
        (the filter reaches the Parquet row groups), so a report of a long run does not load
        millions of rows to draw a few steps.

        Args:
            steps: the logged steps to read (integers).
            sites: the site names to read.
            columns: the columns to keep (``step``, ``site``, ``unit`` and the unit
                metrics); those the record lacks are left out.

        Raises:
            TypeError: a step is not an integer, a site or column name not a string.

        Example:
            >>> import pandas as pd
            >>> run = Run(meta={}, history=pd.DataFrame(), units=pd.DataFrame(
            ...     {"step": [1, 2], "site": ["a", "a"], "unit": [0, 0], "dead": [False, True]}))
            >>> run.read_units(steps=[2], columns=["unit", "dead"]).to_dict("records")
            [{'unit': 0, 'dead': True}]
        """
        step_list = _names("steps", steps, int)
        site_list = _names("sites", sites, str)
        column_list = _names("columns", columns, str)
        if self._units is None and self._unit_source is not None:
            return self._unit_source.read(steps=step_list, sites=site_list, columns=column_list)
        frame = self.units
        if frame.empty:
            return frame
        keep = pd.Series(True, index=frame.index)
        if step_list is not None and "step" in frame:
            keep &= frame["step"].isin(step_list)
        if site_list is not None and "site" in frame:
            keep &= frame["site"].astype(str).isin(site_list)
        out = frame[keep]
        if column_list is not None:
            out = out[[c for c in column_list if c in out]]
        return out.reset_index(drop=True)

    @property
    def units_damaged(self) -> bool:
        """Whether a part of the per-unit table was skipped (damaged, found so when read)."""
        return bool(getattr(self._unit_source, "skipped", None))

    def unit_sites(self) -> list[str]:
        """The sites that have unit rows, in order of first appearance (from a run directory,
        only the ``site`` column is read)."""
        if self._units is None and self._unit_source is not None:
            return self._unit_source.sites()
        frame = self.units
        if frame.empty or "site" not in frame:
            return []
        return [str(s) for s in pd.unique(frame["site"].astype(str))]

    def __repr__(self) -> str:
        where = f"{str(self.path)!r}" if self.path is not None else "in memory"
        return (
            f"Run({where}, sites={len(self.site_info)}, steps logged="
            f"{self.history['step'].nunique() if not self.history.empty else 0}, "
            f"last step={self.last_step}, findings={len(self.findings())}, "
            f"events={len(self.events)})"
        )

    @property
    def site_info(self) -> list[dict[str, Any]]:
        """Site descriptions from ``meta.json`` (name, key fields, family, unit dim and rule,
        units), in depth order."""
        return sorted(self.meta.get("sites", []), key=lambda s: s.get("order", 0))

    @property
    def metrics(self) -> pd.DataFrame:
        """The long-format ``metrics`` table (step, name, value); empty when absent."""
        frame = self.tables.get("metrics")
        if frame is None or frame.empty:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "name": pd.Series(dtype=str),
                                 "value": pd.Series(dtype="float64")})
        return frame

    @property
    def unwritten(self) -> list[list[int]]:
        """``[first, last]`` step ranges whose records did not reach the run directory (a
        write failed: disk full, permissions, a removed directory)."""
        ranges = self.meta.get("unwritten", [])
        return [list(r) for r in ranges if isinstance(r, list) and len(r) == 2] if isinstance(
            ranges, list) else []

    @property
    def last_step(self) -> int | None:
        return None if self.history.empty else int(self.history["step"].max())

    def findings(self) -> list[Finding]:
        """Findings of the last logged step, most severe first."""
        if self.last_findings is not None:
            return list(self.last_findings)
        # Format 1 wrote every finding at every log: those of the last step are the set.
        rows = [e for e in self.events if e.get("type") == "finding"]
        if not rows:
            return []
        last = max(int(e["step"]) for e in rows)
        return [finding_from_dict(e) for e in rows if e["step"] == last]

    def finding_events(self) -> list[FindingEvent]:
        """Findings as they began, changed severity and ended, in order."""
        out = []
        for e in self.events:
            if e.get("type") == "finding":
                ev = event_from_dict(e)
                if isinstance(ev, FindingEvent):
                    out.append(ev)
        return out

    def interventions(self) -> list[dict[str, Any]]:
        """Interventions in order, each completed by its ``intervention_result``."""
        return merge_interventions(self.events)

    def declined(self) -> dict[str, dict[str, str]]:
        """The sites remedies left alone: ``{site: {remedy: why}}`` (``declined`` events)."""
        out: dict[str, dict[str, str]] = {}
        for e in self.events:
            if e.get("type") == "declined":
                out.setdefault(str(e.get("site")), {})[str(e.get("remedy"))] = str(
                    e.get("reason", ""))
        return out


def _names(name: str, values: Iterable[Any] | None, kind: type) -> list[Any] | None:
    """``values`` as a list, each an instance of ``kind`` (bool is no integer); None stays."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name}: expected a list of {kind.__name__}, got the string {values!r}")
    out = list(values)
    for v in out:
        if not isinstance(v, kind) or isinstance(v, bool):
            if kind is int and hasattr(v, "__index__") and not isinstance(v, bool):
                continue  # numpy integers
            raise TypeError(f"{name}: expected {kind.__name__} values, got {v!r} "
                            f"({type(v).__name__})")
    return [kind(v) for v in out]


def finding_from_dict(data: Mapping[str, Any]) -> Finding:
    """A :class:`~relu_doctor.diagnosis.Finding` from its JSON form.

    Raises:
        TypeError: ``data`` is not an object with string ``kind``, ``site`` and ``severity``.
    """
    if not isinstance(data, Mapping) or not all(
        isinstance(data.get(k), str) for k in ("kind", "site", "severity")
    ):
        raise TypeError(f"a finding must be an object with kind, site and severity, got {data!r:.80}")
    return Finding(**{k: data[k] for k in Finding.__dataclass_fields__ if k in data})


def merge_interventions(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Interventions with their ``after`` metrics filled in from the matching
    ``intervention_result`` events (matched on ``id`` / ``ref``), in order.

    Example:
        >>> merge_interventions([
        ...     {"type": "intervention", "id": "a", "after": None},
        ...     {"type": "intervention_result", "ref": "a", "after": {"dead_fraction": 0.1}}])
        [{'type': 'intervention', 'id': 'a', 'after': {'dead_fraction': 0.1}}]
    """
    out: list[dict[str, Any]] = []
    by_id: dict[Any, dict[str, Any]] = {}
    for e in events:
        if e.get("type") == "intervention":
            d = dict(e)
            out.append(d)
            if d.get("id") is not None:
                by_id[d["id"]] = d
        elif e.get("type") == "intervention_result" and e.get("ref") in by_id:
            target = by_id[e["ref"]]
            target["after"] = e.get("after")
            for k in ("target", "verdict", "efficacy"):  # how it went (treatment plans)
                if e.get(k) is not None:
                    target[k] = e[k]
            if (rose := loss_ratio(e.get("loss_rose"))) is not None:  # (JSON's "inf": inf)
                target["loss_rose"] = rose
            if "after_step" in e or "step" in e:
                target["after_step"] = e.get("after_step", e.get("step"))
    return out


def __getattr__(name: str) -> Any:
    """The run directory's writer and reader live in :mod:`relu_doctor.rundir`; they are
    still importable from here."""
    if name in ("RunWriter", "load_run", "read_table", "atomic_write_bytes"):
        from relu_doctor import rundir

        return getattr(rundir, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
