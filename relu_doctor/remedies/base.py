"""The remedy protocol: decide from an interval record, act, record what was done.

A remedy controller (:class:`Remedy`) is a :class:`~relu_doctor.doctor.Doctor` listener:
:meth:`Remedy.bind` registers it, and every logging interval then calls it with the
interval's record. It decides from that record only (records are built from statistics
summed across processes, so every rank takes the same decision), acts on the model, the
optimizer or the gradients, and records each change as a typed
:class:`~relu_doctor.events.Intervention` with the metrics it targets before the change. The
interventions waiting for their metrics after (measured at the next interval) are owned here,
by the :class:`Remedy` base, and completed as
:class:`~relu_doctor.events.InterventionResult` events; nothing else keeps them.

A site is identified by its :class:`~relu_doctor.sites.SiteKey`, never by parsing its display
name: from a record (``record.key(name)``) or from the bound Doctor (``doctor.site_key``).

Under DDP every rank acts the same: the same record, random draws from generators seeded
the same on every rank, never the global RNG. A remedy that cannot act on parameters sharded
across processes says why (:attr:`Remedy.on_shards`) and refuses them before training
(:func:`sharding_of`, :func:`refuse_sharded`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
import torch.nn as nn

from relu_doctor._validate import finite_or_none, optimizers
from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention, InterventionResult
from relu_doctor.families import family_of
from relu_doctor.probes import Probe
from relu_doctor.remedies._sharding import DTENSOR, refuse_several, refuse_sharded, sharding_of
from relu_doctor.sites import SiteKey, module_label

__all__ = [
    "DTENSOR",
    "MIN_EVIDENCE_STEPS",
    "SNAPSHOT_KEYS",
    "DeadEvidence",
    "DoctorLike",
    "Optimizers",
    "Pending",
    "RecordLike",
    "Remedy",
    "dead_surge",
    "model_snapshot",
    "refuse_several",
    "refuse_sharded",
    "sharding_of",
    "site_snapshot",
    "verdict",
]

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

#: The site of a model-wide intervention (clipping, learning rate).
MODEL = "model"

#: The metric each remedy's intervention is judged on, unless the caller names one (a
#: treatment plan names the metric that triggered it).
TARGETS = {
    "adaptive_grad_clip": "grad_norm",
    "lr_rescue": "dead_fraction",
    "leaky_relu_swap": "dead_fraction",
    "dormant_reset": "below_tau_fraction",
    "continual_backprop": "below_tau_fraction",
}

HELPED, NOT_HELPED, UNKNOWN = "helped", "did not help", "unknown"


def verdict(
    before: float | None, after: float | None, *, min_gain: float = 0.0, tolerance: float = 0.0
) -> str:
    """Whether a change helped its target metric (lower is better): ``"helped"`` when
    ``after <= before * (1 - min_gain) + tolerance``, ``"did not help"`` otherwise, and
    ``"unknown"`` when either value is missing.

    Example:
        >>> verdict(0.5, 0.2, min_gain=0.25), verdict(0.5, 0.45, min_gain=0.25)
        ('helped', 'did not help')
    """
    if before is None or after is None:
        return UNKNOWN
    return HELPED if after <= before * (1.0 - min_gain) + tolerance else NOT_HELPED


#: What an ``optimizer(s)`` argument takes: one optimizer, several, or none.
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class RecordLike(Protocol):
    """What the remedies read from an interval record
    (:class:`relu_doctor.history.IntervalRecord`)."""

    @property
    def step(self) -> int: ...

    @property
    def site_rows(self) -> list[dict[str, Any]]: ...

    @property
    def unit_table(self) -> Any: ...  # pandas.DataFrame, one row per (site, unit)

    @property
    def layer_table(self) -> Any: ...  # pandas.DataFrame, one row per parameterised layer

    @property
    def findings(self) -> list[Finding]: ...

    def site_row(self, name: str) -> dict[str, Any] | None: ...

    def key(self, name: str) -> SiteKey: ...


class DoctorLike(Protocol):
    """What :meth:`Remedy.bind` needs from a :class:`relu_doctor.doctor.Doctor`."""

    @property
    def probe(self) -> Probe: ...

    @property
    def model(self) -> nn.Module: ...

    def add_listener(self, fn: Callable[[Any], Any]) -> None: ...

    def record_event(self, event: Intervention | InterventionResult) -> None: ...

    def site_key(self, name: str) -> SiteKey: ...


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def site_snapshot(row: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics an intervention records for one site row (None where not measured).

    Example:
        >>> site_snapshot({"dead_fraction": 0.5, "sparsity": float("nan")})["sparsity"] is None
        True
    """
    return {k: finite_or_none(row.get(k)) for k in SNAPSHOT_KEYS}


def model_snapshot(record: RecordLike) -> dict[str, Any]:
    """Model-wide metrics of one record: unit-weighted dead and dormant fractions over all
    sites, the total parameter-gradient norm (when an optimizer is tapped) and whether an
    exploding-gradient finding is present."""
    rows = record.site_rows
    seen = sum(int(r.get("units_seen") or 0) for r in rows)
    dead = sum(int(r.get("dead") or 0) for r in rows)
    dormant = sum(int(r.get("dormant") or 0) for r in rows)
    grad_norm = None
    layers = record.layer_table
    if layers is not None and len(layers) and "grad_norm" in layers:
        vals = [float(v) for v in layers["grad_norm"]]
        grad_norm = finite_or_none(math.sqrt(sum(v * v for v in vals))) if vals else None
    return {
        "dead_fraction": dead / seen if seen else None,
        "dormant_fraction": dormant / seen if seen else None,
        "grad_norm": grad_norm,
        "exploding_gradient": any(f.kind == "exploding_gradient" for f in record.findings),
    }


#: The collected steps a dead reading must rest on before a remedy acts on it. A window that
#: collected fewer (the overhead budget sampled it) is pooled with the next ones until they
#: hold this many; a window that collected every step it ran is whole as it is.
MIN_EVIDENCE_STEPS = 8


class DeadEvidence:
    """Dead fractions per site that rest on enough collected steps.

    A unit reads dead when it was never active on what the window saw. On a window that
    collected 2 of its 50 steps, a unit active on 2% of inputs reads dead about half the time,
    so comparing such windows finds "surges" that every-step collection never sees. Sampled
    windows are therefore pooled, unit by unit (dead over the pool: seen in some window of it,
    active in none), until they hold ``min_steps`` collected steps; :meth:`add` answers only
    then. A window that collected every step it ran answers at once, as do records that do
    not say how they were sampled.

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
        self.model_fraction: float | None = None  # the last answer's, over every site
        self.pooled = False  # whether the last answer pooled sampled windows
        self.last_steps: int | None = None  # collected steps it rested on (None: unsaid)
        self._pool: dict[str, tuple[Any, Any]] = {}  # site -> (seen, active) per unit

    def add(self, record: RecordLike) -> dict[str, float] | None:
        """This record's dead fraction per site, or the pool's once it holds enough steps;
        None while a sampled pool is still filling."""
        rows = [r for r in record.site_rows if r.get("units_seen")]
        collected = [r.get("steps_collected") for r in rows]
        ran = [r.get("steps_run") for r in rows]
        got = max((int(c) for c in collected if c is not None), default=None)
        whole = got is None or any(
            c is not None and n is not None and int(c) >= int(n)
            for c, n in zip(collected, ran, strict=True)
        )
        units = record.unit_table
        poolable = units is not None and {"site", "activation_rate"} <= set(units.columns)
        if not self._pool and (whole or not poolable):
            self.pooled, self.last_steps = False, got
            counts = {str(r["site"]): (int(r.get("dead") or 0), int(r["units_seen"])) for r in rows}
            return self._answer(counts)
        if poolable:
            for site, group in units.groupby("site", sort=False):
                rate = group["activation_rate"].to_numpy(dtype=float)
                seen, active = ~np.isnan(rate), rate > 0  # NaN: not seen in the window
                old = self._pool.get(str(site))
                if old is not None and len(old[0]) == len(seen):
                    seen, active = old[0] | seen, old[1] | active
                self._pool[str(site)] = (seen, active)
        self.steps += got or 0
        if self.steps < self.min_steps and not whole:
            return None
        counts = {
            site: (int((seen & ~active).sum()), int(seen.sum()))
            for site, (seen, active) in self._pool.items() if seen.any()
        }
        self.pooled, self.last_steps, self.steps, self._pool = True, self.steps, 0, {}
        return self._answer(counts)

    def _answer(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Fractions of ``counts`` ((dead, seen) per site); sets :attr:`model_fraction`."""
        seen = sum(n for _, n in counts.values())
        self.model_fraction = sum(d for d, _ in counts.values()) / seen if seen else None
        return {site: d / n for site, (d, n) in counts.items()}

    def basis(self) -> str:
        """What the last answer rested on, in words, when it pooled sampled windows ("" when
        it was one window as logged)."""
        if not self.pooled:
            return ""
        return f" (over {self.last_steps} collected steps, sampled windows pooled)"


def dead_surge(
    dead: Mapping[str, float] | None, prev: dict[str, float], jump: float
) -> dict[str, Any] | None:
    """The site whose dead fraction (``dead``, from :meth:`DeadEvidence.add`; None while it
    pools) rose the most, by at least ``jump``, since ``prev`` (its previous reading, 0 for a
    site not seen), as evidence; None without one. Updates ``prev`` with ``dead``.

    Example:
        >>> dead_surge({"a": 0.5}, {}, 0.2)["jump"]
        0.5
    """
    surge: dict[str, Any] | None = None
    for site, frac in (dead or {}).items():
        if not math.isfinite(frac):
            continue
        before = prev.get(site, 0.0)
        if frac - before >= jump and (surge is None or frac - before > surge["jump"]):
            surge = {"site": site, "dead_fraction_before": before, "dead_fraction": frac,
                     "jump": frac - before}
        prev[site] = frac
    return surge


# ---------------------------------------------------------------------- shared argument checks


def check_model(value: object) -> nn.Module:
    """The ``model`` argument of a remedy: a ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(value).__name__}.")
    return value


def one_optimizer(name: str, value: object) -> torch.optim.Optimizer:
    """Exactly one ``torch.optim.Optimizer``."""
    if value is None or isinstance(value, (list, tuple)):
        raise ReluDoctorError(
            f"{name}: expected a torch.optim.Optimizer, got {type(value).__name__}."
        )
    opt: torch.optim.Optimizer = optimizers(name, value)[0]
    return opt


def get_module(model: nn.Module, path: str, arg: str) -> nn.Module:
    """The module at ``path`` (``""``: the model), or an error naming ``arg`` that lists the
    model's activation modules."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        acts = [module_label(p) for p, m in model.named_modules() if family_of(m) is not None]
        raise ReluDoctorError(
            f"{arg}: the model has no module at {path!r}; its activation modules are "
            f"{acts[:20]}{' ...' if len(acts) > 20 else ''}."
        ) from None


def site_key_of(site: object, arg: str = "site") -> SiteKey:
    """A :class:`~relu_doctor.sites.SiteKey` given as itself or, without a Doctor to ask, as
    a module path exactly as written (never parsed: ``"enc:act"`` and ``"a#1"`` are module
    names)."""
    if isinstance(site, SiteKey):
        return site
    if not isinstance(site, str):
        raise ReluDoctorError(
            f"{arg}: expected a site name, a module path or a SiteKey, got {type(site).__name__}."
        )
    return SiteKey(site)


def key_label(key: SiteKey) -> str:
    """A display name for a key when no probe names it (a call index above 0 means the
    module is reused)."""
    return key.name(key.call_index > 0)


# ---------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Pending:
    """An intervention waiting for its metrics after: its event ``id`` and ``site``; the
    ``target`` metric it is judged on with its value ``before`` and the gain that counts as
    help (``min_gain``, ``tolerance``: see :func:`verdict`); the ``units`` it changed (their
    share still below tau one interval later is the change's efficacy)."""

    id: str
    site: str
    target: str | None = None
    before: float | None = None
    min_gain: float = 0.0
    tolerance: float = 0.0
    units: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "site": self.site}
        if self.target is not None:
            out.update(target=self.target, before=self.before, min_gain=self.min_gain,
                       tolerance=self.tolerance)
        if self.units:
            out["units"] = list(self.units)
        return out


R = TypeVar("R", bound="Remedy")


class Remedy:
    """Base of the remedy controllers: decide from interval records, act, record events.

    :meth:`bind` makes the controller a listener of a Doctor; from then on each logging
    interval calls it with the record. It returns (and, when bound, records through
    ``doctor.record_event``) the :class:`~relu_doctor.events.InterventionResult` events
    completing earlier interventions first, then the new
    :class:`~relu_doctor.events.Intervention` events. Actions called directly (a manual
    ``swap``) are recorded too.

    The interventions awaiting their after-metrics are this class's state (:attr:`pending`),
    checkpointed by :meth:`state_dict`; a callback wrapping a remedy keeps no copy.

    Subclasses set :attr:`name`, implement :meth:`decide` and extend :meth:`state_dict` /
    :meth:`load_state_dict`.
    """

    #: the remedy's name in events (``leaky_relu_swap``, ``dormant_reset``...)
    name: ClassVar[str] = "remedy"
    #: why this remedy, as configured, cannot act on parameters sharded across processes
    #: (FSDP, DeepSpeed ZeRO-3, tensor parallelism); None when it acts the same on shards.
    #: Those that cannot refuse sharded parameters before training (:func:`refuse_sharded`).
    on_shards: str | None = None

    def __init__(self) -> None:
        self.doctor: DoctorLike | None = None
        #: how to warn (a Lightning callback passes ``rank_zero_warn``)
        self.warn: Callable[[str], Any] = _warn
        self._pending: list[Pending] = []
        self._n_events = 0
        self._in_call = False
        #: what the next intervention is judged on (a plan sets it before acting): metric
        #: name, ``min_gain`` and ``tolerance`` of :func:`verdict`
        self.judge: tuple[str | None, float, float] = (TARGETS.get(self.name), 0.0, 0.0)

    @property
    def pending(self) -> tuple[Pending, ...]:
        """The interventions whose metrics after are still to be measured."""
        return tuple(self._pending)

    def bind(self: R, doctor: DoctorLike, *, listen: bool = True) -> R:
        """Listen to ``doctor``'s interval records and record events through it (idempotent).
        With ``listen=False`` only record through it: a
        :class:`~relu_doctor.remedies.plan.TreatmentPlan` decides when this remedy acts."""
        if self.doctor is doctor:
            return self
        self.doctor = doctor
        if listen:
            doctor.add_listener(self)
        self._on_bind(doctor)
        return self

    def _on_bind(self, doctor: DoctorLike) -> None:
        """Hook for subclasses (take the probe, refresh hooks...)."""

    def __call__(self, record: RecordLike) -> list[Intervention | InterventionResult]:
        events: list[Intervention | InterventionResult] = list(self._results(record))
        self._in_call = True
        try:
            events += self.decide(record)
        finally:
            self._in_call = False
        if self.doctor is not None:
            for e in events:
                self.doctor.record_event(e)
        return events

    def decide(self, record: RecordLike) -> list[Intervention]:
        """Act on one record; return the new interventions."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sites
    def resolve_site(self, site: str | SiteKey, arg: str = "site") -> tuple[SiteKey, str]:
        """``(key, display name)`` of ``site``: a SiteKey; or a str, which is a site name of
        the bound Doctor when it knows one by that name and otherwise a module path exactly
        as written."""
        if isinstance(site, str) and self.doctor is not None:
            try:
                return self.doctor.site_key(site), site
            except ReluDoctorError:
                pass  # not a site name: a module path
        key = site_key_of(site, arg)
        if isinstance(site, str):
            return key, module_label(site)
        return key, self.site_name(key)

    def site_name(self, key: SiteKey) -> str:
        """The display name of ``key``: the bound probe's, else one made from the key."""
        if self.doctor is not None:
            found = self.doctor.probe.site_by_key(key)
            if found is not None and found.name:
                return found.name
        return key_label(key)

    # ------------------------------------------------------------------ events
    def _intervention(
        self,
        *,
        site: str,
        step: int,
        what: str,
        before: Mapping[str, Any] | None,
        id_suffix: str = "",
        measure_after: bool = True,
        **details: Any,
    ) -> Intervention:
        """A new intervention; with ``measure_after`` its metrics after are awaited (and
        judged on :attr:`judge`'s metric)."""
        self._n_events += 1
        ev = Intervention(
            remedy=self.name,
            site=site,
            step=int(step),
            what=what,
            before=dict(before) if before is not None else None,
            after=None,
            id=f"{self.name}:{step}:{site}:{self._n_events}{id_suffix}",
            details=details,
        )
        if measure_after:
            target, gain, tol = self.judge
            units = details.get("units")
            self._pending.append(
                Pending(
                    ev.id, site, target,
                    finite_or_none((before or {}).get(target)) if target else None,
                    gain, tol,
                    tuple(int(u) for u in units) if isinstance(units, list) else (),
                )
            )
        return ev

    def note(
        self,
        *,
        site: str,
        step: int,
        what: str,
        before: Mapping[str, Any] | None,
        measure_after: bool = True,
        **details: Any,
    ) -> Intervention:
        """Record a change made on this remedy's behalf (a plan switching a clipper on, say)
        as this remedy's intervention, judged one interval later like the others."""
        return self._record(self._intervention(site=site, step=step, what=what, before=before,
                                               measure_after=measure_after, **details))

    def collect(self, record: RecordLike) -> list[InterventionResult]:
        """Complete the pending interventions from ``record`` (their metrics after, verdict
        and efficacy); record them through the bound Doctor when not listening."""
        out = self._results(record)
        if self.doctor is not None:
            for e in out:
                self.doctor.record_event(e)
        return out

    def _record(self, event: Intervention) -> Intervention:
        """Record an intervention made by a direct call (from :meth:`decide`, the events go
        out with the call's return value instead)."""
        if self.doctor is not None and not self._in_call:
            self.doctor.record_event(event)
        return event

    def _results(self, record: RecordLike) -> list[InterventionResult]:
        pending, self._pending = self._pending, []
        out = []
        for p in pending:
            if p.site == MODEL:
                after: dict[str, Any] | None = model_snapshot(record)
            else:
                row = record.site_row(p.site)
                after = site_snapshot(row) if row is not None else None
            value = finite_or_none((after or {}).get(p.target)) if p.target else None
            before, target = p.before, p.target
            efficacy = _efficacy(record, p.site, p.units) if p.units else None
            if efficacy is not None and p.target == "below_tau_fraction":
                # a change to some units is judged on those units: were they all below tau
                # before, what share still is
                before, value, target = 1.0, efficacy["still_below_tau"], "changed_units_below_tau"
            out.append(
                InterventionResult(
                    p.id, self.name, p.site, int(record.step), after,
                    target=target,
                    verdict=verdict(before, value, min_gain=p.min_gain, tolerance=p.tolerance)
                    if target else None,
                    efficacy=efficacy,
                )
            )
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [p.to_dict() for p in self._pending],
            "n_events": self._n_events,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = [
            Pending(
                str(p["id"]), str(p["site"]), p.get("target"), finite_or_none(p.get("before")),
                float(p.get("min_gain", 0.0)), float(p.get("tolerance", 0.0)),
                tuple(int(u) for u in p.get("units", ())),
            )
            for p in state.get("pending", [])
        ]
        self._n_events = int(state.get("n_events", 0))


def _efficacy(record: RecordLike, site: str, units: Sequence[int]) -> dict[str, Any] | None:
    """Of the ``units`` changed at ``site``, the share still dead and still below tau (ReDo
    score <= tau, dead units included) in ``record``: how well a recycling took."""
    table = record.unit_table
    if table is None or not len(table) or not units:
        return None
    u = table[table["site"] == site]
    chosen = u[u["unit"].isin(list(units))]
    if not len(chosen):
        return None
    n = len(chosen)
    return {
        "units": n,
        "still_dead": float(chosen["dead"].astype(bool).sum()) / n,
        "still_below_tau": float(chosen["below_tau"].astype(bool).sum()) / n,
    }
