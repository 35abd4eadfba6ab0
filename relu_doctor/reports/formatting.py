"""Numbers and values formatted for the report, once: the HTML table and the terminal summary
print the same cell for the same number, and the report's data island holds plain JSON.

Example:
    >>> fmt_pct(0.125), fmt_num(0.012345), fmt_int(4.0)
    ('12.5%', '0.0123', '4')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from relu_doctor._validate import finite_or_none

__all__ = ["UNIT_LISTS", "fmt_int", "fmt_num", "fmt_pct", "fmt_value", "json_safe"]

# The evidence keys under which diagnosis lists unit indices (at most _UNIT_LIST_LIMIT).
UNIT_LISTS = ("dead_units", "dormant_units", "saturated_units", "units")
_UNIT_LIST_LIMIT = 64


def fmt_pct(v: Any) -> str:
    """``0.125`` -> ``'12.5%'``; missing or NaN -> ``'—'``."""
    f = None if isinstance(v, bool) else finite_or_none(v)
    return "—" if f is None else f"{f:.1%}"


def fmt_num(v: Any) -> str:
    """Three significant digits; integers as integers; missing or NaN -> ``'—'``."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = finite_or_none(v)
    if f is None:
        return "—"
    if f == int(f) and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.3g}"


def fmt_int(v: Any) -> str:
    """An integer count; missing or NaN -> ``'—'``."""
    f = None if isinstance(v, bool) else finite_or_none(v)
    return "—" if f is None else str(int(f))


def fmt_value(key: str, v: Any, total: int | None = None) -> str:
    """``v`` in words; a unit list says when it holds only the first of ``total`` units
    (unknown: when it is as long as diagnosis lists at most)."""
    if isinstance(v, (list, tuple)):
        if key in UNIT_LISTS and all(isinstance(x, (int, float)) for x in v):
            text = ", ".join(str(int(x)) for x in v)
            more = len(v) >= _UNIT_LIST_LIMIT if total is None else total > len(v)
            return text + (f" … (first {len(v)} of {total or 'more'} listed)" if more else "")
        return ", ".join(fmt_value("", x) for x in v)
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {fmt_value(str(k), x)}" for k, x in v.items())
    if isinstance(v, str):
        return v
    if key.endswith("fraction") or key in ("sparsity", "threshold"):
        return fmt_pct(v)
    return fmt_num(v)


def json_safe(v: Any) -> Any:
    """Plain JSON data for the report's data island: NaN/Inf as null, numpy as Python."""
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return finite_or_none(v)
    if v is None or isinstance(v, (int, str)):
        return v
    return str(v)
