"""The run record: what each logging interval saw (:class:`IntervalRecord`), which findings
began, changed or ended (:class:`FindingTracker`), and the run directory's writer and reader
(:class:`RunWriter`, :func:`load_run`, :class:`Run`).

A run directory (DESIGN.md) is written as training goes; every file is either replaced
atomically (written under a temporary name, then renamed) or appended one whole line at a
time, so a run killed at any moment still yields a report of everything it logged:

=====================  =================================================================
``meta.json``          format version, versions, sites, configuration (replaced)
``findings.json``      the findings of the last logged step, exact (replaced)
``history/``           one Parquet part per log step: one row per (step, site)
``units/``             one Parquet part per log step: one row per (step, site, unit)
``layers/``            one Parquet part per log step: one row per (step, layer)
``events.jsonl``       findings when they begin, change severity or end, interventions and
                       their results: one JSON object a line (appended)
``tensorboard/``       event files (written by the reports / callbacks layer)
=====================  =================================================================

Parquet parts are the appendable equivalent of one ``history.parquet``: readers concatenate
them. Imports no model, hook or device code: reports read a run directory on any machine.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError, RunDirError
from relu_doctor.events import (
    Event,
    FindingEvent,
    Intervention,
    InterventionResult,
    event_from_dict,
)
from relu_doctor.sites import SiteKey

__all__ = [
    "FORMAT_VERSION",
    "Event",
    "FindingEvent",
    "FindingTracker",
    "IntervalRecord",
    "Intervention",
    "InterventionResult",
    "LogRecord",
    "Run",
    "RunWriter",
    "atomic_write_bytes",
    "load_run",
    "merge_interventions",
]

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: findings re-written every interval, no findings.json


@dataclass
class IntervalRecord:
    """What one logging interval saw (host-side data only).

    Attributes:
        step: the step count at which it was logged.
        site_rows: one dict per site: ``site`` (display name), ``family``, ``leaky``,
            ``cap``, ``order``, ``window_steps`` and the metrics of
            :func:`relu_doctor.metrics.site_metrics`.
        unit_table: one row per (site, unit).
        layer_table: one row per parameterised layer: ``grad_norm``, ``update_ratio``.
        findings: the diagnosis, most severe first.
        new_findings: findings that were not present at the previous log.
        keys: the :class:`~relu_doctor.sites.SiteKey` of each site, by display name.
        metrics: training metrics of the interval by name (``loss``: the mean of the values
            passed to ``Doctor.step(loss=...)``; ``lr``: the learning rate at the logging
            step; whatever was given to ``Doctor.log_metrics``), for the run's ``metrics``
            table.
    """

    step: int
    site_rows: list[dict[str, Any]]
    unit_table: pd.DataFrame
    layer_table: pd.DataFrame
    findings: list[Finding]
    new_findings: list[Finding] = field(default_factory=list)
    keys: dict[str, SiteKey] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def site_row(self, name: str) -> dict[str, Any] | None:
        """The row of the site called ``name``, or None."""
        for row in self.site_rows:
            if row["site"] == name:
                return row
        return None

    def key(self, name: str) -> SiteKey:
        """The key of the site called ``name``."""
        try:
            return self.keys[name]
        except KeyError:
            raise ReluDoctorError(
                f"site: no site named {name!r} in this record; known: {sorted(self.keys)}."
            ) from None


LogRecord = IntervalRecord  # the name before 0.2; kept as an alias


class FindingTracker:
    """Which findings began, changed severity or ended between logging steps.

    A finding is identified by ``(kind, site)``; its ``began`` step is the first step of
    the unbroken run of logs it has been present in.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Finding] = {}

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
        for f in findings:
            key = (f.kind, f.site)
            prev = self._open.get(key)
            g = replace(f, began=prev.began if prev is not None else f.step)
            now[key] = g
            out.append(g)
            if prev is None:
                new.append(g)
                events.append(FindingEvent("began", g, f.step))
            elif prev.severity != g.severity:
                events.append(FindingEvent("changed", g, f.step))
        for key, prev in self._open.items():
            if key not in now:
                events.append(FindingEvent("ended", prev, step))
        if commit:
            self._open = now
        return out, new, events

    def state_dict(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self._open.values()]

    def load_state_dict(self, state: Any) -> None:
        self._open = {}
        for item in state or []:
            if isinstance(item, Mapping):
                f = Finding(**{k: item[k] for k in Finding.__dataclass_fields__ if k in item})
            else:  # [kind, site, began]: checkpoints written before 0.2
                kind, site, began = item
                f = Finding(str(kind), str(site), "", "", step=int(began), began=int(began))
            self._open[(f.kind, f.site)] = f
_TABLES = ("history", "units", "layers")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh temporary name beside ``path``, fsync, then rename.

    The temporary file is opened like any new file (mode 0666 less the umask), so a run
    directory or report stays readable by whoever it is shared with.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, tensors and numpy scalars become numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
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
    if isinstance(event, (FindingEvent, Intervention, InterventionResult)):
        return event.to_dict()
    return dict(event)


class RunWriter:
    """Writes a run directory incrementally. Create it on rank zero only.

    Args:
        path: the directory (created if missing). An existing run directory of this format
            is appended to (a resumed run); a non-empty foreign directory is refused.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run_dir: {str(self.path)!r} exists and is not a directory.")
        if (
            self.path.is_dir()
            and any(self.path.iterdir())
            and not (self.path / "meta.json").is_file()
        ):
            names = sorted(p.name for p in self.path.iterdir())[:5]
            raise RunDirError(
                f"run_dir: {str(self.path)!r} is not empty and is not a relu_doctor run "
                f"directory (it holds {names}); pass a new or empty directory."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        for t in _TABLES:
            (self.path / t).mkdir(exist_ok=True)

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace ``meta.json`` atomically (``format_version`` is added)."""
        data = {"format_version": FORMAT_VERSION, **_clean(meta)}
        atomic_write_bytes(self.path / "meta.json", json.dumps(data, indent=2).encode())

    def append_table(self, table: str, step: int, frame: pd.DataFrame) -> None:
        """Write one Parquet part of ``table`` for ``step`` atomically."""
        if table not in _TABLES:
            raise ValueError(f"table must be one of {_TABLES}, got {table!r}")
        if frame.empty:
            return
        import io

        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        atomic_write_bytes(self.path / table / f"part-{step:012d}.parquet", buf.getvalue())

    def write_findings(self, findings: Iterable[Finding]) -> None:
        """Replace ``findings.json`` (the findings of the last logged step) atomically."""
        data = [_clean(f.to_dict()) for f in findings]
        atomic_write_bytes(self.path / "findings.json", json.dumps(data, indent=1).encode())

    def append_events(self, events: Iterable[Event | Mapping[str, Any]]) -> None:
        """Append events to ``events.jsonl``, one whole line each, flushed to disk."""
        lines = "".join(json.dumps(_clean(event_dict(e))) + "\n" for e in events)
        if not lines:
            return
        with open(self.path / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


@dataclass(repr=False)
class Run:
    """A run record loaded from a run directory (or built in memory).

    Attributes:
        meta: the contents of ``meta.json``.
        history: one row per (step, site): site-level metrics.
        units: one row per (step, site, unit): activation rate, mean |h|, dormant score...
        layers: one row per (step, layer): parameter-gradient norm, update-to-weight ratio.
        events: finding transitions and interventions, in order (their JSON form).
        path: where it was loaded from (None when built in memory).
        last_findings: the findings of the last logged step (``findings.json``); None for
            a format-1 directory, whose events hold them.
    """

    meta: dict[str, Any]
    history: pd.DataFrame
    units: pd.DataFrame
    layers: pd.DataFrame
    events: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    last_findings: list[Finding] | None = None

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
        return [_finding(e) for e in rows if e["step"] == last]

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


def _finding(data: Mapping[str, Any]) -> Finding:
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
            if "after_step" in e or "step" in e:
                target["after_step"] = e.get("after_step", e.get("step"))
    return out


def _read_table(path: Path) -> pd.DataFrame:
    parts = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
    frames = []
    for p in parts:
        try:
            frames.append(pd.read_parquet(p))
        except Exception:  # a part cut short by a crash: keep the rest
            continue
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load a run directory written by :class:`RunWriter`.

    Raises:
        RunDirError: the path is missing, not a directory, empty, foreign, or written by an
            unsupported format version; the message says which.
    """
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"run directory {str(p)!r} does not exist.")
    if not p.is_dir():
        raise RunDirError(f"run directory {str(p)!r} is not a directory.")
    meta_path = p / "meta.json"
    if not meta_path.is_file():
        what = "is empty" if not any(p.iterdir()) else "has no meta.json"
        raise RunDirError(
            f"{str(p)!r} {what}: it is not a relu_doctor run directory. Pass the directory "
            "given as run_dir= to watch()/ReluDoctor, or made by doc.save()."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{str(meta_path)!r} cannot be read as JSON: {e}.") from None
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise RunDirError(
            f"{str(p)!r} was written in run-directory format {version!r}; this relu_doctor "
            f"reads formats {list(_READABLE_VERSIONS)}. Re-make the report with the relu_doctor version "
            f"that wrote it ({meta.get('versions', {}).get('relu_doctor', 'unknown')})."
        )
    events: list[dict[str, Any]] = []
    ev_path = p / "events.jsonl"
    if ev_path.is_file():
        for line in ev_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    last_findings: list[Finding] | None = None
    f_path = p / "findings.json"
    if f_path.is_file():
        try:
            last_findings = [_finding(d) for d in json.loads(f_path.read_text(encoding="utf-8"))]
        except (OSError, ValueError, TypeError) as e:
            raise RunDirError(f"{str(f_path)!r} cannot be read: {e}.") from None
    elif version == FORMAT_VERSION:
        last_findings = []  # nothing logged yet
    return Run(
        meta=meta,
        history=_read_table(p / "history"),
        units=_read_table(p / "units"),
        layers=_read_table(p / "layers"),
        events=events,
        path=p,
        last_findings=last_findings,
    )
