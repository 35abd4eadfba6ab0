"""One logging interval's record (:class:`IntervalRecord`): what the Doctor hands its
listeners and the remedies decide on, and what a checkpoint's held record is restored as.
Host-side data only; imports the diagnosis and the site keys, nothing of the run directory,
so that :mod:`relu_doctor.remedies` may read it (:mod:`relu_doctor.history` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from relu_doctor.diagnosis import Finding, run_health
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import FindingEvent
from relu_doctor.sites import SiteKey

__all__ = ["WINDOW_COLUMNS", "IntervalRecord", "window_columns", "windows_frame"]


#: The columns of a run's ``windows`` table (:func:`windows_frame`).
WINDOW_COLUMNS = ("step", "steps_run", "steps_collected", "judged")


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
        finding_events: the findings that began, changed severity or ended at this log (a
            look at the open window, ``Doctor.current()``, remembers none of them).
        keys: the :class:`~relu_doctor.sites.SiteKey` of each site, by display name.
        metrics: training metrics of the interval by name (``loss``: the mean of the values
            passed to ``Doctor.step(loss=...)``; ``lr``: the learning rate at the logging
            step; whatever was given to ``Doctor.log_metrics``), for the run's ``metrics``
            table; finite values only (one NaN or infinite is left out, warned once).
        window_loss: the window's mean training loss, NaN included: the mean of
            ``Doctor.step(loss=...)``'s (or of a ``loss`` given to ``log_metrics``: Keras'),
            or an integration's measure (the HF callback's, from the model output's
            ``loss``: the Trainer logs its own after the remedies judged); what a remedy's
            change is judged on. None where the window has none.
        final: logged at or after training's last optimizer step (``Doctor.step(last=True)``,
            ``Doctor.log_final()``, a ``with`` block's exit): remedies judge earlier
            interventions on it and hold it, changing nothing; if training goes on they
            decide on it at the end of the next step (``Remedy.release_held``).
        judged: the window saw something (elements or non-finite calls at some site),
            summed across every process where there are several. A window that saw nothing
            (no step of it collected, or no pass of the watched stream ran), or that each
            process read alone (they did not hold the same sites), is kept
            (``Doctor.records``, the run directory, TensorBoard) for its steps and training
            metrics, but judges nothing: its ``findings`` are the last judged window's, it
            goes to no listener (remedies, the integrations' logs), and ``to_pandas()`` reads
            the last judged window instead.
        steps_run: the steps the window ran, collecting or not.
        steps_collected: those in which statistics were collected (a pass of the watched
            stream was recorded); the site rows say it too, where there are sites.
        first_dead: for each site whose first call this window holds (at the first log:
            every site of the first step, the model at initialisation), the share of its
            units never active on that call, summed across processes: the baseline a
            remedy compares the site's first dead fraction with (a unit dead from the start
            is no surge).
        overhead: relu_doctor's own cost as a share of a training step, by the overhead
            budget's estimate at this log (collecting at the rate in use, logging and the
            work at every step: ``Sampler.overhead``); None under a fixed rate, or before
            a collecting step was timed. In the ``windows`` table (NaN there).
    """

    step: int
    site_rows: list[dict[str, Any]]
    unit_table: pd.DataFrame
    layer_table: pd.DataFrame
    findings: list[Finding]
    new_findings: list[Finding] = field(default_factory=list)
    finding_events: list[FindingEvent] = field(default_factory=list)
    keys: dict[str, SiteKey] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    window_loss: float | None = None
    final: bool = False
    judged: bool = True
    steps_run: int = 0
    steps_collected: int = 0
    first_dead: dict[str, float] = field(default_factory=dict)
    overhead: float | None = None

    @property
    def health(self) -> dict[str, float]:
        """The run-level numbers of this log (:func:`~relu_doctor.diagnosis.run_health`):
        ``health`` (the share of units alive, a leaky family's working stuck units among
        them, 0 where a non-finite value was seen),
        ``dead_fraction``, ``dormant_fraction``, ``lifetime_dead_fraction``; what the
        integrations log as ``relu_doctor/health``... and a plain loop reads here (a
        hyperparameter search's pruning signal: ``doc.records[-1].health``).

        Example:
            >>> import pandas as pd
            >>> r = IntervalRecord(10, [{"units": 4, "units_seen": 4, "dead": 1, "dormant": 0,
            ...                          "lifetime_dead": 0}], pd.DataFrame(), pd.DataFrame(), [])
            >>> r.health["health"], r.health["dead_fraction"]
            (0.75, 0.25)
        """
        return run_health(self.site_rows, self.findings)

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


def window_columns(record: IntervalRecord) -> dict[str, list[Any]]:
    """The record's row of the run's ``windows`` table, as columns: every log has one, with
    or without sites (its steps run and collected, and whether it judged)."""
    values = (record.step, record.steps_run, record.steps_collected, record.judged)
    columns: dict[str, list[Any]] = {c: [v] for c, v in zip(WINDOW_COLUMNS, values, strict=True)}
    # (not required of a run's parts: runs written before it have none)
    columns["overhead"] = [float("nan") if record.overhead is None else float(record.overhead)]
    return columns


def windows_frame(record: IntervalRecord) -> pd.DataFrame:
    """:func:`window_columns` as a DataFrame."""
    return pd.DataFrame(window_columns(record))
