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

import reprlib
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

import torch
import torch.nn as nn

from relu_doctor._validate import finite_or_none, matches
from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.events import Declined, Event, Intervention, InterventionResult
from relu_doctor.families import family_of
from relu_doctor.probes import Probe, unwrapped
from relu_doctor.remedies._held import record_from_state, record_state
from relu_doctor.remedies._privacy import PRIVATE, private_by
from relu_doctor.remedies._sharding import DTENSOR, refuse_several, refuse_sharded, sharding_of
from relu_doctor.remedies.evidence import (
    MIN_EVIDENCE_STEPS,
    SNAPSHOT_KEYS,
    DeadEvidence,
    Snapshot,
    dead_surge,
    model_snapshot,
    site_snapshot,
    units_snapshot,
)
from relu_doctor.remedies.judging import MIN_GAIN, TARGETS, Pending, loss_of
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
    "units_snapshot",
]

#: The site of a model-wide intervention (clipping, learning rate).
MODEL = "model"

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


@runtime_checkable
class DoctorLike(Protocol):
    """What :meth:`Remedy.bind` needs from a :class:`relu_doctor.doctor.Doctor`."""

    @property
    def probe(self) -> Probe: ...

    @property
    def model(self) -> nn.Module: ...

    def add_listener(self, fn: Callable[[Any], Any]) -> None: ...

    def need_collected_per_window(self, n: int) -> None: ...

    def record_event(self, event: Event) -> None: ...

    def site_key(self, name: str) -> SiteKey: ...


#: the Doctors told that a surgery was made with its loss guard off
_TOLD_UNGUARDED: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn(message: str) -> None:  # (a ReluDoctorWarning, at the user's line)
    warnings.warn(message, ReluDoctorWarning, stacklevel=user_stacklevel())


# ---------------------------------------------------------------------- shared argument checks


def check_model(value: object) -> nn.Module:
    """The ``model`` argument of a remedy: a ``torch.nn.Module``; a ``torch.compile`` wrapper
    stands for the module it compiles, as in ``watch`` (its hooks, on the wrapper, ran
    inside Dynamo's trace and raised there, and its paths read ``_orig_mod.*``), and
    Fabric's for the module it wraps (:func:`~relu_doctor.probes.unwrapped`)."""
    if not isinstance(value, nn.Module):
        raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(value).__name__}.")
    return cast(nn.Module, unwrapped(value))


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
    :meth:`load_state_dict` (and :meth:`observe` for what every record is read for, final
    ones included; :attr:`holds_final` False when :meth:`decide` only reports).
    """

    #: the remedy's name in events (``leaky_relu_swap``, ``dormant_reset``...)
    name: ClassVar[str] = "remedy"
    #: whether a ``final`` record's :meth:`decide` waits until training goes on (it changes
    #: what later steps train); False where it only reports what the window did (a
    #: clipper's clip counts), which is wanted on the last window too
    holds_final: ClassVar[bool] = True
    #: why this remedy, as configured, cannot act on parameters sharded across processes
    #: (FSDP, DeepSpeed ZeRO-3, tensor parallelism); None when it acts the same on shards.
    #: Those that cannot refuse sharded parameters before training (:func:`refuse_sharded`).
    on_shards: str | None = None
    #: whether it decides from the Doctor's records (per process unless summed across them)
    reads_records: ClassVar[bool] = True
    #: whether its changes are also judged on the training loss (a change after which the
    #: loss rose :data:`~relu_doctor.remedies.judging.LOSS_HARM` times "did not help"):
    #: surgery's, which can jolt a run; not a learning-rate cut's or clipping's, which only
    #: calm it (a diverging run's loss rising after a cut is not the cut's doing)
    guards_loss: ClassVar[bool] = False
    #: glob patterns of the site names it may act at (none: every site), and of those it
    #: leaves alone; set by the remedies that act per site (:meth:`acts_at`)
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    #: the option it was made from, where not by its constructor (the Hugging Face
    #: callback's ``dormant_reset={...}``): its refusals spell ``exclude`` in that form
    options_name: str | None = None

    def __init__(self) -> None:
        self.doctor: DoctorLike | None = None
        #: how to warn (a Lightning callback passes ``rank_zero_warn``)
        self.warn: Callable[[str], Any] = _warn
        self._pending: list[Pending] = []
        self._n_events = 0
        self._in_call = False
        self._stepped_aside = False  # a bug in observe or decide: it decides no more
        self._made: list[Intervention] = []  # made in the decide running now
        self._loss_seen: float | None = None  # the training loss of the last record read
        self._held: RecordLike | None = None  # a final record: decided if training goes on
        #: what the next intervention is judged on (a plan sets it before acting): metric
        #: name, ``min_gain`` and ``tolerance`` of :func:`verdict`
        self.judge: tuple[str | None, float, float] = (
            TARGETS.get(self.name), MIN_GAIN.get(self.name, 0.0), 0.0)
        #: the dead readings it decides on, sampled windows pooled (see :attr:`reads_dead`)
        self.evidence = DeadEvidence()

    def acts_at(self, site: str) -> bool:
        """Whether this remedy may act at ``site`` (a site name): by its ``include``/
        ``exclude`` where it has them, narrowed by a remedy that treats some kinds of site."""
        return matches(site, self.include, self.exclude)

    @property
    def pending(self) -> tuple[Pending, ...]:
        """The interventions whose metrics after are still to be measured."""
        return tuple(self._pending)

    def bind(self: R, doctor: DoctorLike, *, listen: bool = True) -> R:
        """Listen to ``doctor``'s interval records and record events through it (idempotent).
        With ``listen=False`` only record through it: a
        :class:`~relu_doctor.remedies.plan.TreatmentPlan` decides when this remedy acts."""
        if not isinstance(doctor, DoctorLike):  # (its members: no import of the Doctor here)
            raise ReluDoctorError(
                f"doctor: expected a relu_doctor.Doctor (as relu_doctor.watch(model) returns), "
                f"got {type(doctor).__name__} {reprlib.repr(doctor)}."
            )
        if self.doctor is doctor:
            return self
        if self.reads_records and getattr(doctor, "all_reduce", None) is None and (
                n := getattr(doctor, "processes", 1)) > 1 and not getattr(
                    doctor, "_said_unsummed", False):
            doctor._said_unsummed = True  # type: ignore[attr-defined]  # (once per Doctor)
            self.warn(
                f"relu_doctor: {type(self).__name__} decides from this process's statistics "
                f"alone: {n} processes run, and the Doctor sums nothing across them (watch "
                "without all_reduce=). Under DDP each process would change its own copy of the "
                "model, and the copies would part: pass all_reduce= (the sum across processes), "
                f"world_size={n} and is_writer=(rank == 0) to watch, on every process (the "
                "README's 'Distributed' section). Where each process trains a model of its "
                "own, this is as meant."
            )
        if (private := self._private(doctor)) is not None:
            raise ReluDoctorError(
                f"model: {type(self).__name__} cannot treat a model trained with "
                f"differential privacy, got {private}: {PRIVATE}.")
        treats, watched = getattr(self, "model", None), getattr(doctor, "model", None)
        if isinstance(treats, nn.Module) and isinstance(watched, nn.Module) and treats is not watched:
            # (its site paths are the Doctor's model's: another model's found none of them and
            # was said only at the first change, or, a copy of it, would be changed in its
            # stead: a Fabric trial's plan given the model that setup wrapped)
            raise ReluDoctorError(
                f"model: {type(self).__name__} treats a {type(treats).__name__} that is not the "
                f"model the Doctor watches (a {type(watched).__name__}); give both the same "
                "model (an EMA copy, a teacher, or DDP's wrapper around it is another).")
        self._before_bind(doctor)  # (what may refuse it, before anything is bound)
        self.doctor = doctor
        try:
            self._on_bind(doctor)
        except BaseException:  # bound to nothing: it never acts, as its caller is told
            self._unbind()
            raise
        # Listening last: a plan whose clipper could not hook the optimizer it was given
        # listened all the same, and went on recycling and cutting the learning rate
        # with nothing recorded (an accelerate trial's bind that raised, caught).
        if listen:
            doctor.add_listener(self)
        if self.reads_dead:  # a dead reading on too few batches is noise (DeadEvidence)
            doctor.need_collected_per_window(MIN_EVIDENCE_STEPS)
        return self

    def _unbind(self) -> None:
        """Undo a :meth:`bind` whose :meth:`_on_bind` raised midway: a plan's remedies,
        bound before its clipper failed to hook the optimizer, are bound to nothing too."""
        self.doctor = None
        for r in getattr(self, "_remedies", {}).values():
            r._unbind()

    @property
    def reads_dead(self) -> bool:
        """Whether this remedy decides from dead-unit fractions (then binding it asks the
        Doctor for :data:`MIN_EVIDENCE_STEPS` collected steps per logging window)."""
        return False

    def _on_bind(self, doctor: DoctorLike) -> None:
        """Hook for subclasses (take the probe, refresh hooks...)."""

    def _before_bind(self, doctor: DoctorLike) -> None:
        """Hook for subclasses: checks that may refuse ``doctor`` (raise) before binding."""

    def __call__(self, record: RecordLike) -> list[Intervention | InterventionResult]:
        """Judge the pending interventions on ``record`` (:meth:`observe`), then act on it
        (:meth:`decide`).

        A ``final`` record (logged at or after training's last optimizer step) is observed
        but held, not decided on: no step would train what an action changed (a recycled
        unit would be saved untrained, a swapped activation never trained with). If
        training goes on (a second ``fit``, a run resumed from a checkpoint), the held
        record is decided on at the end of its first step (:meth:`release_held`): the
        decisions an uninterrupted run made there, one step later. A remedy whose decision
        only reports (:attr:`holds_final` False) decides on a final record at once.

        A record that arrives while one is held (the first step after it closed a window
        too, or no Doctor released it) ran before the held decision: it is observed and the
        held record decided on, not it, so that the changes made now are judged on the
        window after them. A newer final record takes the place of the held one."""
        try:  # (also once stepped aside: the changes it made are judged)
            events: list[Intervention | InterventionResult] = list(self.observe(record))
        except ReluDoctorError:
            raise
        except Exception as exc:  # a bug, never into the user's step (see _decide)
            return self._step_aside(record, exc)
        held, self._held = self._held, None
        if self.holds_final and getattr(record, "final", False):
            self._held = record
        else:
            events += self._decide(held if held is not None else record)
        if self.doctor is not None:
            for e in events:
                self.doctor.record_event(e)
        return events

    def _decide(self, record: RecordLike) -> list[Intervention]:
        if self._stepped_aside:
            return []
        if (private := self._private()) is not None:  # (made private after the bind)
            self._stepped_aside = True
            if callable(detach := getattr(self, "detach", None)):
                detach()  # (a clipper's optimizer hook clipped on, silently: a review)
            self.warn(f"relu_doctor: the {self.name} remedy makes no changes from step "
                      f"{record.step}: the model is now trained with differential privacy "
                      f"({private}). {PRIVATE}. Monitoring and training go on.")
            return []
        self._in_call, self._made = True, []
        try:
            return self.decide(record)
        except ReluDoctorError:  # its own refusal (on_unlinkable="raise"...): said as it is
            raise
        except Exception as exc:  # a bug, never into the user's step: this remedy steps
            return self._step_aside(record, exc)  # aside, what it made before it recorded
        finally:
            self._in_call, self._made = False, []

    def _private(self, doctor: DoctorLike | None = None) -> str | None:
        """:func:`private_by` of the models it acts on (its own, the Doctor's): every module
        at a bind (``doctor`` given), the root and the parameters at a decision."""
        models = (getattr(self, "model", None), getattr(doctor or self.doctor, "model", None))
        return next((p for m in models if isinstance(m, nn.Module)
                     and (p := private_by(m, deep=doctor is not None)) is not None), None)

    def _step_aside(self, record: RecordLike, e: Exception) -> list[Any]:  # those it made
        if not self._stepped_aside:
            self._stepped_aside = True
            self.warn(f"relu_doctor: the {self.name} remedy failed at step {record.step} "
                      f"({type(e).__name__}: {e}); it makes no more changes (those it made "
                      "stay, recorded). Monitoring and training go on.")
        return list(self._made)

    @property
    def held(self) -> RecordLike | None:
        """The ``final`` record awaiting a decision if training goes on, or None (always
        None when :attr:`holds_final` is False)."""
        return self._held

    def _hold(self, record: RecordLike | None) -> None:
        """Hold ``record`` (from a checkpoint, or a predecessor): a remedy that does not
        hold final records decided on it already (a checkpoint of an older version may
        carry one), so it takes none."""
        self._held = record if self.holds_final else None

    def release_held(self) -> list[Intervention]:
        """Training went on after a ``final`` record: decide on it now (the bound Doctor
        calls this at the end of the first step since). Returns the new interventions,
        recorded through the bound Doctor."""
        record, self._held = self._held, None
        if record is None:
            return []
        events = self._decide(record)
        if self.doctor is not None:
            for e in events:
                self.doctor.record_event(e)
        return events

    def observe(self, record: RecordLike) -> list[InterventionResult]:
        """What every record is read for, final or not, before any decision: the results of
        the pending interventions (a plan also judges its remedies' changes here)."""
        return self._results(record)

    def decide(self, record: RecordLike) -> list[Intervention]:
        """Act on one record; return the new interventions."""
        raise NotImplementedError

    def carry_from(self, old: Remedy) -> None:
        """Go on where ``old`` stopped: the remedy of the same kind that this one replaces
        when a callback rebuilds its remedies for another ``fit`` in the same process. Its
        whole state (:meth:`state_dict`: pending judgements, evidence, counters) and what
        only lives in memory (:meth:`_carry_objects`: the held record, a swap's undo
        records), so that a loop of short fits is treated as one long one."""
        self.load_state_dict(old.state_dict())
        self._carry_objects(old)

    def _carry_objects(self, old: Remedy) -> None:
        """The in-memory part of :meth:`carry_from` (subclasses extend it)."""
        self._hold(old._held)

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
        judged on :attr:`judge`'s metric), else its details say ``judged: False``."""
        self._n_events += 1
        if not measure_after:
            details = {**details, "judged": False}
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
        if self._in_call:
            self._made.append(ev)
        if measure_after:
            self._pending.append(Pending.of(ev.id, site, self.judge, before, details.get("units"),
                                            loss=self._loss_seen if self.guards_loss else None))
            if self.guards_loss and self._loss_seen is None and self.doctor is not None:
                self._say_unguarded(self.doctor)
        return ev

    def _say_unguarded(self, doctor: DoctorLike) -> None:
        """Say once per Doctor that a surgery it will judge is made with no training loss
        to judge it on: the loss guard is off (a review: a LightningModule in manual
        optimisation returning nothing had it off unsaid)."""
        if doctor in _TOLD_UNGUARDED:
            return
        _TOLD_UNGUARDED.add(doctor)
        self.warn(
            f"relu_doctor: {self.name} changes the model with no training loss to judge the "
            "change on, so its loss guard (a change after which the window's loss doubles "
            "did not help) is off. Give the loss: doc.step(loss=loss) in a plain loop; "
            "under Lightning, return it from training_step (in manual optimisation too); "
            "the HF Trainer's model output's loss is taken (none from a custom compute_loss "
            "or return_dict=False's tuples), and Keras' loss tracker.")

    def model_snapshot(self, record: RecordLike, sites: Sequence[str] | None = None) -> Snapshot:
        """The model-wide metrics its changes are judged on (:func:`model_snapshot`, over
        ``sites`` where given; a clipper adds the gradient norm it saw before clipping)."""
        return model_snapshot(record, sites)

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

    def decline(self, site: str, reason: str, step: int, what: str, where: str = "") -> None:
        """Leave ``site`` alone from now on for ``reason``: warned once (in ``what``'s name at
        ``where``, default the site), and recorded: the report advises it there no more."""
        form = (f"{self.options_name}={{'exclude': [{site!r}]}}" if self.options_name
                else f"exclude=[{site!r}]")
        self.warn(f"{what}: leaving {where or f'site {site!r}'} alone: {reason}".replace(
            "Exclude this site.", f"It stays alone ({form} keeps it out from the start)."))
        if self.doctor is not None:
            self.doctor.record_event(Declined(self.name, site, step, reason))

    def _results(self, record: RecordLike) -> list[InterventionResult]:
        self._loss_seen = loss_of(record)  # (the window the changes made now are made at)
        pending, self._pending = self._pending, []
        out = []
        for p in pending:
            if p.site == MODEL:  # (over the sites its before was of)
                after: dict[str, Any] | None = self.model_snapshot(record, p.sites)
            else:
                row = record.site_row(p.site)
                after = site_snapshot(row) if row is not None else None
            result = p.result(self.name, record, after)
            if result is None:  # its units unseen in this window: judged at a later one
                self._pending.append(p.waited_once())
            else:
                out.append(result)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pending": [p.to_dict() for p in self._pending],
                               "n_events": self._n_events}
        if self._loss_seen is not None:  # (a held record's changes are made on it)
            out["loss_seen"] = self._loss_seen
        if self.reads_dead:  # the pool filling: a resumed run goes on with it
            out["evidence"] = self.evidence.state_dict()
        if self._held is not None:  # decided on when the resumed run starts
            out["held"] = record_state(self._held)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = [Pending.from_dict(p) for p in state.get("pending", [])]
        self._n_events = int(state.get("n_events", 0))
        self._loss_seen = finite_or_none(state.get("loss_seen"))
        self.evidence.load_state_dict(state.get("evidence") or {})
        held = state.get("held")
        self._hold(record_from_state(held) if held else None)
