"""A remedy's held record as plain data for a checkpoint, and back.

A ``final`` record (logged at or after training's last optimizer step) is held by each
remedy, not decided on, and decided on if training goes on (``Remedy.release_held``). A run
resumed from a checkpoint saved after that step must find it: :func:`record_state` writes
it as numbers, strings, lists, dicts and tensors only (``torch.load(weights_only=True)``
reads them; ``NaN`` stays ``NaN``), :func:`record_from_state` makes the
:class:`~relu_doctor.record.IntervalRecord` again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from relu_doctor.diagnosis import Finding
from relu_doctor.record import IntervalRecord
from relu_doctor.sites import SiteKey

__all__ = ["record_from_state", "record_state"]


def record_state(record: Any) -> dict[str, Any]:
    """``record`` (an interval record, or anything the remedies read as one) as plain data:
    table columns as tensors (numbers, bools) or lists (the rest)."""
    rows = [_plain(dict(r)) for r in record.site_rows]
    keys = getattr(record, "keys", None) or {str(r["site"]): record.key(str(r["site"])) for r in rows}
    return {
        "step": int(record.step),
        "final": bool(getattr(record, "final", False)),
        "site_rows": rows,
        "units": _table_state(record.unit_table),
        "layers": _table_state(record.layer_table),
        "findings": [_plain(f.to_dict()) for f in record.findings],
        "new_findings": [_plain(f.to_dict()) for f in getattr(record, "new_findings", [])],
        "keys": {str(name): key.token() for name, key in keys.items()},
        "metrics": _plain(dict(getattr(record, "metrics", None) or {})),
    }


def record_from_state(state: Mapping[str, Any]) -> IntervalRecord:
    """The record :func:`record_state` wrote."""
    fields = Finding.__dataclass_fields__

    def findings(name: str) -> list[Finding]:
        return [Finding(**{k: f[k] for k in fields if k in f}) for f in state.get(name, [])]

    return IntervalRecord(
        step=int(state["step"]),
        site_rows=[dict(r) for r in state.get("site_rows", [])],
        unit_table=_table_from_state(state.get("units")),
        layer_table=_table_from_state(state.get("layers")),
        findings=findings("findings"),
        new_findings=findings("new_findings"),
        keys={str(n): SiteKey.from_token(str(t)) for n, t in state.get("keys", {}).items()},
        metrics=dict(state.get("metrics", {})),
        final=bool(state.get("final", True)),
    )


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars made Python numbers (NaN kept), recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _table_state(table: pd.DataFrame | None) -> dict[str, Any] | None:
    if table is None:
        return None
    cols: dict[str, Any] = {}
    for name in table.columns:
        col = table[name]
        kind = getattr(col.dtype, "kind", "O")
        if kind in "biuf":
            values = col.to_numpy()
            cols[str(name)] = torch.from_numpy(values.astype("int64" if kind == "u" else values.dtype))
        else:
            cols[str(name)] = _plain(col.astype(object).tolist())
    return {"columns": cols, "rows": len(table)}


def _table_from_state(state: Mapping[str, Any] | None) -> pd.DataFrame:
    if not state:
        return pd.DataFrame()
    cols = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["columns"].items()}
    return pd.DataFrame(cols, index=range(int(state["rows"])))
