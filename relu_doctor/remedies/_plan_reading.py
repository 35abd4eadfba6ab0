"""What the treatment plan reads of a record: a view of some sites, and the units its
recycle step takes (:mod:`relu_doctor.remedies.plan`)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from relu_doctor.remedies.base import MODEL, RecordLike
from relu_doctor.sites import SiteKey

__all__ = ["View", "most_dormant"]


class View:
    """A record restricted to some sites (what a remedy may act on this interval)."""

    def __init__(self, record: RecordLike, sites: set[str]) -> None:
        self._r = record
        self._sites = sites

    @property
    def step(self) -> int:
        return self._r.step

    @property
    def site_rows(self) -> list[dict[str, Any]]:
        return [r for r in self._r.site_rows if str(r["site"]) in self._sites]

    @property
    def unit_table(self) -> Any:
        t = self._r.unit_table
        return t if t is None or not len(t) else t[t["site"].isin(list(self._sites))]

    @property
    def layer_table(self) -> Any:
        return self._r.layer_table

    @property
    def findings(self) -> list[Any]:
        return [f for f in self._r.findings if f.site in self._sites or f.site == MODEL]

    def site_row(self, name: str) -> dict[str, Any] | None:
        return self._r.site_row(name) if name in self._sites else None

    def key(self, name: str) -> SiteKey:
        return self._r.key(name)


def most_dormant(units: pd.DataFrame, site: str, max_fraction: float, n: int) -> list[int]:
    """The units of ``site`` to recycle once its dead fraction passed the step's threshold:
    the dead ones whatever their ReDo score (a leaky family's units stuck negative score
    above tau, and it is their deadness the step acts on), then those below tau (ReDo's
    criterion) by score, at most ``max_fraction`` of its ``n`` units."""
    u = units[units["site"] == site]
    dead = u["dead"].astype(bool)
    u = u[dead | u["below_tau"].astype(bool)].assign(_alive=~dead)
    if not len(u):
        return []
    limit = max(1, math.floor(max_fraction * n))
    u = u.sort_values(["_alive", "dormant_score", "unit"], na_position="first",
                      kind="stable").head(limit)
    return sorted(int(i) for i in u["unit"])
