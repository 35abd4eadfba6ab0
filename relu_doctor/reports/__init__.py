"""Presentation: TensorBoard, plots, the HTML report and the terminal summary. Reads run
records only (through :mod:`relu_doctor.history`): it never touches a model, a hook or a
device tensor.

``context`` turns a run into the report as plain data; ``html``, ``text`` and ``plots`` read
that; ``report`` (the notebook object) puts them together; ``tensorboard`` writes event files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relu_doctor.reports.context import ReportContext, build_context
    from relu_doctor.reports.html import render_report, write_report
    from relu_doctor.reports.report import Report
    from relu_doctor.reports.text import summary

__all__ = ["Report", "ReportContext", "build_context", "render_report", "summary", "write_report"]

_LAZY = {
    "Report": "relu_doctor.reports.report",
    "ReportContext": "relu_doctor.reports.context",
    "build_context": "relu_doctor.reports.context",
    "render_report": "relu_doctor.reports.html",
    "write_report": "relu_doctor.reports.html",
    "summary": "relu_doctor.reports.text",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing relu_doctor.reports.tensorboard (the Lightning callback does, at
    # every run) does not import Jinja2 and the report machinery.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
