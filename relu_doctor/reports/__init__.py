"""Presentation: TensorBoard, plots and the HTML report. Reads run records only: it never
touches a model, a hook or a device tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relu_doctor.reports.html import Report, render_report, write_report
    from relu_doctor.reports.text import summary

__all__ = ["Report", "render_report", "summary", "write_report"]

_LAZY = {
    "Report": "relu_doctor.reports.html",
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
