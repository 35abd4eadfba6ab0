"""Read-time maths: what the accumulated sums mean, computed once.

:mod:`relu_doctor.stats` keeps per-unit sums and counts on the device; at a logging step they
are read back to the host, and this module turns them into rates, means and the per-unit
verdicts every later layer reads (diagnosis, the run record, remedies, reports): activation
rate, mean |h|, ReDo dormant score, dead, dormant, below tau, lifetime dead, saturation,
gradient RMS. Pure functions over host float64 tensors; nothing here touches a model or a device.

Definitions (README, Words): **dead** over a window = seen and never active; **lifetime dead** =
seen since monitoring began and never active; **below tau** = ReDo score <= tau with
score_i = mean|h_i| / mean_k mean|h_k| over the units seen in the window (ReDo's recycling
criterion: dead units whose |h| is small are below tau too); **dormant** = below tau but not
dead (active, yet contributing little).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from relu_doctor.stats import ROW

__all__ = [
    "UNIT_COLUMNS",
    "layer_metrics",
    "metrics_of_stacked",
    "site_metrics",
    "stacked_metrics",
    "unit_metrics",
]

# Per-unit metrics written to the run record's unit table, in order.
UNIT_COLUMNS: tuple[str, ...] = (
    "activation_rate",
    "mean_abs",
    "dormant_score",
    "saturation_rate",
    "grad_rms",
    "grad_zero_rate",
    "dead",
    "dormant",
    "below_tau",
    "lifetime_dead",
)


def unit_metrics(window: torch.Tensor, lifetime: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """Per-unit metrics of one site.

    Args:
        window: ``(len(FIELDS), units)`` sums over the window.
        lifetime: the same since monitoring began, the window included.
        tau: dormant threshold on the ReDo score.

    Returns:
        float64 CPU tensors (NaN where a unit saw no elements): ``activation_rate``,
        ``mean``, ``mean_abs``, ``rms``, ``saturation_rate``, ``dormant_score``,
        ``grad_rms`` (root mean square of dL/d(output) per element), ``grad_zero_rate``,
        ``nonfinite``, ``grad_nonfinite``; boolean ``seen``, ``dead`` (seen and never
        active), ``below_tau`` (seen and score <= tau, dead units included), ``dormant``
        (below tau and not dead), ``fully_saturated``, ``lifetime_dead``.
    """

    def score_of(mean_abs: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        nan = torch.full_like(mean_abs, float("nan"))
        seen_abs = mean_abs[seen]
        avg = seen_abs.mean() if seen_abs.numel() else torch.tensor(float("nan"), dtype=torch.float64)
        return torch.where(seen, mean_abs / avg, nan) if bool(avg > 0) else torch.where(seen, 0.0, nan)

    return _units(
        window.detach().to("cpu", torch.float64), lifetime.detach().to("cpu", torch.float64),
        tau, score_of,
    )


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b > 0``, else NaN."""
    return torch.where(b > 0, a / b.clamp(min=1), torch.full_like(b, float("nan")))


def _units(
    m: torch.Tensor,
    life: torch.Tensor,
    tau: float,
    score_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inconclusive: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The :func:`unit_metrics` dict of host float64 sums ``m`` (window) and ``life``
    (lifetime); ``score_of(mean_abs, seen)`` gives the ReDo score (it averages per site).
    ``inconclusive``: the units of a sampled window whose silence is too short to call them
    dead (:mod:`relu_doctor._silence`): neither dead nor below tau."""
    r = {name: m[i] for name, i in ROW.items()}
    n = r["elements"]
    seen = n > 0
    ratio = _ratio
    mean_abs = ratio(r["sum_abs"], n)
    score = score_of(mean_abs, seen)
    active = r["active"]
    dead = seen & (active == 0)
    below_tau = seen & (score <= tau)
    if inconclusive is not None:
        dead &= ~inconclusive
        below_tau &= ~inconclusive
    return {
        "seen": seen,
        "activation_rate": ratio(active, n),
        "mean": ratio(r["sum"], n),
        "mean_abs": mean_abs,
        "rms": ratio(r["sum_sq"], n).sqrt(),
        "saturation_rate": ratio(r["saturated"], n),
        "dormant_score": score,
        "dead": dead,
        "dormant": below_tau & ~dead,
        "below_tau": below_tau,
        "fully_saturated": seen & (r["saturated"] == n),
        "lifetime_dead": (life[ROW["elements"]] > 0) & (life[ROW["active"]] == 0),
        "grad_rms": ratio(r["grad_sq"], r["grad_elements"]).sqrt(),
        "grad_zero_rate": ratio(r["grad_zero"], r["grad_in_elements"]),
        "nonfinite": r["nonfinite"],
        "grad_nonfinite": r["grad_nonfinite"],
    }


def site_metrics(window: torch.Tensor, units: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Site-level metrics of one site over a window.

    Args:
        window: ``(len(FIELDS), units)`` sums over the window.
        units: :func:`unit_metrics` of the same site.

    Returns:
        A flat dict: ``units``, ``units_seen``, ``elements``, ``dead``, ``dead_fraction``,
        ``lifetime_dead``, ``lifetime_dead_fraction``, ``dormant``, ``dormant_fraction``,
        ``below_tau``, ``below_tau_fraction``, ``dead_above_tau``, ``sparsity``,
        ``activation_rate``, ``mean_abs``, ``rms``, ``saturated_fraction``,
        ``fully_saturated``, ``grad_rms``, ``grad_zero_fraction``, ``nonfinite``,
        ``grad_nonfinite`` (NaN where nothing was seen).
    """
    w = window.detach().to("cpu", torch.float64)
    n_units = w.shape[1]
    seen = int(units["seen"].sum())
    n = float(w[ROW["elements"]].sum())
    active = float(w[ROW["active"]].sum())
    gel = float(w[ROW["grad_elements"]].sum())
    gin = float(w[ROW["grad_in_elements"]].sum())
    life_dead = units["lifetime_dead"]
    nan = float("nan")
    return {
        "units": n_units,
        "units_seen": seen,
        "elements": n,
        "dead": int(units["dead"].sum()),
        "dead_fraction": float(units["dead"].sum()) / seen if seen else nan,
        "inconclusive": 0,  # (one site's window read alone: judged by the definition)
        "lifetime_dead": int(life_dead.sum()),
        "lifetime_dead_fraction": float(life_dead.sum()) / n_units if n_units else nan,
        "dormant": int(units["dormant"].sum()),
        "dormant_fraction": float(units["dormant"].sum()) / seen if seen else nan,
        "below_tau": int(units["below_tau"].sum()),
        "below_tau_fraction": float(units["below_tau"].sum()) / seen if seen else nan,
        "dead_above_tau": int((units["dead"] & ~units["below_tau"]).sum()),
        "sparsity": 1.0 - active / n if n else nan,
        "activation_rate": active / n if n else nan,
        "mean_abs": float(w[ROW["sum_abs"]].sum()) / n if n else nan,
        "rms": math.sqrt(float(w[ROW["sum_sq"]].sum()) / n) if n else nan,
        "saturated_fraction": float(w[ROW["saturated"]].sum()) / n if n else nan,
        "fully_saturated": int(units["fully_saturated"].sum()),
        "grad_rms": math.sqrt(float(w[ROW["grad_sq"]].sum()) / gel) if gel else nan,
        "grad_zero_fraction": float(w[ROW["grad_zero"]].sum()) / gin if gin else nan,
        "nonfinite": int(w[ROW["nonfinite"]].sum()),
        "grad_nonfinite": int(w[ROW["grad_nonfinite"]].sum()),
    }


def layer_metrics(
    names: Sequence[str],
    grad_sq: torch.Tensor,
    steps: int | Sequence[int],
    world: int,
    update_ratio: torch.Tensor | None,
    graded: Collection[int] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Per-layer gradient norms and update ratios of one window, and the total norm.

    Args:
        names: the layers, in the order of ``grad_sq``.
        grad_sq: squared gradient norm per layer summed over the window's steps (and
            processes).
        steps: optimizer steps summed into ``grad_sq`` on one process: one count, or one
            per layer (the steps of the optimizer holding it).
        world: number of processes summed into ``grad_sq``.
        update_ratio: ``||W_after - W_before|| / ||W_after||`` per layer at the last step
            (estimated from a sample of a tensor over ``optimizer_tap.UPDATE_SAMPLE``
            elements), or None.
        graded: the layers a gradient was read for (None: all); the others (frozen, or
            in no optimizer) have a NaN gradient norm, not 0, and are left out of the total.

    Returns:
        ``(rows, total)``: one ``{"layer", "grad_norm", "update_ratio", "graded"}`` dict
        per layer (the RMS over steps of the gradient norm; whether it had a gradient) and
        the norm over the layers that had one.
    """
    g = grad_sq.detach().to("cpu", torch.float64)
    per = [steps] * len(names) if isinstance(steps, int) else list(steps)
    read = [graded is None or i in graded for i in range(len(names))]
    norms = [math.sqrt(float(g[i]) / (max(per[i], 1) * world)) if read[i] else math.nan
             for i in range(len(names))]
    rows: list[dict[str, Any]] = [
        {
            "layer": name,
            "grad_norm": norm,
            "update_ratio": float(update_ratio[i]) if update_ratio is not None else float("nan"),
            "graded": read[i],
        }
        for i, (name, norm) in enumerate(zip(names, norms, strict=True))
    ]
    # (a NaN or Inf gradient of a layer that has one stays in the total: it is the news)
    return rows, math.sqrt(sum(n**2 for n, r in zip(norms, read, strict=True) if r))


class SiteUnits(Mapping[str, torch.Tensor]):
    """One site's per-unit metrics (the dict :func:`unit_metrics` returns) as views into the
    metrics of every site side by side (``stacked``, columns ``start:stop``).

    A view is made when a metric is first read: a logging step of a 256-site model reads few
    of them (diagnosis reads a mask only for the sites it reports on), and the unit table
    copies the stacked tensors whole.
    """

    __slots__ = ("_shared", "_views", "stacked", "start", "stop")

    def __init__(
        self,
        stacked: Mapping[str, torch.Tensor],
        start: int,
        stop: int,
        nonzero: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> None:
        self.stacked, self.start, self.stop = stacked, start, stop
        self._views: dict[str, torch.Tensor] = {}
        self._shared = {} if nonzero is None else nonzero  # shared by the sites of stacked

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self.stacked[name][self.start : self.stop]
        return view

    def __contains__(self, name: object) -> bool:  # (Mapping's would make a view)
        return name in self.stacked

    def __iter__(self) -> Iterator[str]:
        return iter(self.stacked)

    def __len__(self) -> int:
        return len(self.stacked)

    def nonzero(self, name: str, limit: int) -> list[int]:
        """The first ``limit`` units (indices within this site) where metric ``name`` is
        nonzero. One ``nonzero`` over every site's units serves all sites: a logging step
        that reports on hundreds of sites does not pay a tensor op per site."""
        nz = self._shared.get(name)
        if nz is None:
            nz = self._shared[name] = torch.nonzero(self.stacked[name]).flatten().numpy()
        lo, hi = nz.searchsorted((self.start, self.stop))
        return (nz[lo : min(hi, lo + limit)] - self.start).tolist()  # type: ignore[no-any-return]

    def count(self, name: str, unless: str | None = None) -> int:
        """How many of this site's units have metric ``name`` nonzero (and ``unless`` zero).
        As :meth:`nonzero`, one cumulative sum over every site's units serves all sites."""
        key = f"count {name} unless {unless}"
        ends = self._shared.get(key)
        if ends is None:
            hit = self.stacked[name] != 0
            if unless is not None:
                hit &= self.stacked[unless] == 0
            ends = self._shared[key] = np.concatenate(([0], np.cumsum(hit.numpy())))
        return int(ends[self.stop] - ends[self.start])


def stacked_metrics(
    windows: Sequence[torch.Tensor],
    lifetimes: Sequence[torch.Tensor],
    tau: float,
    *,
    lifetime_has_window: bool = True,
) -> tuple[list[SiteUnits], list[dict[str, Any]]]:
    """:func:`unit_metrics` and :func:`site_metrics` of many sites at once.

    The sites' units are laid side by side in one ``(len(FIELDS), total units)`` matrix, so
    each metric is one tensor op over every site (a logging step of a 256-site model does
    not loop over sites in tensor code), and per-site sums are one ``index_add``. The
    results equal the per-site functions' (sums may be regrouped: float64 rounding only).

    Args:
        windows: each site's ``(len(FIELDS), units)`` window sums (host float64).
        lifetimes: each site's lifetime sums, the window included unless
            ``lifetime_has_window`` is False (then it is added here, in one op).
        tau: dormant threshold on the ReDo score.

    Returns:
        ``(units, sites)``: per site, what :func:`unit_metrics` returns (as a
        :class:`SiteUnits` of views into shared tensors) and the dict :func:`site_metrics`
        returns.
    """
    if not windows:
        return [], []
    return metrics_of_stacked(
        torch.cat([w.detach().to("cpu", torch.float64) for w in windows], 1),
        torch.cat([t.detach().to("cpu", torch.float64) for t in lifetimes], 1),
        [int(w.shape[1]) for w in windows],
        tau,
        lifetime_has_window=lifetime_has_window,
    )


def metrics_of_stacked(
    m: torch.Tensor,
    life: torch.Tensor,
    sizes: Sequence[int],
    tau: float,
    *,
    lifetime_has_window: bool = True,
    inconclusive: torch.Tensor | None = None,
) -> tuple[list[SiteUnits], list[dict[str, Any]]]:
    """:func:`stacked_metrics` of sites whose windows and lifetimes are already side by
    side: ``m`` and ``life`` are ``(len(FIELDS), sum(sizes))`` host float64 matrices, the
    sites' columns in order (``life`` is added to in place when ``lifetime_has_window`` is
    False). ``inconclusive``: a boolean per column, the silent units of a sampled window
    not judged dead (:mod:`relu_doctor._silence`), counted in each row's
    ``inconclusive``."""
    if not sizes:
        return [], []
    k = len(sizes)
    if not lifetime_has_window:
        life += m
    seg = torch.repeat_interleave(torch.arange(k), torch.tensor(sizes, dtype=torch.long))
    # the sites' columns are contiguous: numpy's reduceat sums each run (a tenth of the time
    # of index_add_ along the last dim: a 256-site log spent 2 ms in it); a site of no unit
    # has no run (reduceat would give it its neighbour's first column)
    has = np.asarray(sizes) > 0
    starts = (np.cumsum(sizes) - np.asarray(sizes, dtype=np.int64))[has]

    def per_site(x: torch.Tensor) -> torch.Tensor:
        out = np.zeros((*x.shape[:-1], k))
        if starts.size:
            out[..., has] = np.add.reduceat(x.double().numpy(), starts, axis=-1)
        return torch.from_numpy(out)

    seen_count = per_site(m[ROW["elements"]] > 0)

    def score_of(mean_abs: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        nan = torch.full_like(mean_abs, float("nan"))
        avg = (per_site(torch.where(seen, mean_abs, 0.0)) / seen_count)[seg]  # NaN: none seen
        return torch.where(avg > 0, torch.where(seen, mean_abs / avg, nan), torch.where(seen, 0.0, nan))

    u = _units(m, life, tau, score_of, inconclusive)
    ends = torch.tensor(sizes).cumsum(0).tolist()
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))
    shared: dict[str, np.ndarray[Any, Any]] = {}
    units = [SiteUnits(u, a, b, shared) for a, b in bounds]
    sums = per_site(m).T.tolist()  # (k, len(FIELDS)): one read of every per-site sum
    flags = ("dead", "dormant", "below_tau", "fully_saturated", "lifetime_dead")
    unsure = inconclusive if inconclusive is not None else torch.zeros_like(u["dead"])
    counts = per_site(torch.stack([*(u[f] for f in flags), unsure,
                                   u["dead"] & ~u["below_tau"]])).T.tolist()
    seen_list = seen_count.tolist()
    rows: list[dict[str, Any]] = []
    nanf = float("nan")
    for i in range(k):
        w = sums[i]
        dead, dormant, below, full, life_dead, unsure_n, dead_above = counts[i]
        n_units, sn = sizes[i], int(seen_list[i])
        el, act = w[ROW["elements"]], w[ROW["active"]]
        gel, gin = w[ROW["grad_elements"]], w[ROW["grad_in_elements"]]
        rows.append(
            {
                "units": n_units,
                "units_seen": sn,
                "elements": el,
                "dead": int(dead),
                "dead_fraction": dead / sn if sn else nanf,
                # silent units of a sampled window with too few outputs to call dead
                "inconclusive": int(unsure_n),
                "lifetime_dead": int(life_dead),
                "lifetime_dead_fraction": life_dead / n_units if n_units else nanf,
                "dormant": int(dormant),
                "dormant_fraction": dormant / sn if sn else nanf,
                "below_tau": int(below),
                "below_tau_fraction": below / sn if sn else nanf,
                # dead units scoring above tau: a leaky family's stuck negative, their
                # outputs a share of the layer's mean |h| (see diagnosis.stuck_working)
                "dead_above_tau": int(dead_above),
                "sparsity": 1.0 - act / el if el else nanf,
                "activation_rate": act / el if el else nanf,
                "mean_abs": w[ROW["sum_abs"]] / el if el else nanf,
                "rms": math.sqrt(w[ROW["sum_sq"]] / el) if el else nanf,
                "saturated_fraction": w[ROW["saturated"]] / el if el else nanf,
                "fully_saturated": int(full),
                "grad_rms": math.sqrt(w[ROW["grad_sq"]] / gel) if gel else nanf,
                "grad_zero_fraction": w[ROW["grad_zero"]] / gin if gin else nanf,
                "nonfinite": int(w[ROW["nonfinite"]]),
                "grad_nonfinite": int(w[ROW["grad_nonfinite"]]),
            }
        )
    return units, rows
