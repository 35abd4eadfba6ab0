"""``Report``: a run's report as one object that shows inline in Jupyter, saves as HTML and
prints a terminal summary, all from one report context built once.

Example (the last expression of a notebook cell shows the report inline)::

    >>> Report("runs/exp1")                      # doctest: +SKIP
    >>> Report("runs/exp1").save("exp1.html")    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from relu_doctor._validate import path_or_none
from relu_doctor.history import Run, atomic_write_bytes
from relu_doctor.reports.context import ReportContext, as_run, build_context
from relu_doctor.reports.html import render_context, report_path
from relu_doctor.reports.text import summary

__all__ = ["Report"]


class Report:
    """A run's report: shows inline in Jupyter, saves as a self-contained HTML file.

    Args:
        run: a run record, or the path of a run directory.
    """

    def __init__(self, run: Run | str | os.PathLike[str]) -> None:
        self.run = as_run(run)
        self._context: ReportContext | None = None
        self._html: str | None = None
        self._fragment: str | None = None

    @property
    def context(self) -> ReportContext:
        """The report as plain data (built on first use)."""
        if self._context is None:
            self._context = build_context(self.run)
        return self._context

    def html(self, *, progress: Callable[[str], object] | None = None) -> str:
        """The whole standalone document; ``progress`` is called with a line before each
        figure is drawn ("drawing figure 3 of 16": a report of many sites takes a while)."""
        if self._html is None:
            self._html = render_context(self.context, progress=progress)
        return self._html

    def _repr_html_(self) -> str:
        if self._fragment is None:
            self._fragment = render_context(self.context, standalone=False)
        return self._fragment

    def save(self, path: str | os.PathLike[str] | None = None, *,
             progress: Callable[[str], object] | None = None) -> Path:
        """Write the standalone document (default ``<run directory>/report.html``);
        ``progress`` as in :meth:`html`."""
        path_or_none("path", path)
        out = report_path(self.run, path, "path")
        atomic_write_bytes(out, self.html(progress=progress).encode("utf-8"))
        return out

    def summary(self) -> str:
        """A short plain-text summary for a terminal."""
        return summary(self.context)

    def __repr__(self) -> str:
        where = self.run.path if self.run.path is not None else "in memory"
        return f"Report({str(where)!r}, steps={self.run.last_step})"
