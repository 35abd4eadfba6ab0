"""Remedies: framework-free model and optimizer surgery, and the policies that apply it.

Four remedies, each usable from a plain PyTorch loop and wrapped by one thin Lightning
callback in :mod:`relu_doctor.callbacks`:

* **Swap activation** -- :func:`swap_activation` / :func:`restore_activation` replace a ReLU
  module with ``LeakyReLU`` or ``PReLU`` (outputs for positive inputs unchanged);
  :class:`ActivationSwapper` does it when a site stays dead for ``patience`` logging
  intervals.
* **Adaptive gradient clipping** -- :class:`AutoClip` (clip to a percentile of the gradient
  norm history) and :class:`AGC` (unit-wise, relative to the weight norm). Both keep their
  state on the gradients' device and never synchronise with the host between logging
  intervals. Call them after AMP unscaling, before the optimizer step.
* **Learning-rate rescue** -- :func:`scale_lr` scales every param group's learning rate, and
  the LR schedulers' base values with it, so a scheduler's later steps keep the reduction;
  :class:`LRRescuer` does it on an exploding-gradient finding or a surge of dead units.
* **Recycle dormant units** (ReDo, Sokar et al. 2023) -- :func:`find_unit_links` finds the
  layer feeding a site (through an optional BatchNorm) and the layers consuming it (through
  pooling, dropout and flattening), for ``nn.Sequential`` and torch.fx-traceable models;
  :func:`recycle_units` re-initialises the incoming weights of chosen units, zeroes their
  outgoing weights and resets the optimizer state of exactly those slices;
  :class:`DormantRecycler` does it for the units a log found dormant.

The controllers (:class:`Remedy` subclasses) decide from :class:`~relu_doctor.LogRecord`
objects only. Records are built from statistics summed across processes, so every rank takes
the same decision; random re-initialisation draws from a generator seeded by (seed, step,
site), so every rank draws the same numbers. Every change is an ``"intervention"`` event with
the step, the site, what changed and the site's metrics before; an
``"intervention_result"`` event referencing it (``ref``) carries the metrics after, measured
at the next logging interval.

Plain loop:

    >>> import torch, torch.nn as nn, relu_doctor
    >>> from relu_doctor.remedies import ActivationSwapper
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     swapper = ActivationSwapper(net, threshold=0.5, patience=2).bind(doc)
    ...     net(torch.randn(16, 4)).sum().backward()
    ...     _ = doc.step()
    >>> swapper.swaps
    {}
"""

from __future__ import annotations

import fnmatch
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.history import merge_interventions
from relu_doctor.probes import Probe

__all__ = [
    "AGC",
    "ActivationSwapper",
    "AutoClip",
    "Consumer",
    "DormantRecycler",
    "LRRescuer",
    "Remedy",
    "SwapRecord",
    "UnitLinks",
    "find_unit_links",
    "merge_interventions",
    "model_snapshot",
    "recycle_units",
    "restore_activation",
    "scale_lr",
    "site_snapshot",
    "swap_activation",
]

SWAP_KINDS = ("leaky_relu", "prelu")
SNAPSHOT_KEYS = (
    "dead_fraction",
    "lifetime_dead_fraction",
    "dormant_fraction",
    "sparsity",
    "activation_rate",
    "mean_abs",
    "grad_rms",
)


# ====================================================================== records and events


class RecordLike(Protocol):
    """What the remedies read from a :class:`relu_doctor.LogRecord`."""

    step: int
    sites: list[dict[str, Any]]
    units: Any  # pandas.DataFrame
    layers: Any  # pandas.DataFrame
    findings: list[Finding]


class DoctorLike(Protocol):
    """What :meth:`Remedy.bind` needs from a :class:`relu_doctor.Doctor`."""

    probe: Probe
    model: nn.Module

    def add_listener(self, fn: Callable[[Any], Any]) -> None: ...

    def record_event(self, event: Mapping[str, Any]) -> None: ...


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def site_snapshot(row: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics an intervention event records for one site (None where not measured)."""
    return {k: _finite(row.get(k)) for k in SNAPSHOT_KEYS}


def model_snapshot(record: RecordLike) -> dict[str, Any]:
    """Model-wide metrics of one record: unit-weighted dead and dormant fractions over all
    sites, the total parameter-gradient norm (when an optimizer is tapped) and whether an
    exploding-gradient finding is present."""
    seen = sum(int(r.get("units_seen") or 0) for r in record.sites)
    dead = sum(int(r.get("dead") or 0) for r in record.sites)
    dormant = sum(int(r.get("dormant") or 0) for r in record.sites)
    grad_norm = None
    layers = record.layers
    if layers is not None and len(layers) and "grad_norm" in layers:
        vals = [float(v) for v in layers["grad_norm"]]
        grad_norm = _finite(math.sqrt(sum(v * v for v in vals))) if vals else None
    return {
        "dead_fraction": dead / seen if seen else None,
        "dormant_fraction": dormant / seen if seen else None,
        "grad_norm": grad_norm,
        "exploding_gradient": any(f.kind == "exploding_gradient" for f in record.findings),
    }


def _row(record: RecordLike, site: str) -> dict[str, Any] | None:
    for r in record.sites:
        if r["site"] == site:
            return r
    return None


class Remedy:
    """Base of the remedy controllers: decide from log records, act, report events.

    A controller is a :class:`relu_doctor.Doctor` listener: :meth:`bind` registers it, and
    from then on every logging interval calls it with the :class:`relu_doctor.LogRecord`.
    It returns (and, when bound, records through ``doctor.record_event``) its events: the
    ``intervention_result`` events completing earlier interventions first, then new
    ``intervention`` events.

    Subclasses implement :meth:`decide` and say what they keep in :meth:`state_dict`.
    """

    name = "remedy"

    def __init__(self) -> None:
        self.doctor: DoctorLike | None = None
        self.emit: Callable[[Mapping[str, Any]], None] | None = None
        #: how to warn (a Lightning callback passes ``rank_zero_warn``)
        self.warn: Callable[[str], Any] = _warn
        self._pending: list[dict[str, Any]] = []
        self._n_events = 0
        self._in_call = False

    def bind(self, doctor: DoctorLike) -> Remedy:
        """Listen to ``doctor``'s log records and record events through it (idempotent)."""
        if self.doctor is doctor:
            return self
        self.doctor = doctor
        self.emit = doctor.record_event
        doctor.add_listener(self)
        self._on_bind(doctor)
        return self

    def _on_bind(self, doctor: DoctorLike) -> None:
        """Hook for subclasses (take the probe, refresh hooks...)."""

    def __call__(self, record: RecordLike) -> list[dict[str, Any]]:
        events = self._results(record)
        self._in_call = True
        try:
            events += self.decide(record)
        finally:
            self._in_call = False
        if self.emit is not None:
            for e in events:
                self.emit(e)
        return events

    def _manual(self, event: dict[str, Any]) -> dict[str, Any]:
        """Record an event of an action called directly (not from :meth:`decide`)."""
        if self.emit is not None and not self._in_call:
            self.emit(event)
        return event

    def decide(self, record: RecordLike) -> list[dict[str, Any]]:
        """Act on one record; return the new intervention events."""
        raise NotImplementedError

    # ------------------------------------------------------------------ events
    def _event(
        self,
        *,
        site: str,
        step: int,
        what: str,
        before: Mapping[str, Any] | None,
        **extra: Any,
    ) -> dict[str, Any]:
        self._n_events += 1
        ev = {
            "type": "intervention",
            "id": f"{self.name}:{step}:{site}:{self._n_events}",
            "remedy": self.name,
            "site": site,
            "step": int(step),
            "what": what,
            "before": dict(before) if before is not None else None,
            "after": None,
            **extra,
        }
        self._pending.append({"id": ev["id"], "site": site})
        return ev

    def _results(self, record: RecordLike) -> list[dict[str, Any]]:
        pending, self._pending = self._pending, []
        out = []
        for p in pending:
            if p["site"] == "model":
                after: dict[str, Any] | None = model_snapshot(record)
            else:
                row = _row(record, p["site"])
                after = site_snapshot(row) if row is not None else None
            out.append(
                {
                    "type": "intervention_result",
                    "ref": p["id"],
                    "remedy": self.name,
                    "site": p["site"],
                    "step": int(record.step),
                    "after": after,
                }
            )
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"pending": [dict(p) for p in self._pending], "n_events": self._n_events}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = [dict(p) for p in state.get("pending", [])]
        self._n_events = int(state.get("n_events", 0))


# ====================================================================== validation helpers


def _check_fraction(name: str, v: object, *, open_low: bool = True, high: float = 1.0) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        f = float(v)  # type: ignore[arg-type]
        ok = (f > 0.0 if open_low else f >= 0.0) and f <= high
    if not ok:
        lo = "(0" if open_low else "[0"
        raise ReluDoctorError(f"{name}: expected a number in {lo}, {high:g}], got {v!r}.")
    return float(v)  # type: ignore[arg-type]


def _check_pos_int(name: str, v: object, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ReluDoctorError(f"{name}: expected an integer >= {minimum}, got {v!r}.")
    return v


def _check_nonneg(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
        raise ReluDoctorError(f"{name}: expected a finite number >= 0, got {v!r}.")
    return float(v)


def _patterns(name: str, value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    out = [value] if isinstance(value, str) else list(value)
    for p in out:
        if not isinstance(p, str) or not p:
            raise ReluDoctorError(f"{name}: expected glob patterns (non-empty strings), got {p!r}.")
    return out


def _selected(name: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _optimizers(value: Any, name: str = "optimizer") -> list[torch.optim.Optimizer]:
    if value is None:
        return []
    opts = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, o in enumerate(opts):
        if not isinstance(o, torch.optim.Optimizer):
            raise ReluDoctorError(
                f"{name}: expected torch.optim.Optimizer instances, got {type(o).__name__} at "
                f"position {i}."
            )
    return opts


def _label(path: str) -> str:
    return path if path else "(root)"


def _parse_site(site: str) -> tuple[str, int, str | None]:
    """``(module path, call index, functional op or None)`` of a site name (DESIGN.md)."""
    op = None
    name = site
    idx = 0
    if "#" in name:
        name, _, k = name.rpartition("#")
        try:
            idx = int(k)
        except ValueError:
            raise ReluDoctorError(f"site: cannot parse the call index of {site!r}.") from None
    if ":" in name:
        name, _, op = name.rpartition(":")
    path = "" if name == "(root)" else name
    return path, idx, op


def _get_module(model: nn.Module, path: str, arg: str = "path") -> nn.Module:
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        acts = [_label(p) for p, m in model.named_modules() if family_of(m) is not None]
        raise ReluDoctorError(
            f"{arg}: the model has no module at {path!r}; its activation modules are "
            f"{acts[:20]}{' ...' if len(acts) > 20 else ''}."
        ) from None


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _paths_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules(remove_duplicate=False) if m is module and p]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# ====================================================================== swap activation


@dataclass
class SwapRecord:
    """One activation swap (what :func:`restore_activation` needs to undo it).

    Attributes:
        path: the module path given to :func:`swap_activation`.
        paths: every path the module object was registered under (all replaced).
        old: the original module.
        new: the replacement.
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: LeakyReLU's negative slope, or PReLU's initial slope.
        num_parameters: PReLU's number of slopes (1, or one per unit).
        param_groups: ``(optimizer, group)`` pairs added for PReLU's weight.
    """

    path: str
    paths: list[str]
    old: nn.Module
    new: nn.Module
    kind: str
    slope: float
    num_parameters: int = 1
    param_groups: list[tuple[torch.optim.Optimizer, dict[str, Any]]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "paths": list(self.paths),
            "kind": self.kind,
            "slope": self.slope,
            "num_parameters": self.num_parameters,
            "from": type(self.old).__name__,
            "inplace": bool(getattr(self.old, "inplace", False)),
        }


def _check_swappable(module: nn.Module, path: str) -> None:
    fam = family_of(module)
    if fam is None:
        raise ReluDoctorError(
            f"path: module {_label(path)!r} is a {type(module).__name__}, not a ReLU-family "
            "activation; pass the path of a ReLU module."
        )
    if fam.leaky:
        raise ReluDoctorError(
            f"path: module {_label(path)!r} is already a leaky activation ({fam.name}); its "
            "negative regime passes gradient. Recycle its stuck units instead (DormantReset)."
        )
    if fam.cap_of(module) is not None or not fam.nonnegative:
        raise ReluDoctorError(
            f"path: module {_label(path)!r} is a {type(module).__name__} ({fam.name}) whose "
            "positive outputs differ from LeakyReLU's (a cap, or negative outputs): only plain "
            "ReLU modules can be swapped without changing outputs for positive inputs."
        )


def _new_param_group(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    schedulers: Sequence[Any],
    source: int = 0,
) -> dict[str, Any]:
    src = optimizer.param_groups[source]
    group = {k: v for k, v in src.items() if k not in ("params", "param_names")}
    if "weight_decay" in group:
        group["weight_decay"] = 0.0  # PReLU slopes are not decayed (He et al. 2015)
    group["params"] = params
    n_before = len(optimizer.param_groups)
    optimizer.add_param_group(group)
    added = optimizer.param_groups[-1]
    for sched in _flat_schedulers(schedulers):
        if getattr(sched, "optimizer", None) is not optimizer:
            continue
        for attr in _SCHED_LISTS:
            val = getattr(sched, attr, None)
            if isinstance(val, list) and len(val) == n_before:
                val.append(val[source])
    return added


def _remove_param_group(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], schedulers: Sequence[Any]
) -> None:
    for i, g in enumerate(optimizer.param_groups):
        if g is group:
            n_before = len(optimizer.param_groups)
            for p in g["params"]:
                optimizer.state.pop(p, None)
            optimizer.param_groups.pop(i)
            for sched in _flat_schedulers(schedulers):
                if getattr(sched, "optimizer", None) is not optimizer:
                    continue
                for attr in _SCHED_LISTS:
                    val = getattr(sched, attr, None)
                    if isinstance(val, list) and len(val) == n_before:
                        val.pop(i)
            return


def swap_activation(
    model: nn.Module,
    path: str,
    *,
    kind: str = "leaky_relu",
    slope: float = 0.01,
    num_parameters: int = 1,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    schedulers: Sequence[Any] = (),
    new: nn.Module | None = None,
) -> SwapRecord:
    """Replace the ReLU module at ``path`` by a LeakyReLU or PReLU.

    Outputs for positive inputs are unchanged. A module object registered under several
    paths (or called several times per forward) is replaced everywhere it appears; the
    record lists every path. For PReLU, the new slopes go to the optimizer(s) as a new param
    group (hyperparameters copied from group 0, no weight decay), and the schedulers attached
    to that optimizer are extended to the new group.

    Hooks live on module objects: after a swap, call ``probe.refresh()`` (``doctor.probe``)
    so that relu_doctor watches the new module. :class:`ActivationSwapper` does this.

    Args:
        model: the model (``path`` is relative to it).
        path: module path of a plain ReLU.
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: the negative slope (PReLU's initial value), in (0, 1].
        num_parameters: PReLU slopes: 1, or the number of channels on dim 1.
        optimizer: optimizer(s) that train the model (PReLU only).
        schedulers: LR schedulers of those optimizers (PReLU only).
        new: use this module instead of building one (it must match ``kind``).

    Returns:
        A :class:`SwapRecord` for :func:`restore_activation`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> rec = swap_activation(net, "1", slope=0.1)
        >>> net[1]
        LeakyReLU(negative_slope=0.1)
        >>> restore_activation(net, rec); net[1]
        ReLU()
    """
    if kind not in SWAP_KINDS:
        raise ReluDoctorError(f"kind: expected one of {list(SWAP_KINDS)}, got {kind!r}.")
    _check_fraction("slope", slope)
    _check_pos_int("num_parameters", num_parameters)
    if not isinstance(path, str):
        raise ReluDoctorError(f"path: expected a module path string, got {type(path).__name__}.")
    old = _get_module(model, path)
    _check_swappable(old, path)
    opts = _optimizers(optimizer)
    if new is None:
        if kind == "leaky_relu":
            new = nn.LeakyReLU(slope, inplace=bool(getattr(old, "inplace", False)))
        else:
            device, dtype = _device_dtype(model)
            new = nn.PReLU(num_parameters, init=slope).to(device=device, dtype=dtype)
    expected = nn.LeakyReLU if kind == "leaky_relu" else nn.PReLU
    if not isinstance(new, expected):
        raise ReluDoctorError(
            f"new: expected an nn.{expected.__name__} for kind={kind!r}, got {new!r}."
        )
    paths = _paths_of(model, old) or [path]
    for p in paths:
        _set_module(model, p, new)
    groups = []
    params = list(new.parameters())
    if params:
        for opt in opts:
            groups.append((opt, _new_param_group(opt, params, schedulers)))
    return SwapRecord(path, paths, old, new, kind, float(slope), num_parameters, groups)


def restore_activation(
    model: nn.Module, record: SwapRecord, *, schedulers: Sequence[Any] = ()
) -> None:
    """Undo :func:`swap_activation`: put the original module back at every path, and remove
    the PReLU param group from the optimizer (and its schedulers) again."""
    for p in record.paths:
        current = _get_module(model, p)
        if current is not record.new:
            raise ReluDoctorError(
                f"record: the module at {_label(p)!r} is a {type(current).__name__}, not the "
                "swapped-in module: it was replaced since; restore in reverse order."
            )
    for p in record.paths:
        _set_module(model, p, record.old)
    for opt, group in record.param_groups:
        _remove_param_group(opt, group, schedulers)
    record.param_groups = []


class ActivationSwapper(Remedy):
    """Swap ReLU for LeakyReLU (or PReLU) where a site stays dead.

    A site is swapped when its dead fraction (units never active over the logging window)
    exceeds ``threshold`` for ``patience`` consecutive logging intervals. Swaps are undoable
    (:meth:`restore`) and round-trip through :meth:`state_dict`.

    Args:
        model: the model (the module paths of the sites are relative to it).
        kind: ``"leaky_relu"`` or ``"prelu"``.
        slope: the negative slope (PReLU's initial value).
        per_unit: PReLU only: one slope per unit (needs the units on dim 1) instead of one.
        threshold: dead fraction above which a site counts as dying, in [0, 1).
        patience: consecutive logging intervals above the threshold before swapping.
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        optimizer: optimizer(s) that receive PReLU's slopes.
        schedulers: their LR schedulers (extended to the new param group).
        probe: the probe whose hooks follow the swaps (taken from the doctor on :meth:`bind`).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> sw = ActivationSwapper(net)
        >>> ev = sw.swap("1")
        >>> ev["what"]
        'replaced ReLU at 1 with LeakyReLU(negative_slope=0.01)'
        >>> _ = sw.restore(); net[1]
        ReLU()
    """

    name = "leaky_relu_swap"

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = "leaky_relu",
        slope: float = 0.01,
        per_unit: bool = False,
        threshold: float = 0.5,
        patience: int = 2,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Sequence[Any] = (),
        probe: Probe | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
        if kind not in SWAP_KINDS:
            raise ReluDoctorError(
                f"kind: expected one of {list(SWAP_KINDS)}, got {kind!r}. 'leaky_relu' uses a "
                "fixed slope; 'prelu' learns it."
            )
        self.model = model
        self.kind = kind
        self.slope = _check_fraction("slope", slope)
        self.per_unit = bool(per_unit)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 <= threshold < 1
        ):
            raise ReluDoctorError(
                f"threshold: expected a dead fraction in [0, 1) (e.g. 0.5), got {threshold!r}."
            )
        self.threshold = float(threshold)
        self.patience = _check_pos_int("patience", patience)
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        self.optimizers = _optimizers(optimizer)
        self.schedulers = list(schedulers)
        self.probe = probe
        self.swaps: dict[str, SwapRecord] = {}
        self.streaks: dict[str, int] = {}
        self._skipped: set[str] = set()

    def _on_bind(self, doctor: DoctorLike) -> None:
        self.probe = doctor.probe
        self.refresh()

    def refresh(self) -> None:
        """Re-register the probe's hooks on the current modules (after swaps or restores)."""
        if self.probe is not None and hasattr(self.probe, "refresh"):
            self.probe.refresh()

    # ------------------------------------------------------------------ actions
    def _sites_of(self, path: str) -> list[str]:
        if self.probe is not None:
            names = [
                s.name for s in self.probe.sites() if s.kind == "module" and s.module_path == path
            ]
            if names:
                return names
        return [_label(path)]

    def _site_units(self, path: str) -> int | None:
        if self.probe is None:
            return None
        for s in self.probe.sites():
            if s.kind == "module" and s.module_path == path:
                if s.unit_dim != 1:
                    raise ReluDoctorError(
                        f"per_unit: site {s.name!r} holds its units on dim {s.unit_dim}, but "
                        "PReLU's per-channel slopes act on dim 1; use per_unit=False."
                    )
                return s.units
        return None

    def swap(
        self,
        site: str,
        *,
        step: int = 0,
        before: Mapping[str, Any] | None = None,
        reason: str = "requested",
    ) -> dict[str, Any]:
        """Swap the module of ``site`` (a site name or a module path) now; return the event."""
        path, _idx, op = _parse_site(site)
        if op is not None:
            raise ReluDoctorError(
                f"site: {site!r} is a functional call ({op}) inside {_label(path)!r}; only "
                "activation modules can be swapped. Replace the call with an nn.ReLU module, or "
                "exclude this site."
            )
        if path in self.swaps:
            raise ReluDoctorError(
                f"site: {site!r} was already swapped at this path ({_label(path)!r})."
            )
        n = 1
        if self.kind == "prelu" and self.per_unit:
            n = self._site_units(path) or 1
        rec = swap_activation(
            self.model,
            path,
            kind=self.kind,
            slope=self.slope,
            num_parameters=n,
            optimizer=self.optimizers,
            schedulers=self.schedulers,
        )
        self.swaps[path] = rec
        self.refresh()
        sites = sorted({s for p in rec.paths for s in self._sites_of(p)})
        what = f"replaced {type(rec.old).__name__} at {', '.join(map(_label, rec.paths))} with {rec.new!r}"
        if len(sites) > 1:
            what += (
                f"; the module is shared by {len(sites)} sites ({', '.join(sites)}): all changed"
            )
        if rec.param_groups:
            what += f"; {sum(p.numel() for p in rec.new.parameters())} slope parameter(s) added to the optimizer"
        return self._manual(
            self._event(
                site=sites[0] if site not in sites else site,
                step=step,
                what=what,
                before=before,
                sites=sites,
                shared=len(sites) > 1,
                reason=reason,
                swap=rec.describe(),
            )
        )

    def restore(self, site: str | None = None, *, step: int = 0) -> list[dict[str, Any]]:
        """Undo the swap of ``site`` (a site name or module path), or of every swap; return
        the events."""
        if site is None:
            paths = list(reversed(self.swaps))
        else:
            path, _, _ = _parse_site(site)
            if path not in self.swaps:
                raise ReluDoctorError(
                    f"site: {site!r} was not swapped; swapped paths: {list(self.swaps)}."
                )
            paths = [path]
        events = []
        for path in paths:
            rec = self.swaps.pop(path)
            restore_activation(self.model, rec, schedulers=self.schedulers)
            self._n_events += 1
            events.append(
                {
                    "type": "intervention",
                    "id": f"{self.name}:{step}:{_label(path)}:{self._n_events}:restore",
                    "remedy": self.name,
                    "site": _label(path),
                    "step": int(step),
                    "what": f"restored {type(rec.old).__name__} at {', '.join(map(_label, rec.paths))}",
                    "undo": True,
                    "before": None,
                    "after": None,
                }
            )
        self.refresh()
        for e in events:
            self._manual(e)
        return events

    def decide(self, record: RecordLike) -> list[dict[str, Any]]:
        events = []
        swapped_sites = {
            s for rec in self.swaps.values() for p in rec.paths for s in self._sites_of(p)
        }
        for row in record.sites:
            site = str(row["site"])
            if site in swapped_sites or site in self._skipped or row.get("leaky"):
                self.streaks.pop(site, None)
                continue
            if not _selected(site, self.include, self.exclude):
                continue
            frac = _finite(row.get("dead_fraction"))
            if frac is not None and frac > self.threshold:
                self.streaks[site] = self.streaks.get(site, 0) + 1
            else:
                self.streaks[site] = 0
            if self.streaks[site] >= self.patience:
                path, _, _ = _parse_site(site)
                if path in self.swaps:
                    continue
                try:
                    ev = self.swap(
                        site,
                        step=record.step,
                        before=site_snapshot(row),
                        reason=f"dead_fraction > {self.threshold:g} for {self.streaks[site]} "
                        "consecutive logging intervals",
                    )
                except ReluDoctorError as e:
                    self._skipped.add(site)
                    self.warn(f"LeakyReluSwap: leaving site {site!r} alone: {e}")
                    continue
                for s in ev["sites"]:
                    self.streaks.pop(s, None)
                events.append(ev)
        return events

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "swaps": [rec.describe() for rec in self.swaps.values()],
            "streaks": dict(self.streaks),
            "skipped": sorted(self._skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply its swaps to the model.

        Load this before the model's own state dict when PReLU was used (its slopes are
        model parameters); with an optimizer given, the PReLU param groups are re-added so
        the optimizer's state dict loads too.
        """
        super().load_state_dict(state)
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
        self._skipped = set(state.get("skipped", []))
        for desc in state.get("swaps", []):
            self.reapply(desc)
        self.refresh()

    def reapply(self, desc: Mapping[str, Any]) -> SwapRecord | None:
        """Re-apply one swap described by :meth:`SwapRecord.describe` (on resume). A module
        already of the swapped kind at that path is adopted as is."""
        path = str(desc["path"])
        if path in self.swaps:
            return self.swaps[path]
        current = _get_module(self.model, path, "state_dict")
        kind = str(desc["kind"])
        expected = nn.LeakyReLU if kind == "leaky_relu" else nn.PReLU
        if isinstance(current, expected):
            old = nn.ReLU(inplace=bool(desc.get("inplace", False)))
            rec = SwapRecord(
                path,
                _paths_of(self.model, current) or [path],
                old,
                current,
                kind,
                float(desc["slope"]),
                int(desc.get("num_parameters", 1)),
            )
            self.swaps[path] = rec
            return rec
        rec = swap_activation(
            self.model,
            path,
            kind=kind,
            slope=float(desc["slope"]),
            num_parameters=int(desc.get("num_parameters", 1)),
            optimizer=self.optimizers,
            schedulers=self.schedulers,
        )
        self.swaps[path] = rec
        return rec

    def add_param_groups(
        self, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any] = ()
    ) -> None:
        """Give the PReLU slopes of every swap their own param group in ``optimizers``.

        For optimizers made after the swaps were re-applied (on resume): then their state
        dicts, saved with that extra group, load. Slopes an optimizer already holds in another
        group (built from ``model.parameters()`` after the swap) are moved out of it.
        """
        self.optimizers = _optimizers(list(optimizers))
        self.schedulers = list(schedulers)
        for rec in self.swaps.values():
            params = list(rec.new.parameters())
            if not params:
                continue
            ids = {id(p) for p in params}
            for opt in self.optimizers:
                own = [
                    g
                    for g in opt.param_groups
                    if g["params"] and {id(q) for q in g["params"]} <= ids
                ]
                if own:
                    if all(o is not opt for o, _ in rec.param_groups):
                        rec.param_groups.append((opt, own[0]))
                    continue
                for g in opt.param_groups:
                    g["params"] = [q for q in g["params"] if id(q) not in ids]
                rec.param_groups.append((opt, _new_param_group(opt, params, self.schedulers)))


# ====================================================================== gradient clipping


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class _Clipper(Remedy):
    """Shared parts of the clippers: an on-device window of counts, read at log time."""

    def __init__(self) -> None:
        super().__init__()
        self._clipped: torch.Tensor | None = None  # clipped steps (AutoClip) or units (AGC)
        self._total = 0  # steps (AutoClip) or units (AGC) seen in the window, host-side
        self._steps = 0
        self._threshold: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.last: dict[str, Any] = {}  # the numbers of the last closed window

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor] | None = None,
    ) -> _Clipper:
        """Clip in a step pre-hook of ``optimizer`` (GradScaler.step unscales before the
        optimizer's step runs, so clipping sees true gradients). ``params`` defaults to every
        parameter of the optimizer. Remove with :meth:`detach`."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ReluDoctorError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        chosen = list(params) if params is not None else None

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            ps = (
                chosen if chosen is not None else [p for g in opt.param_groups for p in g["params"]]
            )
            self.clip_(ps)

        self._handles.append(optimizer.register_step_pre_hook(pre))
        return self

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def clip_(self, params: Iterable[torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _count(self, mask: torch.Tensor) -> None:
        c = mask.sum(dtype=torch.int64) if mask.dim() else mask.to(torch.int64)
        if self._clipped is None or self._clipped.device != c.device:
            self._clipped = torch.zeros((), dtype=torch.int64, device=c.device)
        self._clipped.add_(c)

    def read(self) -> dict[str, Any]:
        """This window's numbers (one host sync), then start a new window."""
        vals = [self._clipped, self._threshold]
        host = [None if v is None else float(v.detach().cpu()) for v in vals]
        clipped = int(host[0] or 0)
        out = {
            "threshold": _finite(host[1]),
            "clipped": clipped,
            "total": self._total,
            "steps": self._steps,
            "clip_fraction": clipped / self._total if self._total else 0.0,
        }
        if self._clipped is not None:
            self._clipped.zero_()
        self._total = 0
        self._steps = 0
        return out

    def decide(self, record: RecordLike) -> list[dict[str, Any]]:
        stats = self.read()
        self.last = stats
        if not stats["clipped"]:
            return []
        return [
            self._event(
                site="model",
                step=record.step,
                what=self._describe(stats),
                before=model_snapshot(record),
                clip=stats,
            )
        ]

    def _describe(self, stats: Mapping[str, Any]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class AutoClip(_Clipper):
    """AutoClip (Seetharaman et al. 2020): clip the total gradient norm to the ``percentile``-th
    percentile of the norms seen so far.

    The history is a ring buffer of the last ``history`` total norms on the gradients'
    device; the threshold is ``torch.nanquantile`` over it (non-finite norms, e.g. fp16
    overflow steps, are stored as NaN and ignored). No host synchronisation per step; the
    clip count and the threshold are read at logging time (:meth:`read`).

    Call :meth:`clip_` after ``scaler.unscale_(optimizer)`` and before ``optimizer.step()``,
    or :meth:`attach` it to the optimizer as a step pre-hook.

    Args:
        percentile: in (0, 100]; the paper's best values are around 10.
        history: how many past norms the percentile is taken over.
        warmup_steps: steps that only record their norm, without clipping.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> clip = AutoClip(percentile=10)
        >>> net(torch.randn(4, 3)).sum().backward()
        >>> clip.clip_(net.parameters())
        >>> clip.read()["steps"]
        1
    """

    name = "adaptive_grad_clip"

    def __init__(
        self, percentile: float = 10.0, *, history: int = 1000, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 0 < percentile <= 100
        ):
            raise ReluDoctorError(
                f"percentile: expected a number in (0, 100] (AutoClip's paper uses 10), got {percentile!r}."
            )
        self.percentile = float(percentile)
        self.history = _check_pos_int("history", history)
        self.warmup_steps = _check_pos_int("warmup_steps", warmup_steps, minimum=0)
        self._buf: torch.Tensor | None = None
        self._pos = 0
        self._seen = 0
        self._last_norm: torch.Tensor | None = None

    @torch.no_grad()
    def clip_(self, params: Iterable[torch.Tensor]) -> None:
        """Record this step's total gradient norm and clip to the percentile (in place)."""
        grads = _grads(params)
        if not grads:
            return
        device = grads[0].device
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
        if self._buf is None:
            self._buf = torch.full((self.history,), float("nan"), device=device)
        elif self._buf.device != device:  # restored from a checkpoint on the CPU
            self._buf = self._buf.to(device)
        self._buf[self._pos].copy_(torch.where(torch.isfinite(total), total, float("nan")))
        self._pos = (self._pos + 1) % self.history
        self._seen += 1
        self._steps += 1
        self._total += 1
        self._last_norm = total
        threshold = torch.nanquantile(self._buf, self.percentile / 100.0)
        self._threshold = threshold
        if self._seen <= self.warmup_steps:
            return
        over = total > threshold  # False for NaN threshold or NaN norm
        coef = torch.where(over, threshold / (total + 1e-6), 1.0)
        torch._foreach_mul_(grads, coef)
        self._count(over)

    def _describe(self, stats: Mapping[str, Any]) -> str:
        thr = stats["threshold"]
        return (
            f"AutoClip (p{self.percentile:g}) clipped the gradient norm on {stats['clipped']} of "
            f"{stats['steps']} steps; threshold now {thr:.4g}"
            if thr is not None
            else f"AutoClip clipped {stats['clipped']} of {stats['steps']} steps"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "percentile": self.percentile,
            "history_size": self.history,
            "history": None if self._buf is None else self._buf.detach().cpu().clone(),
            "pos": self._pos,
            "seen": self._seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        buf = state.get("history")
        if buf is not None:
            buf = torch.as_tensor(buf, dtype=torch.float32)
            if buf.numel() != self.history:
                keep = buf[~torch.isnan(buf)][-self.history :]
                new = torch.full((self.history,), float("nan"))
                new[: keep.numel()] = keep
                buf = new
                self._pos = keep.numel() % self.history
            else:
                self._pos = int(state.get("pos", 0))
            device = self._buf.device if self._buf is not None else torch.device("cpu")
            self._buf = buf.to(device)
        self._seen = int(state.get("seen", 0))

    @property
    def norm_history(self) -> torch.Tensor:
        """The recorded norms, oldest first (NaN-free; a host copy)."""
        if self._buf is None:
            return torch.empty(0)
        b = torch.roll(self._buf.detach().cpu(), -self._pos)
        return b[~torch.isnan(b)]


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, dtype=torch.float32)
    return torch.linalg.vector_norm(
        x, dim=tuple(range(1, x.dim())), keepdim=True, dtype=torch.float32
    )


class AGC(_Clipper):
    """Adaptive gradient clipping (Brock et al. 2021, NFNets): unit-wise, each output unit's
    gradient norm is clipped to ``clipping`` times that unit's weight norm (at least ``eps``).

    Units are rows (dim 0) of weights with two or more dims; vectors (biases, norms' scales)
    count as one unit. The paper leaves the final classifier layer unclipped: pass only the
    parameters you want clipped. No host synchronisation per step.

    Args:
        clipping: the ratio lambda, e.g. 0.01 to 0.16 (smaller for larger batches).
        eps: floor of the weight norm, so zero-initialised units still move.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> agc = AGC(clipping=0.01)
        >>> (net(torch.randn(4, 3)) * 1e3).sum().backward()
        >>> agc.clip_(net.parameters())
        >>> agc.read()["clipped"] > 0
        True
    """

    name = "adaptive_grad_clip"

    def __init__(self, clipping: float = 0.01, *, eps: float = 1e-3) -> None:
        super().__init__()
        if (
            isinstance(clipping, bool)
            or not isinstance(clipping, (int, float))
            or not (clipping > 0 and math.isfinite(clipping))
        ):
            raise ReluDoctorError(
                f"clipping: expected a positive finite ratio (e.g. 0.01), got {clipping!r}."
            )
        self.clipping = float(clipping)
        self.eps = _check_nonneg("eps", eps)
        self._threshold = torch.tensor(self.clipping)

    @torch.no_grad()
    def clip_(self, params: Iterable[torch.Tensor]) -> None:
        """Clip every parameter's gradient unit-wise (in place)."""
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        self._steps += 1
        for p in ps:
            g = p.grad
            assert g is not None
            max_norm = _unitwise_norm(p.detach()).clamp(min=self.eps).mul_(self.clipping)
            gnorm = _unitwise_norm(g)
            over = gnorm > max_norm
            scale = torch.where(over, max_norm / gnorm.clamp(min=1e-6), 1.0)
            g.mul_(scale.to(g.dtype))
            self._count(over)
            self._total += over.numel()

    def _describe(self, stats: Mapping[str, Any]) -> str:
        return (
            f"AGC (lambda {self.clipping:g}) clipped {stats['clipped']} of {stats['total']} "
            f"unit-gradients over {stats['steps']} steps ({stats['clip_fraction']:.1%})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clipping": self.clipping}


# ====================================================================== learning-rate rescue

_SCHED_LISTS = ("base_lrs", "max_lrs", "_last_lr", "lr_lambdas", "min_lrs")
_GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
_SCHED_SCALE = ("base_lrs", "max_lrs")


def _flat_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    seen: set[int] = set()

    def walk(s: Any) -> None:
        if s is None or id(s) in seen:
            return
        seen.add(id(s))
        out.append(s)
        for child in getattr(s, "_schedulers", []) or []:
            walk(child)

    for s in schedulers:
        walk(s)
    return out


def _mul(value: Any, f: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(f)
    return value * f


def scale_lr(
    optimizer: torch.optim.Optimizer,
    factor: float,
    *,
    min_lr: float = 0.0,
    schedulers: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Scale every param group's learning rate by ``factor``, never below ``min_lr``, so that
    the optimizer's LR schedulers keep the reduction.

    Chainable schedulers (StepLR, ExponentialLR, ReduceLROnPlateau...) derive the next lr from
    ``group["lr"]``; closed-form ones (LambdaLR, OneCycleLR, CyclicLR...) recompute it from
    ``scheduler.base_lrs`` / ``group["initial_lr"]`` / ``max_lr``. Both are scaled by the same
    per-group factor, so either kind continues the schedule, reduced.

    Args:
        optimizer: the optimizer.
        factor: in (0, 1).
        min_lr: the floor; a group already at or below it is left alone.
        schedulers: LR schedulers of this optimizer (containers such as SequentialLR are
            walked into).

    Returns:
        One dict per param group: ``group``, ``lr_before``, ``lr_after`` and ``factor``
        (1.0 for a group left alone).

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        >>> _ = scale_lr(opt, 0.1, schedulers=[sched])
        >>> opt.step(); sched.step(); round(opt.param_groups[0]["lr"], 6)
        0.005
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ReluDoctorError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise ReluDoctorError(
            f"factor: expected a number strictly between 0 and 1 (e.g. 0.5), got {factor!r}."
        )
    _check_nonneg("min_lr", min_lr)
    scheds = [s for s in _flat_schedulers(schedulers) if getattr(s, "optimizer", None) is optimizer]
    out = []
    for i, g in enumerate(optimizer.param_groups):
        lr = float(g["lr"])
        new = max(lr * factor, min_lr)
        if not lr > 0 or new >= lr:
            out.append({"group": i, "lr_before": lr, "lr_after": lr, "factor": 1.0})
            continue
        f = new / lr
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(new)
        else:
            g["lr"] = new
        for key in _GROUP_LR_KEYS:
            if key in g and g[key] is not None:
                g[key] = _mul(g[key], f)
        for s in scheds:
            for attr in _SCHED_SCALE:
                vals = getattr(s, attr, None)
                if isinstance(vals, list) and i < len(vals):
                    vals[i] = _mul(vals[i], f)
            last = getattr(s, "_last_lr", None)
            if isinstance(last, list) and i < len(last):
                last[i] = new
        out.append({"group": i, "lr_before": lr, "lr_after": new, "factor": f})
    return out


class LRRescuer(Remedy):
    """Scale the learning rate down on an exploding-gradient finding or a surge of dead units.

    After a reduction, ``cooldown`` logging intervals pass before the next one. The surge
    test compares each site's dead fraction with the previous interval's (the first interval
    with a fully alive start).

    Args:
        optimizer: the optimizer(s) whose param groups are scaled.
        schedulers: their LR schedulers (see :func:`scale_lr`).
        factor: multiply the learning rate by this, in (0, 1).
        min_lr: the floor.
        cooldown: logging intervals to wait after a reduction.
        dead_jump: a rise of a site's dead fraction by at least this much between two
            intervals is a surge, in (0, 1].
        triggers: any of ``"exploding_gradient"``, ``"dead_surge"``, ``"nonfinite"``.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        >>> r = LRRescuer(opt, factor=0.5)
        >>> r.rescue(step=3, reason="manual")["what"]
        'scaled the learning rate by 0.5 (manual): group 0 0.1 -> 0.05'
    """

    name = "lr_rescue"
    TRIGGERS = ("exploding_gradient", "dead_surge", "nonfinite")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        schedulers: Sequence[Any] = (),
        factor: float = 0.5,
        min_lr: float = 1e-6,
        cooldown: int = 2,
        dead_jump: float = 0.2,
        triggers: Sequence[str] = ("exploding_gradient", "dead_surge"),
    ) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ReluDoctorError(
                f"factor: expected a number strictly between 0 and 1 (e.g. 0.5), got {factor!r}."
            )
        self.factor = float(factor)
        self.min_lr = _check_nonneg("min_lr", min_lr)
        self.cooldown = _check_pos_int("cooldown", cooldown, minimum=0)
        self.dead_jump = _check_fraction("dead_jump", dead_jump)
        trig = [triggers] if isinstance(triggers, str) else list(triggers)
        bad = [t for t in trig if t not in self.TRIGGERS]
        if bad or not trig:
            raise ReluDoctorError(
                f"triggers: expected a non-empty subset of {list(self.TRIGGERS)}, got {triggers!r}."
            )
        self.triggers = tuple(trig)
        self.optimizers = _optimizers(optimizer)
        self.schedulers = list(schedulers)
        self.cooldown_left = 0
        self.prev_dead: dict[str, float] = {}
        self.rescues = 0

    def reason(self, record: RecordLike) -> tuple[str, dict[str, Any]] | None:
        """Why this record calls for a rescue (trigger name, evidence), or None. Updates the
        dead-fraction baseline."""
        found: tuple[str, dict[str, Any]] | None = None
        if "exploding_gradient" in self.triggers:
            for f in record.findings:
                if f.kind == "exploding_gradient":
                    found = ("exploding_gradient", {"finding": f.message, **f.evidence})
                    break
        if found is None and "nonfinite" in self.triggers:
            for f in record.findings:
                if f.kind == "nonfinite":
                    found = ("nonfinite", {"site": f.site, "finding": f.message})
                    break
        surge: dict[str, Any] | None = None
        for row in record.sites:
            frac = _finite(row.get("dead_fraction"))
            if frac is None:
                continue
            site = str(row["site"])
            prev = self.prev_dead.get(site, 0.0)
            if frac - prev >= self.dead_jump and (surge is None or frac - prev > surge["jump"]):
                surge = {
                    "site": site,
                    "dead_fraction_before": prev,
                    "dead_fraction": frac,
                    "jump": frac - prev,
                }
            self.prev_dead[site] = frac
        if found is None and surge is not None and "dead_surge" in self.triggers:
            found = ("dead_surge", surge)
        return found

    def rescue(
        self,
        *,
        step: int = 0,
        reason: str = "requested",
        evidence: Mapping[str, Any] | None = None,
        before: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Scale the learning rates now; return the event (``changes`` per group)."""
        if not self.optimizers:
            raise ReluDoctorError(
                "optimizer: LRRescuer has no optimizer to rescue; pass optimizer=...."
            )
        changes = []
        for k, opt in enumerate(self.optimizers):
            for c in scale_lr(opt, self.factor, min_lr=self.min_lr, schedulers=self.schedulers):
                changes.append({"optimizer": k, **c})
        moved = [c for c in changes if c["factor"] < 1.0]
        prefix = (
            (lambda c: f"optimizer {c['optimizer']} group {c['group']}")
            if len(self.optimizers) > 1
            else (lambda c: f"group {c['group']}")
        )
        if moved:
            parts = [f"{prefix(c)} {c['lr_before']:.4g} -> {c['lr_after']:.4g}" for c in moved]
            what = f"scaled the learning rate by {self.factor:g} ({reason}): " + ", ".join(parts)
            if any(c["factor"] > self.factor + 1e-12 for c in moved):
                what += f" (floor {self.min_lr:g})"
        else:
            what = f"learning rate already at the floor {self.min_lr:g}; nothing changed ({reason})"
        self.rescues += 1
        return self._manual(
            self._event(
                site="model",
                step=step,
                what=what,
                before=before,
                trigger=reason,
                evidence=dict(evidence or {}),
                changes=changes,
                schedulers=[type(s).__name__ for s in self.schedulers],
            )
        )

    def decide(self, record: RecordLike) -> list[dict[str, Any]]:
        found = self.reason(record)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return []
        if found is None or not self.optimizers:
            return []
        trigger, evidence = found
        ev = self.rescue(
            step=record.step, reason=trigger, evidence=evidence, before=model_snapshot(record)
        )
        if not any(c["factor"] < 1.0 for c in ev["changes"]):
            self._pending.pop()  # nothing changed: no intervention to report
            self._n_events -= 1
            return []
        self.cooldown_left = self.cooldown
        return [ev]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "cooldown_left": self.cooldown_left,
            "prev_dead": dict(self.prev_dead),
            "rescues": self.rescues,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.cooldown_left = int(state.get("cooldown_left", 0))
        self.prev_dead = {str(k): float(v) for k, v in state.get("prev_dead", {}).items()}
        self.rescues = int(state.get("rescues", 0))


# ====================================================================== recycling (ReDo)

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
_PASS_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_PASS_METHODS = {"contiguous", "clone", "detach"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_REDUCE = {"mean", "sum", "amax"}


@dataclass
class Consumer:
    """A layer that reads a site's output: ``span`` input features per unit (H*W after a
    conv-to-linear flatten, else 1)."""

    path: str
    module: nn.Module
    span: int = 1


@dataclass
class UnitLinks:
    """Where a site's units come from and go to.

    Attributes:
        site: the site name.
        units: number of units.
        producer_path, producer: the Linear/Conv whose output units feed the activation.
        norm_path, norm: the BatchNorm between them, or None.
        consumers: the layers reading the activation's output.
    """

    site: str
    units: int
    producer_path: str
    producer: nn.Module
    norm_path: str | None
    norm: nn.Module | None
    consumers: list[Consumer]

    def describe(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "units": self.units,
            "producer": self.producer_path,
            "norm": self.norm_path,
            "consumers": [{"path": c.path, "span": c.span} for c in self.consumers],
        }


class _Escape(Exception):
    """The flow leaves the traced module: try its parent."""


def _first_arg(node: torch.fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _describe_node(node: Any, root: nn.Module) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{type(root.get_submodule(str(node.target))).__name__} {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)!s}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target!s}"


def _act_nodes(
    graph: torch.fx.Graph, root: nn.Module, rel: str, op: str | None
) -> list[torch.fx.Node]:
    if op is None:
        return [n for n in graph.nodes if n.op == "call_module" and n.target == rel]
    out = []
    for n in graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            continue  # inside a child module: not this module's own call
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else str(n.target)
        if n.op in ("call_function", "call_method") and name.rstrip("_") == op:
            out.append(n)
    return out


def _analyse(
    graph: torch.fx.Graph, root: nn.Module, rel: str, call_index: int, op: str | None, site: str
) -> tuple[str, nn.Module, str | None, nn.Module | None, list[Consumer], int]:
    nodes = _act_nodes(graph, root, rel, op)
    if len(nodes) <= call_index:
        raise _Escape(
            f"{type(root).__name__}: call {call_index} of {rel or op!r} not found in its graph"
        )
    node = nodes[call_index]
    # ---------------------------------------------------------------- producer side
    x = _first_arg(node)
    norm_path: str | None = None
    norm: nn.Module | None = None
    while True:
        if not isinstance(x, torch.fx.Node):
            raise ReluDoctorError(
                f"site {site!r}: its input is not a tensor computed in the model ({x!r})."
            )
        if x.op == "placeholder":
            raise _Escape(f"{type(root).__name__}: the input comes from outside")
        if x.op == "call_module":
            m = root.get_submodule(str(x.target))
            if isinstance(m, _NORMS) and norm is None:
                norm_path, norm = str(x.target), m
                x = _first_arg(x)
                continue
            if isinstance(m, nn.Identity):
                x = _first_arg(x)
                continue
            if isinstance(m, _PRODUCERS):
                producer_path, producer = str(x.target), m
                break
        raise ReluDoctorError(
            f"site {site!r}: its input comes from {_describe_node(x, root)}, not from a Linear or "
            "Conv layer (optionally through one BatchNorm); recycling needs the layer that "
            "produces the units. Exclude this site."
        )
    units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if norm is not None and getattr(norm, "num_features", units) != units:
        raise ReluDoctorError(
            f"site {site!r}: {norm_path} has {norm.num_features} features, {producer_path} {units} outputs."
        )
    conv = not isinstance(producer, nn.Linear)
    ndim = (producer.weight.dim()) if conv else None  # N, C + spatial dims
    # ---------------------------------------------------------------- consumer side
    consumers: list[Consumer] = []
    frontier: list[tuple[torch.fx.Node, bool]] = [(node, False)]
    seen: set[torch.fx.Node] = set()
    while frontier:
        cur, flat = frontier.pop()
        for u in list(cur.users):
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                raise _Escape(f"{type(root).__name__}: the output leaves it")
            through_first = _first_arg(u) is cur
            if u.op == "call_module":
                m = root.get_submodule(str(u.target))
                if isinstance(m, _PRODUCERS) and through_first:
                    span = _consumer_span(m, units, flat, conv, site, str(u.target))
                    consumers.append(Consumer(str(u.target), m, span))
                    continue
                if (
                    isinstance(m, nn.Flatten)
                    and through_first
                    and conv
                    and not flat
                    and m.start_dim == 1
                ):
                    frontier.append((u, True))
                    continue
                elementwise = isinstance(m, (nn.Dropout, nn.Identity, nn.AlphaDropout))
                if isinstance(m, _PASS_MODULES) and through_first and (not flat or elementwise):
                    frontier.append((u, flat))
                    continue
            elif u.op == "call_function":
                if u.target in _PASS_FUNCTIONS and through_first:
                    frontier.append((u, flat))
                    continue
                if u.target is torch.flatten and through_first and conv and not flat:
                    start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                    if start == 1:
                        frontier.append((u, True))
                        continue
                reduce = u.target in (torch.mean, torch.sum, torch.amax)
                if (
                    reduce
                    and through_first
                    and conv
                    and not flat
                    and _reduces_spatial_only(u, ndim)
                ):
                    frontier.append((u, False))
                    continue
                if u.target is getattr:
                    continue  # x.shape
            elif u.op == "call_method" and through_first:
                name = str(u.target)
                if name in _SHAPE_METHODS:
                    continue
                if name in _PASS_METHODS:
                    frontier.append((u, flat))
                    continue
                if name == "flatten" and conv and not flat:
                    start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                    if start == 1:
                        frontier.append((u, True))
                        continue
                if name in ("view", "reshape") and conv and not flat and len(u.args) == 3:
                    frontier.append((u, True))
                    continue
                if name in _REDUCE and conv and not flat and _reduces_spatial_only(u, ndim):
                    frontier.append((u, False))
                    continue
            raise ReluDoctorError(
                f"site {site!r}: its output goes to {_describe_node(u, root)}, which mixes units "
                "or is not a Linear/Conv layer (recycling zeroes the outgoing weights of the "
                "recycled units and follows only pooling, dropout and flattening to them). "
                "Exclude this site."
            )
    if not consumers:
        raise _Escape(f"{type(root).__name__}: no consumer found")
    return producer_path, producer, norm_path, norm, consumers, units


def _reduces_spatial_only(node: torch.fx.Node, ndim: int | None) -> bool:
    arg: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if arg is None or ndim is None:
        return False
    dims: tuple[Any, ...] = (arg,) if isinstance(arg, int) else tuple(arg)
    if not all(isinstance(d, int) for d in dims):
        return False
    norm = {int(d) % ndim for d in dims}
    return 0 not in norm and 1 not in norm


def _consumer_span(m: nn.Module, units: int, flat: bool, conv: bool, site: str, path: str) -> int:
    if isinstance(m, nn.Linear):
        if conv and not flat:
            raise ReluDoctorError(
                f"site {site!r}: Linear {path!r} reads a conv output without flattening it; "
                "cannot tell which inputs belong to which unit."
            )
        if m.in_features % units:
            raise ReluDoctorError(
                f"site {site!r}: Linear {path!r} has {m.in_features} inputs, not a multiple of "
                f"the site's {units} units."
            )
        return m.in_features // units
    if flat or not conv:
        raise ReluDoctorError(
            f"site {site!r}: conv {path!r} reads a {'flattened tensor' if flat else 'Linear output'}; "
            "cannot tell which input channels belong to which unit."
        )
    if m.in_channels != units:
        raise ReluDoctorError(
            f"site {site!r}: conv {path!r} has {m.in_channels} input channels, the site "
            f"{units} units."
        )
    return 1


def _sequential_graph(seq: nn.Sequential) -> torch.fx.Graph:
    g = torch.fx.Graph()
    x: Any = g.placeholder("x")
    for name, _ in seq.named_children():
        x = g.call_module(name, (x,))
    g.output(x)
    return g


def _trace(module: nn.Module, cache: dict[int, Any] | None) -> torch.fx.Graph:
    key = id(module)
    if cache is not None and key in cache:
        mod, graph = cache[key]
        if mod is module:
            if isinstance(graph, BaseException):
                raise graph
            return graph
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception as e:  # any tracing failure: data-dependent control flow, etc.
        if isinstance(module, nn.Sequential):
            graph = _sequential_graph(module)
        else:
            err = RuntimeError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if cache is not None:
                cache[key] = (module, err)
            raise err from None
    if cache is not None:
        cache[key] = (module, graph)
    return graph


def find_unit_links(
    model: nn.Module, site: str, *, cache: dict[int, Any] | None = None
) -> UnitLinks:
    """Find the layer producing ``site``'s units and the layers consuming them.

    Works on ``nn.Sequential`` models and on any model torch.fx can trace: starting from the
    module that holds the activation, each enclosing module is traced in turn until one shows
    both ends. The producer is a Linear or ConvNd, optionally followed by one BatchNorm; the
    path to the consumers (Linear or ConvNd) may pass through dropout, pooling, spatial means,
    post-activation BatchNorm and a conv-to-linear flatten.

    Args:
        model: the model (site paths are relative to it).
        site: a site name (``features.2``, ``layer1.0.relu#0``, ``block:relu#1``).
        cache: a dict to keep traced graphs in between calls.

    Raises:
        ReluDoctorError: naming the site, when no producer/consumer can be found (a
            residual sum feeds or reads it, the model cannot be traced, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> find_unit_links(net, "1").describe()["producer"]
        '0'
    """
    path, call_index, op = _parse_site(site)
    _get_module(model, path, "site")
    if op is None:
        parts = path.split(".") if path else []
        if not parts:
            raise ReluDoctorError(
                f"site {site!r}: the model itself is the activation; nothing feeds it."
            )
        start = len(parts) - 1
    else:
        parts = path.split(".") if path else []
        start = len(parts)
    reasons: list[str] = []
    for depth in range(start, -1, -1):
        anc_path = ".".join(parts[:depth])
        anc = model.get_submodule(anc_path) if anc_path else model
        rel = ".".join(parts[depth:])
        try:
            graph = _trace(anc, cache)
        except RuntimeError as e:
            reasons.append(
                f"{_label(anc_path)} ({type(anc).__name__}) cannot be traced by torch.fx: {e}"
            )
            continue
        try:
            pp, prod, np_, norm, cons, units = _analyse(graph, anc, rel, call_index, op, site)
        except _Escape as e:
            reasons.append(str(e))
            continue
        pre = f"{anc_path}." if anc_path else ""
        for c in cons:
            c.path = pre + c.path
        return UnitLinks(site, units, pre + pp, prod, (pre + np_) if np_ else None, norm, cons)
    raise ReluDoctorError(
        f"site {site!r}: cannot find the layers that produce and consume its units "
        f"({'; '.join(reasons)}). Recycling needs an nn.Sequential or a torch.fx-traceable "
        "model; exclude this site or make the enclosing module traceable."
    )


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _zero_rows(idx: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def fn(t: torch.Tensor) -> None:
        t.index_fill_(0, idx.to(t.device), 0)

    return fn


def _zero_inputs(m: nn.Module, idx: torch.Tensor, span: int) -> Callable[[torch.Tensor], None]:
    if isinstance(m, nn.Linear):
        cols = (idx[:, None] * span + torch.arange(span)[None, :]).reshape(-1)

        def lin(t: torch.Tensor) -> None:
            t.index_fill_(1, cols.to(t.device), 0)

        return lin
    groups = int(getattr(m, "groups", 1))
    if groups == 1:

        def conv(t: torch.Tensor) -> None:
            t.index_fill_(1, idx.to(t.device), 0)

        return conv
    in_pg = m.in_channels // groups  # type: ignore[operator]
    out_pg = m.out_channels // groups  # type: ignore[operator]
    parts = []
    for g in range(groups):
        local = idx[(idx // in_pg) == g] % in_pg
        if local.numel():
            parts.append((g, local))

    def grouped(t: torch.Tensor) -> None:
        for g, local in parts:
            t[g * out_pg : (g + 1) * out_pg].index_fill_(1, local.to(t.device), 0)

    return grouped


def _reset_state(
    optimizers: Sequence[torch.optim.Optimizer],
    targets: Sequence[tuple[torch.Tensor, Callable[[torch.Tensor], None]]],
) -> list[str]:
    touched = []
    for opt in optimizers:
        for p, fn in targets:
            st = opt.state.get(p)
            if not st:
                continue
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.shape == p.shape:
                    fn(val)
                    touched.append(key)
    return sorted(set(touched))


def recycle_units(
    links: UnitLinks,
    units: Sequence[int] | torch.Tensor,
    *,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Recycle ``units`` of a site (ReDo): re-initialise their incoming weights, zero their
    outgoing weights, reset the optimizer state of exactly those slices.

    * the producer's rows (weight and bias) get fresh values from the layer's default
      initialisation (Kaiming-uniform with ``a=sqrt(5)``, bias ``U(+-1/sqrt(fan_in))``),
      drawn from ``generator`` on the CPU (so every device and every rank draws the same);
    * a BatchNorm between producer and activation gets weight 1, bias 0, running mean 0 and
      running variance 1 for those units;
    * each consumer's input columns of those units are zeroed (``span`` columns per unit
      after a conv-to-linear flatten; grouped convs handled);
    * in every optimizer, each state tensor shaped like one of those parameters (Adam/AdamW
      ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``...) is zeroed
      on exactly those slices. Scalars such as Adam's ``step`` are left alone.

    Everything else stays bit-identical.

    Returns:
        What changed: ``units``, ``producer``, ``norm``, ``consumers``, ``optimizer_state``
        (the state keys reset).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> out = recycle_units(find_unit_links(net, "1"), [0, 2])
        >>> net[2].weight[0, [0, 2]].tolist()
        [0.0, 0.0]
    """
    idx = torch.as_tensor(
        list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long
    ).flatten()
    idx = torch.unique(idx)
    if idx.numel() == 0:
        return {
            "units": [],
            "producer": links.producer_path,
            "norm": links.norm_path,
            "consumers": [c.path for c in links.consumers],
            "optimizer_state": [],
        }
    if int(idx.min()) < 0 or int(idx.max()) >= links.units:
        raise ReluDoctorError(
            f"units: indices must be in [0, {links.units}) for site {links.site!r}, got {idx.tolist()[:10]}."
        )
    opts = _optimizers(optimizers, "optimizers")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    prod = links.producer
    targets: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
    with torch.no_grad():
        w = _tensor(prod, "weight")
        assert w is not None
        fresh = torch.empty((idx.numel(), *w.shape[1:]), dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        w.index_copy_(0, idx.to(w.device), fresh.to(w.device, w.dtype))
        targets.append((w, _zero_rows(idx)))
        b = _tensor(prod, "bias")
        if b is not None:
            fan_in = w[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            fb = torch.empty(idx.numel(), dtype=torch.float32).uniform_(
                -bound, bound, generator=gen
            )
            b.index_copy_(0, idx.to(b.device), fb.to(b.device, b.dtype))
            targets.append((b, _zero_rows(idx)))
        norm = links.norm
        if norm is not None:
            for name, value, is_param in (
                ("weight", 1.0, True),
                ("bias", 0.0, True),
                ("running_mean", 0.0, False),
                ("running_var", 1.0, False),
            ):
                t = _tensor(norm, name)
                if t is not None:
                    t.index_fill_(0, idx.to(t.device), value)
                    if is_param:
                        targets.append((t, _zero_rows(idx)))
        for c in links.consumers:
            fn = _zero_inputs(c.module, idx, c.span)
            cw = _tensor(c.module, "weight")
            assert cw is not None
            fn(cw)
            targets.append((cw, fn))
        state_keys = _reset_state(opts, targets)
    return {
        "units": idx.tolist(),
        "producer": links.producer_path,
        "norm": links.norm_path,
        "consumers": [c.path for c in links.consumers],
        "optimizer_state": state_keys,
    }


class DormantRecycler(Remedy):
    """Recycle dormant units (ReDo, Sokar et al. 2023) every ``every`` logging intervals.

    The units are those the record marks dormant (ReDo score <= the doctor's tau, which
    includes dead units), or those with ``dormant_score <= tau`` when ``tau`` is given.

    Args:
        model: the model (site paths are relative to it).
        optimizers: optimizer(s) whose state slices are reset.
        tau: own dormant threshold in (0, 1), or None to use the record's ``dormant`` flag.
        every: act on every n-th logging interval.
        max_fraction: recycle at most this fraction of a site's units at once (the most
            dormant first).
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        on_unlinkable: ``"warn"`` (skip the site, once) or ``"raise"`` when a site's producer
            or consumers cannot be found.
        seed: base seed of the re-initialisation (combined with step and site).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> rec = DormantRecycler(net)
        >>> rec.recycle("1", [1], step=0)["units"]
        [1]
    """

    name = "dormant_reset"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        tau: float | None = None,
        every: int = 1,
        max_fraction: float = 1.0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        on_unlinkable: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.optimizers = _optimizers(optimizers, "optimizers")
        if tau is not None and (
            isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < 1
        ):
            raise ReluDoctorError(
                f"tau: expected None or a number strictly between 0 and 1 (ReDo uses 0.1 or 0.025), got {tau!r}."
            )
        self.tau = tau
        self.every = _check_pos_int("every", every)
        self.max_fraction = _check_fraction("max_fraction", max_fraction)
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        if on_unlinkable not in ("warn", "raise"):
            raise ReluDoctorError(
                f"on_unlinkable: expected 'warn' or 'raise', got {on_unlinkable!r}."
            )
        self.on_unlinkable = on_unlinkable
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ReluDoctorError(f"seed: expected an int, got {seed!r}.")
        self.seed = seed
        self.intervals = 0
        self.recycled: dict[str, int] = {}
        self._links: dict[str, UnitLinks] = {}
        self._unlinkable: dict[str, str] = {}
        self._graphs: dict[int, Any] = {}

    def links(self, site: str) -> UnitLinks:
        """The (cached) :class:`UnitLinks` of ``site``."""
        if site not in self._links:
            self._links[site] = find_unit_links(self.model, site, cache=self._graphs)
        return self._links[site]

    def _generator(self, site: str, step: int) -> torch.Generator:
        s = (self.seed * 1_000_003 + zlib.crc32(f"{site}@{step}".encode())) % (2**63)
        return torch.Generator().manual_seed(s)

    def recycle(
        self,
        site: str,
        units: Sequence[int],
        *,
        step: int = 0,
        before: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Recycle ``units`` of ``site`` now; return the event."""
        links = self.links(site)
        what = recycle_units(
            links, units, optimizers=self.optimizers, generator=self._generator(site, step)
        )
        self.recycled[site] = self.recycled.get(site, 0) + len(what["units"])
        desc = (
            f"recycled {len(what['units'])} of {links.units} units: re-initialised their "
            f"incoming weights in {what['producer']}"
            + (f" (and reset {what['norm']})" if what["norm"] else "")
            + f", zeroed their outgoing weights in {', '.join(what['consumers'])}"
            + (
                f", reset optimizer state {', '.join(what['optimizer_state'])} of those slices"
                if what["optimizer_state"]
                else ""
            )
        )
        return self._manual(
            self._event(
                site=site,
                step=step,
                what=desc,
                before=before,
                units=what["units"],
                links=links.describe(),
                optimizer_state=what["optimizer_state"],
            )
        )

    def decide(self, record: RecordLike) -> list[dict[str, Any]]:
        self.intervals += 1
        if self.intervals % self.every:
            return []
        units = record.units
        if units is None or not len(units):
            return []
        events = []
        for row in record.sites:
            site = str(row["site"])
            if site in self._unlinkable or not _selected(site, self.include, self.exclude):
                continue
            u = units[units["site"] == site]
            if self.tau is None:
                mask = u["dormant"].astype(bool)
            else:
                mask = (u["dormant_score"] <= self.tau) | u["dead"].astype(bool)
            chosen = u[mask.to_numpy()]
            if not len(chosen):
                continue
            limit = max(1, math.floor(self.max_fraction * int(row["units"])))
            chosen = chosen.sort_values(
                ["dormant_score", "unit"], na_position="first", kind="stable"
            ).head(limit)
            idx = sorted(int(i) for i in chosen["unit"])
            try:
                events.append(self.recycle(site, idx, step=record.step, before=site_snapshot(row)))
            except ReluDoctorError as e:
                if self.on_unlinkable == "raise":
                    raise
                self._unlinkable[site] = str(e)
                self.warn(f"DormantReset: leaving site {site!r} alone: {e}")
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "intervals": self.intervals,
            "recycled": dict(self.recycled),
            "unlinkable": dict(self._unlinkable),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.intervals = int(state.get("intervals", 0))
        self.recycled = {str(k): int(v) for k, v in state.get("recycled", {}).items()}
        self._unlinkable = {str(k): str(v) for k, v in state.get("unlinkable", {}).items()}
