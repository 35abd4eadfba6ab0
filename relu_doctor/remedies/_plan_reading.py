"""What the treatment plan reads of a record: a view of some sites, and the units its
recycle step takes (:mod:`relu_doctor.remedies.plan`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from relu_doctor.families import FAMILIES
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


def dead_give_zero(row: Mapping[str, Any]) -> bool:
    """Whether a dead unit of the site row's family (never above 0) outputs 0, so that
    recycling it cannot change the network's output: a family whose output is never
    negative (ReLU, ReLU6). A leaky family's dead units (ELU's near -1, a LeakyReLU's slope,
    GELU's) and a Hardtanh's (-1) give the network what zeroing their outgoing weights takes
    away: a GNN trial's plan moved a model's outputs by 10-13 recycling dead ELU and Hardtanh
    units (a sum over a node's edges multiplies their constant by its degree). Those are
    recycled where their ReDo score is at most tau (ReDo's own criterion), outputs near 0."""
    fam = FAMILIES.get(str(row.get("family")))
    return fam is not None and fam.nonnegative


def most_dormant(units: pd.DataFrame, row: Mapping[str, Any], max_fraction: float) -> list[int]:
    """The units of ``row``'s site to recycle once its dead fraction passed the step's
    threshold: the dead ones whatever their ReDo score where they output 0
    (:func:`dead_give_zero`: it is their deadness the step acts on), then those below tau
    (ReDo's criterion) by score, at most ``max_fraction`` of its units."""
    site, n = str(row["site"]), int(row["units"])
    u = units[units["site"] == site]
    dead = u["dead"].astype(bool) & dead_give_zero(row)
    keep = dead | u["below_tau"].astype(bool)
    u = u[keep].assign(_alive=~dead[keep])  # (an empty frame assigned a longer column grows)
    if not len(u):
        return []
    limit = max(1, math.floor(max_fraction * n))
    u = u.sort_values(["_alive", "dormant_score", "unit"], na_position="first",
                      kind="stable").head(limit)
    return sorted(int(i) for i in u["unit"])
