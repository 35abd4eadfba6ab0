"""Dead readings a remedy can act on: under the overhead budget a logging window may collect
few of its steps, and a unit active on a few inputs in a hundred then reads dead by chance.
:class:`DeadEvidence` pools sampled windows unit by unit until they hold
:data:`MIN_EVIDENCE_STEPS` collected steps; :func:`dead_surge` compares such readings. And the
snapshots of the metrics a change is judged on: :func:`site_snapshot`, :func:`model_snapshot`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from relu_doctor._validate import finite_or_none
from relu_doctor.diagnosis import MOSTLY_STUCK, acted_on, stuck_working, trained_rows

if TYPE_CHECKING:
    from relu_doctor.remedies.base import RecordLike

__all__ = ["MIN_EVIDENCE_STEPS", "SNAPSHOT_KEYS", "DeadEvidence", "dead_surge", "model_snapshot",
           "site_snapshot", "units_efficacy", "units_snapshot"]

#: The site metrics an intervention records before and after.
SNAPSHOT_KEYS = (
    "dead_fraction",
    "lifetime_dead_fraction",
    "dormant_fraction",
    "below_tau_fraction",
    "sparsity",
    "activation_rate",
    "mean_abs",
    "grad_rms",
)


#: The collected steps a dead reading must rest on before a remedy acts on it. A window that
#: collected fewer (the overhead budget sampled it) is pooled with the next ones until they
#: hold this many; a window that collected every step it ran is whole as it is.
MIN_EVIDENCE_STEPS = 8


class DeadEvidence:
    """Dead fractions per site that rest on enough collected steps, of the sites that what
    feeds them is not frozen (a site row's ``frozen``) and whose outputs in the window were
    mostly finite (a site row's ``nonfinite``).

    A unit reads dead when it was never active on what the window saw. On a window that
    collected 2 of its 50 steps, a unit active on 2% of inputs reads dead about half the time,
    so comparing such windows finds "surges" that every-step collection never sees. Sampled
    windows are therefore pooled, unit by unit (dead over the pool: seen in some window of it,
    active in none), until they hold ``min_steps`` collected steps; :meth:`add` answers only
    then. A window that collected every step it ran answers at once, as do records that do
    not say how they were sampled.

    A leaky family's dead unit (stuck negative: GELU, SiLU, ELU, LeakyReLU) counts only where
    its ReDo score is at most tau, as recycling takes it: one scoring above, where fewer than
    half the site's units are stuck (:data:`~relu_doctor.diagnosis.MOSTLY_STUCK`), passes on
    a share of its layer's signal and a gradient (a working unit, not a dead one).

    Example:
        >>> class R:
        ...     site_rows = [{"site": "a", "dead": 1, "units_seen": 4}]
        ...     unit_table = None
        >>> DeadEvidence().add(R())
        {'a': 0.25}
    """

    def __init__(self, min_steps: int = MIN_EVIDENCE_STEPS) -> None:
        self.min_steps = min_steps
        self.steps = 0  # collected steps in the pool
        self.windows = 0  # logging windows in it
        #: the last answer's, over the sites not left out (frozen, mostly non-finite, rare)
        self.model_fraction: float | None = None
        self.model_units = 0  # the units seen that it is of
        #: whether the sites of that fraction differ from the answer's before (not compared)
        self.sites_changed = True
        self._model_sites: set[str] = set()
        self._rare: set[str] = set()  # the record's sites run in few of its passes
        self.pooled = False  # whether the last answer pooled several sampled windows
        self.last_steps: int | None = None  # collected steps it rested on (None: unsaid)
        self._pool: dict[str, tuple[Any, Any]] = {}  # site -> (seen, active) per unit

    def add(self, record: RecordLike) -> dict[str, float] | None:
        """This record's dead fraction per site, or the pool's once it holds enough steps;
        None while a sampled pool is still filling."""
        # A site fed by a frozen part (``frozen``: see Doctor's site rows) is no remedy's to
        # treat while it stays frozen, and its dead units say nothing of how training goes.
        # Nor a site most of whose outputs in the window were NaN or Inf: its units read
        # on the few finite steps left (a sweep trial's diverging run: 98% dead on one
        # step of ten, a bound swap and a learning-rate cut for a dead surge followed; the
        # nonfinite finding is what it is). A rare overflow keeps the site's reading.
        left_out = {str(r["site"]) for r in record.site_rows
                    if r.get("frozen") or _mostly_nonfinite(r)}
        self._rare = _ran_rarely(record)
        seen_rows = [r for r in record.site_rows if r.get("units_seen")]
        rows = [r for r in seen_rows if str(r["site"]) not in left_out]
        # (how the window was sampled, from every site that saw it: one whose sites are all
        # left out is still a sampled window, which answers no pool that is filling)
        collected = [r.get("steps_collected") for r in seen_rows]
        ran = [r.get("steps_run") for r in seen_rows]
        got = max((int(c) for c in collected if c is not None), default=None)
        whole = got is None or any(
            c is not None and n is not None and int(c) >= int(n)
            for c, n in zip(collected, ran, strict=True)
        )
        units = record.unit_table
        poolable = units is not None and {"site", "activation_rate"} <= set(units.columns)
        # A leaky family's unit stuck negative that scores above tau (GELU, SiLU at -1: an
        # output a sizable share of its layer's, and a gradient) beside units that fire is
        # working, not dead: a U-Net trial's healthy GELU feed-forward, 25-36 of 128 units
        # so, median score 0.7, read as a surge, and the plan halved the learning rate (the
        # loss ended 26% worse). Where most are stuck, the score, relative to the layer's
        # mean, is mostly theirs and says nothing (every unit at SiLU(-20) scores 1): all
        # count (diagnosis.stuck_working).
        if not self._pool and (whole or not poolable):
            self.pooled, self.last_steps = False, got
            counts = {str(r["site"]): (int(r.get("dead") or 0) - stuck_working(r),
                                       int(r["units_seen"])) for r in rows}
            return self._answer(counts)
        if poolable:
            leaky = {str(r["site"]) for r in record.site_rows if r.get("leaky")}
            scored = "below_tau" in units.columns
            for site, group in units.groupby("site", sort=False):
                if str(site) in left_out:
                    self._pool.pop(str(site), None)
                    continue
                rate = group["activation_rate"].to_numpy(dtype=float)
                seen, active = ~np.isnan(rate), rate > 0  # NaN: not seen in the window
                few = int((seen & ~active).sum()) < MOSTLY_STUCK * int(seen.sum())
                if str(site) in leaky and scored and few:  # (working, as above; dead: a unit
                    # silent too briefly to tell is not scored, a review)
                    active |= (seen & group["dead"].to_numpy(dtype=bool)
                               & ~group["below_tau"].to_numpy(dtype=bool))
                old = self._pool.get(str(site))
                if old is not None and len(old[0]) == len(seen):
                    seen, active = old[0] | seen, old[1] | active
                self._pool[str(site)] = (seen, active)
        self.steps += got or 0
        self.windows += 1
        if self.steps < self.min_steps and not whole:
            return None
        counts = {
            site: (int((seen & ~active).sum()), int(seen.sum()))
            for site, (seen, active) in self._pool.items() if seen.any()
        }
        self.pooled, self.last_steps = self.windows > 1, self.steps
        self.steps, self.windows, self._pool = 0, 0, {}
        return self._answer(counts)

    def _answer(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Fractions of ``counts`` ((dead, seen) per site); sets :attr:`model_fraction`."""
        # (over the sites that ran in most of the window's passes: one expert starved of
        # tokens, dead on its one batch, read as the model dying: an MoE trial; and said
        # where those sites are not the last answer's, whose fraction it does not compare
        # with: a branch run rarely every other window read as dying, a review)
        kept = {site: c for site, c in counts.items() if site not in self._rare}
        seen = sum(n for _, n in kept.values())
        self.model_fraction = sum(d for d, _ in kept.values()) / seen if seen else None
        self.model_units = seen
        self.sites_changed = set(kept) != self._model_sites
        self._model_sites = set(kept)
        return {site: d / n for site, (d, n) in counts.items()}

    def state_dict(self) -> dict[str, Any]:
        """The pool that is filling (a resumed run goes on with it)."""
        return {"steps": self.steps, "windows": self.windows,
                "pool": {k: [seen.tolist(), active.tolist()] for k, (seen, active) in
                         self._pool.items()},
                "model_sites": sorted(self._model_sites)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.windows = int(state.get("windows", 0))
        self._pool = {str(k): (np.asarray(v[0], dtype=bool), np.asarray(v[1], dtype=bool))
                      for k, v in dict(state.get("pool", {})).items()}
        self._model_sites = {str(s) for s in state.get("model_sites", ())}

    def basis(self) -> str:
        """What the last answer rested on, in words, when it pooled sampled windows ("" when
        it was one window as logged)."""
        if not self.pooled:
            return ""
        return f" (over {self.last_steps} collected steps of sampled windows, pooled)"


def _mostly_nonfinite(row: Mapping[str, Any]) -> bool:
    """Whether at least half the unit-steps of a site row's window were non-finite (its
    ``nonfinite`` against ``units_seen`` times ``steps_collected``; any, where the steps
    are not known)."""
    try:
        bad = float(row.get("nonfinite") or 0)
        steps = row.get("steps_collected")
        return bad > 0 and (steps is None or 2 * bad >= float(row["units_seen"]) * float(steps))
    except (TypeError, ValueError, KeyError):
        return False


def _ran_rarely(record: Any) -> set[str]:
    """The sites the window's findings say ran in fewer than half of its recorded passes
    (a branch taken sometimes, an expert the router starved): their dead fraction rests on
    a few batches, and its rise is no surge (a trial: one expert starved for a window cut
    the whole model's learning rate)."""
    out = set()
    for f in getattr(record, "findings", None) or ():
        ran, of = f.evidence.get("site_passes"), f.evidence.get("passes")
        if isinstance(ran, int) and isinstance(of, int) and 2 * ran < of:
            out.add(f.site)
    return out


def dead_surge(
    dead: Mapping[str, float] | None, prev: dict[str, float], jump: float,
    record: Any = None,
) -> dict[str, Any] | None:
    """The site whose dead fraction (``dead``, from :meth:`DeadEvidence.add`; None while it
    pools) rose the most, by at least ``jump``, since ``prev`` (its previous reading), as
    evidence; None without one. Updates ``prev`` with ``dead``.

    A site that ran in fewer than half of the window's passes (:func:`_ran_rarely`) is
    passed over. A site's first reading is compared with its dead fraction at first sight,
    which
    ``record`` (the record ``dead`` was read from) gives in its
    :attr:`~relu_doctor.history.IntervalRecord.first_dead` (on the site's first call: at
    initialisation for the sites of the first step), kept in ``prev`` until then: units
    dead from the start are no surge. Where none was taken (a compiled forward, a record
    without the field), the first reading is the site's baseline: no surge without a
    "before" to rise from (a compiled model's units dead from initialisation read as one).

    Example:
        >>> prev = {}
        >>> dead_surge({"a": 0.5}, prev, 0.2) is None, dead_surge({"a": 0.8}, prev, 0.2)["jump"]
        (True, 0.30000000000000004)
    """
    for site, frac in (getattr(record, "first_dead", None) or {}).items():
        prev[site] = frac  # (given once per site: again only for a site made anew)
    surge: dict[str, Any] | None = None
    rare = _ran_rarely(record)  # (their rise rests on a few batches: no surge, no baseline)
    for site, frac in (dead or {}).items():
        if not math.isfinite(frac) or site in rare:
            continue
        before = prev.get(site)
        if before is None:  # no reading before this one: the baseline
            prev[site] = frac
            continue
        if frac - before >= jump and (surge is None or frac - before > surge["jump"]):
            surge = {"site": site, "dead_fraction_before": before, "dead_fraction": frac,
                     "jump": frac - before}
        prev[site] = frac
    return surge


def _chosen(record: RecordLike, site: str, units: Sequence[int]) -> Any:
    table = record.unit_table
    if table is None or not len(table) or not units:
        return None
    u = table[table["site"] == site]
    chosen = u[u["unit"].isin(list(units))]
    if "activation_rate" in chosen:  # a unit not seen in the window (its rate NaN) is
        # neither quiet nor not (a review: a site that did not run read 0% quiet)
        chosen = chosen[chosen["activation_rate"].notna()]
    return chosen if len(chosen) else None


def _quiet(chosen: Any) -> float:
    return float((chosen["dead"].astype(bool) | chosen["below_tau"].astype(bool)).sum()) / len(
        chosen)


def units_efficacy(
    record: RecordLike, site: str, units: Sequence[int]
) -> dict[str, Any] | None:
    """Of the ``units`` changed at ``site``, the share still dead, still below tau (ReDo
    score <= tau, dead units included) and still either (``still_quiet``: what a recycler
    chose them by, a leaky family's dead units scoring above tau too) in ``record``: how
    well a recycling took."""
    chosen = _chosen(record, site, units)
    if chosen is None:
        return None
    n = len(chosen)
    return {
        "units": n,
        "still_dead": float(chosen["dead"].astype(bool).sum()) / n,
        "still_below_tau": float(chosen["below_tau"].astype(bool).sum()) / n,
        "still_quiet": _quiet(chosen),
    }


def units_snapshot(
    record: RecordLike, row: Mapping[str, Any], units: Sequence[int]
) -> dict[str, float | None]:
    """:func:`site_snapshot` of the site ``row`` of ``record`` where ``units`` of it are
    about to change, with the share of them dead or below the Doctor's tau then
    (``changed_units_quiet``; None where ``record`` has no unit table): what a recycling is
    judged against one interval later. A recycler choosing by its own rule (its own tau,
    continual backprop's utility) may change units that were not quiet."""
    chosen = _chosen(record, str(row["site"]), units)
    return {**site_snapshot(row),
            "changed_units_quiet": None if chosen is None else _quiet(chosen)}


def site_snapshot(row: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics an intervention records for one site row (None where not measured).

    Example:
        >>> site_snapshot({"dead_fraction": 0.5, "sparsity": float("nan")})["sparsity"] is None
        True
    """
    return {k: finite_or_none(row.get(k)) for k in SNAPSHOT_KEYS}


class Snapshot(dict[str, Any]):
    """A model-wide snapshot (:func:`model_snapshot`): its metrics, and in :attr:`sites` the
    sites they were counted over, so that the window after a change is read over the same
    ones (a backbone unfrozen between them would move every number, no unit changed: a
    review). A plain dict where recorded (an intervention's ``before``)."""

    sites: tuple[str, ...] = ()


def model_snapshot(record: RecordLike, sites: Sequence[str] | None = None) -> Snapshot:
    """Model-wide metrics of one record: unit-weighted dead and dormant fractions over the
    sites that train (:func:`~relu_doctor.diagnosis.trained_rows`: a frozen teacher's dead
    units shrank a student's change to a quarter of itself, a distillation trial), or over
    ``sites`` (a change's before, read again after it), the total parameter-gradient norm
    (when an optimizer is tapped) and whether an exploding-gradient finding is present."""
    kept = set(sites or ())
    rows = (trained_rows(record.site_rows) if not kept
            else [r for r in record.site_rows if str(r["site"]) in kept])
    seen = sum(int(r.get("units_seen") or 0) for r in rows)
    dead = sum(int(r.get("dead") or 0) for r in rows)
    dormant = sum(int(r.get("dormant") or 0) for r in rows)
    grad_norm = None
    layers = record.layer_table
    if layers is not None and len(layers) and "grad_norm" in layers:
        # A layer with no gradient (frozen, in no optimizer) has no norm (NaN, "graded"
        # False): left out; a NaN or Inf of one that has makes the total None, as it should.
        graded = layers["graded"] if "graded" in layers else [True] * len(layers)
        vals = [float(v) for v, g in zip(layers["grad_norm"], graded, strict=True) if bool(g)]
        grad_norm = finite_or_none(math.sqrt(sum(v * v for v in vals))) if vals else None
    out = Snapshot(
        dead_fraction=dead / seen if seen else None,
        dormant_fraction=dormant / seen if seen else None,
        grad_norm=grad_norm,
        exploding_gradient=any(f.kind == "exploding_gradient" and acted_on(f)
                               for f in record.findings),
    )
    out.sites = tuple(str(r["site"]) for r in rows)
    return out
