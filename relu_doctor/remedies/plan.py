"""The treatment plan: one object decides which remedy acts, where and when.

Remedies bound one by one all act on the same symptom at once (five changes at one step,
and no way to tell which helped). A :class:`TreatmentPlan` runs them in order instead:

* **gentlest first**: its steps are tried in the order given (default: gradient clipping,
  then the learning rate, then surgery: ReDo recycling, which leaves the model's output
  unchanged at the moment it acts, then the LeakyReLU swap, which changes the architecture);
* **one change per site per cooldown**: after a change at a site (``"model"`` for clipping
  and the learning rate) that site is left alone for ``cooldown`` logging intervals; a
  model-wide change also holds back surgery everywhere for as long, so its effect is seen
  alone;
* **judged on its own target**: each change is measured one interval later on the metric
  that called for it (the result event carries ``target`` and ``verdict``); a step that did
  not help is not repeated at that site (a clipper that did not help is switched off);
* **do no harm**: every trigger is a clear symptom (a dead-unit surge, an exploding or
  non-finite gradient, a site whose dead fraction passes a threshold), so a healthy run sees no
  change at all; where the loop clips the gradients itself (``clip_grad_norm_``, found from
  the norms the plan's clipper records; a framework's own clipping, told by its callback),
  the clip step stays idle, said once, so that two clippers never both clip;
* **hopeless runs** (opt-in): when most units are dead since monitoring began, or values
  are non-finite, after the plan's steps had their chance, :attr:`TreatmentPlan.should_stop`
  turns true and a ``stop`` event records the evidence.

Example (a plain loop):

    >>> import torch, torch.nn as nn, relu_doctor
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.Adam(net.parameters())
    >>> with relu_doctor.watch(net, log_every_n_steps=1) as doc:
    ...     plan = TreatmentPlan(net, optimizer=opt).bind(doc)
    ...     net(torch.randn(16, 4)).sum().backward(); opt.step()
    ...     _ = doc.step()
    >>> [s.remedy for s in plan.steps]
    ['clip', 'lr', 'recycle', 'swap']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import torch.nn as nn

from relu_doctor._validate import finite_or_none, number_in, positive_int
from relu_doctor._validate import optimizers as check_optimizers
from relu_doctor.diagnosis import acted_on
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Declined, Intervention, InterventionResult
from relu_doctor.remedies._link_cache import skip_for_now
from relu_doctor.remedies._plan_reading import View, most_dormant
from relu_doctor.remedies.base import (
    MODEL,
    DoctorLike,
    Optimizers,
    RecordLike,
    Remedy,
    check_model,
    dead_surge,
    model_snapshot,
    site_snapshot,
    units_snapshot,
)
from relu_doctor.remedies.judging import NOT_HELPED
from relu_doctor.remedies.plan_steps import DEFAULT_STEPS, PLAN_REMEDIES, PlanStep, plan_steps
from relu_doctor.remedies.unit_links import NotInPass

__all__ = ["DEFAULT_STEPS", "PLAN_REMEDIES", "PlanStep", "TreatmentPlan"]

#: Never clip (AutoClip records gradient norms only, so its percentile is ready when needed).
_NEVER = 10**15


#: The method a controller given to :meth:`TreatmentPlan.use` must offer, per step.
_ACTIONS = {"lr": "rescue", "swap": "swap"}


class _Rescues(Protocol):
    def rescue(self, *, step: int, reason: str, evidence: Mapping[str, Any] | None,
               before: Mapping[str, Any] | None) -> Intervention | None: ...


class _Swaps(Protocol):
    def swap(self, site: str, *, step: int, before: Mapping[str, Any] | None,
             reason: str) -> Intervention: ...


class TreatmentPlan(Remedy):
    """Coordinate the remedies: gentlest first, one change per site per cooldown, each
    judged on its target metric, none repeated where it did not help.

    Bind it to a Doctor (``plan.bind(doc)``) instead of binding remedies one by one. Read
    what it did in the run's interventions (each with ``target``, ``verdict`` and, for
    recycling, ``efficacy``) or in :meth:`describe`.

    Args:
        model: the model.
        optimizer: the optimizer(s) (clipping, the learning rate, optimizer-state resets).
        schedulers: their LR schedulers (kept in step with a learning-rate cut).
        steps: the ordered steps (default :data:`DEFAULT_STEPS`): each a :class:`PlanStep`,
            or a remedy's name (``"recycle"``) for its step with the default settings.
        cooldown: logging intervals a site is left alone after a change (>= 1).
        dead_jump: a rise of a site's dead fraction by this much between two intervals is
            a surge (a model-wide trigger).
        patience: logging intervals in a row a site must be past a surgery step's threshold
            before that step acts (so a model-wide step can act first).
        stop_when_hopeless: let :attr:`should_stop` turn true on a hopeless run.
        hopeless_fraction: the share of units dead since monitoring began that is hopeless.
        seed: seed of the re-initialisations.

    Attributes:
        should_stop: True once the run was found hopeless (only with
            ``stop_when_hopeless``); a plain loop breaks on it, the Lightning callback
            stops the Trainer.
        failed: ``(step remedy, site)`` pairs that did not help (not repeated).
    """

    name = "treatment_plan"
    reads_dead = True

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: Optimizers = None,
        schedulers: Sequence[Any] = (),
        steps: Sequence[PlanStep | str] = DEFAULT_STEPS,
        cooldown: int = 2,
        dead_jump: float = 0.2,
        patience: int = 2,
        stop_when_hopeless: bool = False,
        hopeless_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = check_model(model)
        self.optimizers = check_optimizers("optimizer", optimizer)
        self.schedulers = list(schedulers)
        self.steps = plan_steps(steps)
        self.cooldown = positive_int("cooldown", cooldown)
        self.dead_jump = number_in("dead_jump", dead_jump, 0.0, 1.0)
        self.patience = positive_int("patience", patience)
        self.stop_when_hopeless = bool(stop_when_hopeless)
        self.hopeless_fraction = number_in("hopeless_fraction", hopeless_fraction, 0.0, 1.0)
        self.seed = positive_int("seed", seed, minimum=0)
        self.should_stop = False
        self.failed: set[tuple[str, str]] = set()
        #: steps left idle, never tried: a clip step where the loop clips itself
        self.idle: set[str] = set()
        self._rehook = False  # the watch's end took the clipper's hook off (see watch_attached)
        #: surgery steps after a change of which the training loss rose (LOSS_HARM): the
        #: run is in a regime where changing units jolts it, and no surgery is made again
        #: in it (a swap so judged is undone)
        self.harmful: set[str] = set()
        self._spent: set[str] = set()  # model-wide steps tried on non-finite values (once)
        self.interval = 0
        self._last_change: dict[str, int] = {}  # site -> interval of its last change
        self._prev_dead: dict[str, float] = {}
        self._prev_model_dead: float | None = None
        self._waiting: set[str] = set()  # skipped for now, said (see _link_cache.Later)
        self._dead: dict[str, float] | None = None  # this interval's reading (None: pooling)
        self._streak: dict[tuple[str, str], int] = {}  # (step remedy, site) -> intervals past
        self._ledger: dict[str, tuple[str, str]] = {}  # event id -> (step remedy, site)
        self._tried: set[str] = set()  # the steps that acted (the hopeless stop's evidence)
        self._remedies: dict[str, Remedy] = {}
        for s in self.steps:
            self._remedies[s.remedy] = self._make(s)

    # ------------------------------------------------------------------ remedies
    def _make(self, step: PlanStep) -> Remedy:
        from relu_doctor.remedies.clipping import AutoClip
        from relu_doctor.remedies.continual_backprop import ContinualBackprop
        from relu_doctor.remedies.lr import LRRescuer
        from relu_doctor.remedies.recycle import DormantRecycler
        from relu_doctor.remedies.swap import ActivationSwapper

        o = dict(step.options)
        try:
            if step.remedy == "clip":
                return AutoClip(percentile=float(o.get("percentile", 10.0)), warmup_steps=_NEVER)
            if step.remedy == "lr":
                return LRRescuer(
                    self.optimizers or None, schedulers=self.schedulers,
                    factor=float(o.get("factor", 0.5)), min_lr=float(o.get("min_lr", 1e-5)),
                    cooldown=0,
                )
            if step.remedy == "swap":
                return ActivationSwapper(
                    self.model, slope=float(o.get("slope", 0.05)), patience=1,
                    threshold=float(o.get("threshold", 0.2)),
                    optimizer=self.optimizers or None, schedulers=self.schedulers,
                )
            if step.remedy == "recycle":
                return DormantRecycler(
                    self.model, optimizers=self.optimizers or None,
                    max_fraction=float(o.get("max_fraction", 0.25)), seed=self.seed,
                    reset_adam_step=o.get("reset_adam_step", False),
                )
            return ContinualBackprop(
                self.model, optimizers=self.optimizers or None, seed=self.seed, **o)
        except TypeError as e:
            raise ReluDoctorError(f"steps: options of {step.remedy!r}: {e}") from None

    def remedy(self, name: str) -> Remedy:
        """The controller running step ``name`` (``"clip"``, ``"lr"``...)."""
        try:
            return self._remedies[name]
        except KeyError:
            raise ReluDoctorError(
                f"name: this plan has no step {name!r}; its steps are {list(self._remedies)}."
            ) from None

    def use(self, name: str, remedy: Remedy) -> None:
        """Run step ``name`` with ``remedy`` instead of the torch controller the plan built
        (a framework adapter's own: the Keras learning rate and layer swap, or an ``"lr"``
        step on the optimizer wrapper the scheduler steps).
        An ``"lr"`` controller offers ``rescue(step=, reason=, evidence=, before=)``
        returning the intervention, or None at its floor; a ``"swap"`` controller
        ``swap(site, step=, before=, reason=)``, raising
        :class:`~relu_doctor.errors.ReluDoctorError` where it cannot act."""
        self.remedy(name)  # the plan has that step
        if name not in _ACTIONS:
            raise ReluDoctorError(
                f"name: only the steps {sorted(_ACTIONS)} take another controller, got {name!r}."
            )
        if not isinstance(remedy, Remedy) or not callable(getattr(remedy, _ACTIONS[name], None)):
            raise ReluDoctorError(
                f"remedy: expected a Remedy with a {_ACTIONS[name]}() method for step "
                f"{name!r}, got {type(remedy).__name__}."
            )
        self._remedies[name] = remedy
        if self.doctor is not None:  # bound already: bind it as _on_bind would have
            remedy.warn = self.warn
            remedy.bind(self.doctor, listen=False)

    def use_optimizers(self, optimizer: Optimizers, schedulers: Sequence[Any] = ()) -> None:
        """Act through new optimizers (Lightning makes them for each ``fit``), the steps'
        controllers too; binding the plan again moves the clipper's hook to the first."""
        self.optimizers = check_optimizers("optimizer", optimizer)
        self.schedulers = list(schedulers)
        for r in self._remedies.values():
            for name in ("optimizers", "schedulers"):
                if hasattr(r, name):
                    setattr(r, name, list(getattr(self, name)))
            if hasattr(r, "optimizers"):  # (given now: a later bind keeps them)
                r.__dict__["_adopted"] = False

    def _on_bind(self, doctor: DoctorLike) -> None:
        for r in self._remedies.values():
            r.warn = self.warn
            r.bind(doctor, listen=False)
        self._rehook = False  # (an earlier Doctor's: hooked anew, on the optimizer in use)
        if (clip := self._remedies.get("clip")) is not None and self.optimizers:
            clip.detach()  # type: ignore[attr-defined]
            clip.attach(self.optimizers[0])  # type: ignore[attr-defined]

    def detach(self) -> None:
        """Remove the clipper's optimizer hook (idempotent), for good."""
        self._rehook = False
        if (clip := self._remedies.get("clip")) is not None:
            clip.detach()  # type: ignore[attr-defined]

    def watch_detached(self, doctor: Any) -> None:
        """Its Doctor's watch ended: the clipper's hook goes with the watch's (a Fabric trial)."""
        clip: Any = self._remedies.get("clip")
        if doctor is self.doctor and clip is not None and clip._handles:  # (not a former one's)
            self._rehook = True  # (on what it was: its attached_to)
            clip.detach()

    def watch_attached(self, doctor: Any) -> None:
        """Its Doctor watches again: the clipper's hook back where the watch's end took it."""
        clip: Any = self._remedies.get("clip")
        if doctor is self.doctor and clip is not None and self._rehook:
            optimizer, params = clip.attached_to
            clip.detach()
            clip.attach(optimizer, params=params)
            self._rehook = False

    def describe(self) -> list[dict[str, Any]]:
        """The plan as data: its steps in order, with their scope and what counts as help."""
        return [
            {"remedy": s.remedy, "scope": PLAN_REMEDIES[s.remedy], "min_gain": s.min_gain,
             "tolerance": s.tolerance, "options": dict(s.options)}
            for s in self.steps
        ]

    # ------------------------------------------------------------------ the decision
    def _cooling(self, site: str) -> bool:
        last = self._last_change.get(site)
        return last is not None and self.interval - last < self.cooldown

    def _model_trigger(self, record: RecordLike) -> tuple[str, str, dict[str, Any]] | None:
        """(reason, target metric, evidence) of a model-wide symptom, or None."""
        surge = dead_surge(self._dead, self._prev_dead, self.dead_jump, record)
        # the model's dead fraction against the last reading, whichever trigger fires (one
        # that returned first left it at an older one: "dying" then compared 3 logs apart)
        now = prev = None
        if self._dead is not None:
            now = self.evidence.model_fraction
            prev, self._prev_model_dead = (
                None if self.evidence.sites_changed else self._prev_model_dead), now
        for kind in ("nonfinite", "exploding_gradient"):
            if (f := next((f for f in record.findings if f.kind == kind and acted_on(f)),
                          None)) is not None:
                return kind, "grad_norm", {"finding": f.message, "site": f.site}
        steps = {"steps_collected": self.evidence.last_steps}
        if surge is not None:
            return "dead_surge", "dead_fraction", {**surge, **steps}
        if self._dead is None:
            return None  # sampled windows: the dead readings wait for more steps
        # (1e-9: 22/100 - 20/100 is 0.01999...; 2 units at least: a trial's 1 of 32, 3 points)
        rise = max(0.02, 2 / (self.evidence.model_units or 100))
        if now is not None and prev is not None and now >= 0.1 and now - prev >= rise - 1e-9:
            # still dying: the tutorials' first remedy is a lower learning rate
            return "dying", "dead_fraction", {
                "dead_fraction_before": prev, "dead_fraction": now, **steps}
        return None

    def _judge(self, remedy: Remedy, step: PlanStep, target: str | None) -> None:
        remedy.judge = (target, step.min_gain, step.tolerance)

    def observe(self, record: RecordLike) -> list[InterventionResult]:
        """Its own results, then its remedies' (each change judged, on a final record too)."""
        out = super().observe(record)
        self._collect(record)
        return out

    def _carry_objects(self, old: Remedy) -> None:
        super()._carry_objects(old)
        if isinstance(old, TreatmentPlan):
            for k, r in self._remedies.items():
                if k in old._remedies:
                    r._carry_objects(old._remedies[k])

    def _collect(self, record: RecordLike) -> None:
        from relu_doctor.remedies.clipping import AutoClip

        for remedy in self._remedies.values():
            if isinstance(remedy, AutoClip) and remedy.warmup_steps == _NEVER:
                remedy.last = remedy.read()
            elif isinstance(remedy, AutoClip):  # switched on: its window's clipping, reported
                for ev in remedy.decide(record):  # as a stand-alone clipper's (not judged)
                    if self.doctor is not None:
                        self.doctor.record_event(ev)
            for res in remedy.collect(record):
                where = self._ledger.pop(res.ref, None)
                if where is None or res.verdict != NOT_HELPED:
                    continue
                self.failed.add(where)
                if res.loss_rose is not None:  # (surgery's alone: Remedy.guards_loss)
                    self._harmed(remedy, where, res.loss_rose, record)
                if isinstance(remedy, AutoClip) and remedy.warmup_steps != _NEVER:
                    remedy.warmup_steps = _NEVER
                    remedy.note(
                        site=MODEL, step=record.step, before=None, measure_after=False,
                        what=f"switched AutoClip off again: it did not help ({res.target})",
                    )

    def _harmed(self, remedy: Remedy, where: tuple[str, str], rose: float,
                record: RecordLike) -> None:
        """A surgery step after which the loss rose: no surgery again; a swap is undone (a
        trial's recycling took the loss from 4e7 to 7e16, then a swap to NaN where the run
        untreated recovered; in Keras, a swap's 1e4x rise was followed by another swap),
        not on a final record: training has ended, and the model stays as it trained."""
        self.harmful.add(where[0])
        undone = ""
        undo = getattr(remedy, "restore", None)
        if where[0] == "swap" and callable(undo) and not getattr(record, "final", False):
            try:
                try:
                    undo(where[1], step=record.step)
                except TypeError:  # (a controller of use() whose restore takes a site only)
                    undo(where[1])
                undone = "; the swap is undone"
            except Exception as e:  # (restored already, renamed since, a controller's bug)
                undone = f"; the swap could not be undone ({type(e).__name__}: {e})"
        self.warn(f"TreatmentPlan: the training loss rose "
                  f"{'to a non-finite value' if rose == float('inf') else f'{rose:.3g}x'} after "
                  f"its {where[0]} step at {where[1]!r} (step {record.step}): no surgery step "
                  f"(recycling, the swap) is used again in this run{undone}.")

    def _model_step(self, record: RecordLike) -> Intervention | None:
        from relu_doctor.remedies.clipping import UNCLIPPED, AutoClip, clipped_at
        from relu_doctor.remedies.lr import LRRescuer

        trigger = self._model_trigger(record)
        if trigger is None or self._cooling(MODEL):
            return None
        reason, target, evidence = trigger
        before = model_snapshot(record)
        for step in self.steps:
            if PLAN_REMEDIES[step.remedy] != MODEL or (step.remedy, MODEL) in self.failed or (
                    reason == "nonfinite" and step.remedy in self._spent):
                continue  # (a step tried on NaN once: a trial's run cut its rate 11 times)
            remedy = self._remedies[step.remedy]
            self._judge(remedy, step, target)
            if isinstance(remedy, AutoClip):
                if remedy.warmup_steps != _NEVER or not remedy._handles:
                    continue  # already on, or no optimizer to clip for
                if step.remedy in self.idle:
                    continue
                at = clipped_at(remedy.norm_history, dtype=remedy.grad_dtype)
                if at is not None:  # the loop clips itself: two clippers would both clip
                    self.idle.add(step.remedy)  # (not tried, nor failed: see _hopeless)
                    others = [s.remedy for s in self.steps if s.remedy != step.remedy]
                    self.warn(
                        f"TreatmentPlan: the gradient norm reached {at:.4g} and no more on "
                        "several steps: the training loop clips it itself (clip_grad_norm_, "
                        "fabric.clip_gradients, accelerator.clip_grad_norm_), "
                        "before the plan sees the gradients. Its clip step stays idle (both "
                        "would clip)" + (f"; its other steps act. Leave it out (steps="
                                         f"{others}), or stop" if others else ". Stop")
                        + " clipping to let the plan clip when needed.")
                    continue
                remedy.warmup_steps = 0
                # an exploding gradient is judged on the norm before clipping: the one
                # after it is the clipper's own doing
                self._judge(remedy, step, UNCLIPPED if target == "grad_norm" else target)
                ev = remedy.note(
                    site=MODEL, step=record.step, before=remedy.model_snapshot(record),
                    trigger=reason,
                    evidence=evidence,
                    what=f"switched AutoClip (p{remedy.percentile:g}) on: {reason}",
                )
            elif step.remedy == "lr":
                if isinstance(remedy, LRRescuer) and (not remedy.optimizers or all(
                    float(g["lr"]) <= remedy.min_lr for o in remedy.optimizers
                    for g in o.param_groups
                )):
                    continue
                found = cast(_Rescues, remedy).rescue(
                    step=record.step, reason=reason, evidence=evidence, before=before
                )
                if found is None:
                    continue  # a controller of :meth:`use` at its floor
                ev = found
            else:  # pragma: no cover - PLAN_REMEDIES lists the model-wide ones
                continue
            self._ledger[ev.id] = (step.remedy, MODEL)
            self._tried.add(step.remedy)
            self._last_change[MODEL] = self.interval
            if reason == "nonfinite":
                self._spent.add(step.remedy)
            return ev
        return None

    def _site_steps(self, record: RecordLike) -> list[Intervention]:
        from relu_doctor.remedies.continual_backprop import ContinualBackprop
        from relu_doctor.remedies.recycle import DormantRecycler

        if self._cooling(MODEL):
            return []  # a model-wide change is being judged: no surgery meanwhile
        events: list[Intervention] = []
        units = record.unit_table
        for row in sorted(record.site_rows, key=lambda r: str(r["site"])):  # (see recycle)
            site = str(row["site"])
            if self._cooling(site) or row.get("frozen"):  # (a frozen feed: no remedy's)
                continue
            # sampled windows: the dead readings wait for more steps (no reading)
            dead = None if self._dead is None else finite_or_none(self._dead.get(site))
            for step in self.steps:
                if PLAN_REMEDIES[step.remedy] == MODEL or (step.remedy, site) in self.failed or (
                        self.harmful):
                    continue
                remedy = self._remedies[step.remedy]
                threshold = float(step.options.get("threshold", 0.1))
                ev: Intervention | None = None
                try:
                    if step.remedy == "swap":
                        if self._dead is None:
                            continue
                        if not self._persists(step, site, not row.get("leaky")
                                              and dead is not None and dead >= threshold):
                            continue
                        self._judge(remedy, step, "dead_fraction")
                        ev = cast(_Swaps, remedy).swap(
                            site, step=record.step, before=site_snapshot(row),
                            reason=f"dead fraction {dead:.0%} >= {threshold:g}"
                            + self.evidence.basis(),
                        )
                    elif isinstance(remedy, DormantRecycler):
                        if self._dead is None or units is None or not self._persists(
                            step, site, dead is not None and dead >= threshold
                        ):
                            continue
                        idx = most_dormant(units, row, remedy.max_fraction)
                        if not idx:
                            continue
                        self._judge(remedy, step, "below_tau_fraction")
                        ev = remedy.recycle(site, units=idx, step=record.step,
                                            before=units_snapshot(record, row, idx))
                    elif isinstance(remedy, ContinualBackprop):
                        self._judge(remedy, step, "below_tau_fraction")
                        found = remedy.treat(View(record, {site}))
                        ev = found[0] if found else None
                except NotInPass as e:  # (a branch the pass did not take: tried again)
                    skip_for_now(self._waiting, self.warn, f"TreatmentPlan: {remedy.name}",
                                 site, str(e))
                    continue
                except ReluDoctorError as e:
                    self.failed.add((step.remedy, site))
                    self.warn(f"TreatmentPlan: {remedy.name} (its step {step.remedy!r}) cannot "
                              f"treat site {site!r}: {e}")  # (the name its records give)
                    if self.doctor is not None:  # (the report advises it there no more)
                        self.doctor.record_event(Declined(remedy.name, site, record.step, str(e)))
                    continue
                if ev is None:
                    continue
                self._ledger[ev.id] = (step.remedy, site)
                self._tried.add(step.remedy)
                self._last_change[site] = self.interval
                events.append(ev)
                break
        return events

    def _persists(self, step: PlanStep, site: str, past: bool) -> bool:
        """Count the intervals in a row ``site`` is past ``step``'s threshold; True once
        that reaches :attr:`patience`."""
        key = (step.remedy, site)
        self._streak[key] = self._streak.get(key, 0) + 1 if past else 0
        return self._streak[key] >= self.patience

    def _hopeless(self, record: RecordLike) -> dict[str, Any] | None:
        rows = [r for r in record.site_rows if not r.get("frozen")]  # (what training moves)
        units = sum(int(r.get("units") or 0) for r in rows)
        life = sum(int(r.get("lifetime_dead") or 0) for r in rows)
        nonfinite = [f.message for f in record.findings if f.kind == "nonfinite"]
        frac = life / units if units else 0.0
        if frac < self.hopeless_fraction and not nonfinite:
            return None
        # the plan's steps had their chance: something was tried, and judged
        if not self._last_change or self._cooling(MODEL) or self._ledger:
            return None
        return {"lifetime_dead_fraction": frac, "nonfinite": nonfinite,
                "tried": sorted(self._tried | {s for s, _ in self.failed}),
                "failed": sorted(f"{s}@{site}" for s, site in self.failed)}

    def decide(self, record: RecordLike) -> list[Intervention]:
        self.interval += 1
        self._dead = self.evidence.add(record)
        out: list[Intervention] = []
        if self.stop_when_hopeless and not self.should_stop:
            evidence = self._hopeless(record)
            if evidence is not None:
                self.should_stop = True
                out.append(self._intervention(
                    site=MODEL, step=record.step, before=model_snapshot(record),
                    measure_after=False, action="stop", evidence=evidence,
                    what="stopped training: the run is hopeless ("
                    + (f"{evidence['lifetime_dead_fraction']:.0%} of units never active"
                       if not evidence["nonfinite"] else "non-finite values")
                    + ") after the plan's remedies had their chance",
                ))
                return out
        self._model_step(record)
        self._site_steps(record)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "interval": self.interval,
            "failed": sorted([list(f) for f in self.failed]),
            "idle": sorted(self.idle),
            "harmful": sorted(self.harmful),
            "spent": sorted(self._spent),
            "last_change": dict(self._last_change),
            "prev_dead": dict(self._prev_dead),
            "prev_model_dead": self._prev_model_dead,
            "ledger": {k: list(v) for k, v in self._ledger.items()},
            "streak": [[r, site, n] for (r, site), n in self._streak.items()],
            "tried": sorted(self._tried),
            "should_stop": self.should_stop,
            "remedies": {k: r.state_dict() for k, r in self._remedies.items()},
            "clip_on": {k: r.warmup_steps != _NEVER for k, r in self._remedies.items()
                        if hasattr(r, "warmup_steps")},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.interval = int(state.get("interval", 0))
        self.failed = {(str(a), str(b)) for a, b in state.get("failed", [])}
        self.idle = {str(s) for s in state.get("idle", [])}
        self.harmful = {str(s) for s in state.get("harmful", [])}
        self._spent = {str(s) for s in state.get("spent", [])}
        self._last_change = {str(k): int(v) for k, v in state.get("last_change", {}).items()}
        self._prev_dead = {str(k): float(v) for k, v in state.get("prev_dead", {}).items()}
        self._prev_model_dead = finite_or_none(state.get("prev_model_dead"))
        self._ledger = {str(k): (str(v[0]), str(v[1])) for k, v in state.get("ledger", {}).items()}
        self._streak = {(str(r), str(site)): int(n) for r, site, n in state.get("streak", [])}
        self._tried = {str(s) for s in state.get("tried", [])}
        self.should_stop = bool(state.get("should_stop", False))
        for k, s in state.get("remedies", {}).items():
            if k in self._remedies:
                self._remedies[k].load_state_dict(s)
        for k, on in state.get("clip_on", {}).items():
            r = self._remedies.get(k)
            if r is not None and hasattr(r, "warmup_steps"):
                r.warmup_steps = 0 if on else _NEVER
