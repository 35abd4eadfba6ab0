"""The remedies in Keras terms: swap a layer's ReLU for LeakyReLU (its ``activation``, or a
``ReLU`` layer's ``negative_slope``), rescue the learning rate through the Keras optimizer's
``learning_rate`` (a float or a schedule), and AutoClip on the torch gradients inside the
Keras optimizer's ``apply``; and the treatment plan's steps acting through them
(:func:`keras_plan`).

Each is a :class:`~relu_doctor.remedies.base.Remedy`: bound to the Doctor, it decides from
the interval records and records every change as an
:class:`~relu_doctor.events.Intervention`, exactly as the Lightning remedy callbacks do.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import torch

from relu_doctor._validate import nonnegative, number_in, positive_int
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.events import Intervention
from relu_doctor.integrations._keras_layers import KerasSite
from relu_doctor.remedies.base import (
    MODEL,
    RecordLike,
    Remedy,
    model_snapshot,
    site_snapshot,
)
from relu_doctor.remedies.clipping import AutoClip
from relu_doctor.remedies.lr import LRRescuer
from relu_doctor.remedies.plan import DEFAULT_STEPS, TreatmentPlan
from relu_doctor.remedies.plan_steps import plan_steps
from relu_doctor.remedies.swap import ActivationSwapper
from relu_doctor.sites import SiteKey

__all__ = [
    "KERAS_PLAN_STEPS",
    "KerasActivationSwap",
    "KerasAutoClip",
    "KerasLRRescue",
    "ScaledSchedule",
    "clips_already",
    "keras_plan",
    "keras_plan_options",
    "lr_value",
]


def _leaky(slope: float) -> Any:
    return LeakyReLUActivation(slope)


@keras.saving.register_keras_serializable(package="relu_doctor")
class LeakyReLUActivation:
    """The activation the swap gives a Dense/Conv/``Activation`` layer: LeakyReLU with its
    ``negative_slope``, which a saved model keeps (a plain function was saved by name, as
    ``leaky_relu`` with Keras' default slope 0.2). A model saved with it loads after
    ``import relu_doctor.integrations.keras``, which registers it."""

    def __init__(self, negative_slope: float) -> None:
        self.negative_slope = float(negative_slope)
        self.__name__ = "leaky_relu"  # (its family, as for keras.activations.leaky_relu)

    def __call__(self, x: Any) -> Any:
        return keras.activations.leaky_relu(x, negative_slope=self.negative_slope)

    def get_config(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LeakyReLUActivation:
        return cls(**config)


@dataclass
class _Swap:
    site: KerasSite
    attr: str
    old: Any


class KerasActivationSwap(Remedy):
    """Swap a dying Keras layer's ReLU for LeakyReLU (undoable with :meth:`restore`).

    A site is swapped when its dead fraction exceeds ``threshold`` for ``patience``
    consecutive logging intervals. A Dense/Conv or ``Activation`` layer gets ``activation`` =
    LeakyReLU with ``slope``; a ``ReLU`` layer gets ``negative_slope = slope``. Outputs for
    positive inputs are unchanged. A layer it cannot swap is left alone with a warning; the
    others go on being watched and swapped.

    Args:
        sites: the watched Keras sites, by path.
        slope: the negative slope, in (0, 1].
        threshold: dead fraction above which a site is dying, in [0, 1).
        patience: consecutive intervals above the threshold before swapping.
    """

    name = "leaky_relu_swap"
    guards_loss = True  # (surgery: judged on the training loss too)

    def __init__(
        self,
        sites: Mapping[str, KerasSite],
        *,
        slope: float = 0.01,
        threshold: float = 0.5,
        patience: int = 2,
    ) -> None:
        super().__init__()
        self.sites = dict(sites)
        self.slope = number_in("slope", slope, 0.0, 1.0)
        self.threshold = number_in(
            "threshold", threshold, 0.0, 1.0, low_open=False, high_open=True
        )
        self.patience = positive_int("patience", patience)
        self.swaps: dict[str, _Swap] = {}
        self.streaks: dict[str, int] = {}
        self._skipped: set[str] = set()  # layers a swap failed on, left alone from then on
        self._frozen_said: set[str] = set()  # frozen layers it left alone, said (not for good)

    def swap(self, site: str | SiteKey, *, step: int = 0,
             before: Mapping[str, Any] | None = None, reason: str = "requested") -> Intervention:
        """Swap the layer of ``site`` (a site name of the bound Doctor, a SiteKey or the
        layer's path) now; return the intervention."""
        key, name = self.resolve_site(site)
        path = key.module_path
        found = self.sites.get(path)
        if found is None:
            raise ReluDoctorError(f"site: no Keras site {path!r}; known: {sorted(self.sites)}.")
        return self._swap(found, path, name, step=step, before=before, reason=reason)

    def _swap(self, site: KerasSite, path: str, name: str, *, step: int,
              before: Mapping[str, Any] | None, reason: str) -> Intervention:
        if path in self.swaps:
            raise ReluDoctorError(f"site: {path!r} was already swapped.")
        fam = site.family()
        if fam is None or fam.name != "relu":
            raise ReluDoctorError(
                f"site: {path!r} runs {fam.name if fam else 'no ReLU-family activation'}; only "
                "plain ReLU is swapped for LeakyReLU (outputs for positive inputs unchanged)."
            )
        layer = site.layer
        if not getattr(layer, "trainable", True):  # (a frozen base model's layers are not)
            raise ReluDoctorError(
                f"site: {path!r} is in a part of the model that does not train "
                "(trainable=False): a swap would change a part you froze."
            )
        if site.by_activation or isinstance(layer, keras.layers.Activation):
            rec = _Swap(site, "activation", layer.activation)
            layer.activation = _leaky(self.slope)
        elif isinstance(layer, keras.layers.ReLU):
            if getattr(layer, "max_value", None) is not None:
                raise ReluDoctorError(
                    f"site: {path!r} is a ReLU layer with max_value={layer.max_value:g}: a "
                    "capped ReLU is not swapped for LeakyReLU (the cap would go with it); "
                    "replace it in the model instead."
                )
            if float(getattr(layer, "threshold", 0.0) or 0.0) != 0.0:
                raise ReluDoctorError(
                    f"site: {path!r} is a ReLU layer with threshold={layer.threshold:g}: a "
                    "negative slope would make its outputs for inputs between 0 and the "
                    "threshold negative, where they are 0; replace it in the model instead."
                )
            rec = _Swap(site, "negative_slope", layer.negative_slope)
            layer.negative_slope = self.slope
        else:
            raise ReluDoctorError(
                f"site: {path!r} is a {type(layer).__name__} layer; replace it with "
                "keras.layers.LeakyReLU in the model instead."
            )
        self.swaps[path] = rec
        what = (
            f"replaced ReLU of Keras layer {path} ({type(layer).__name__}.{rec.attr}) with "
            f"LeakyReLU(negative_slope={self.slope:g}) ({reason})"
        )
        return self._record(
            self._intervention(site=name, step=step, what=what, before=before,
                               kind="leaky_relu", slope=self.slope, attr=rec.attr)
        )

    def restore(self, site: str | SiteKey | None = None, *, step: int | None = None) -> list[str]:
        """Undo the swap of ``site`` (a site name, SiteKey or layer path; recorded as an
        intervention, at ``step``: default the bound Doctor's), or every swap; return the
        paths restored."""
        if site is None:
            paths = list(self.swaps)
        else:
            key, name = self.resolve_site(site)
            if key.module_path not in self.swaps:
                raise ReluDoctorError(
                    f"site: {name!r} was not swapped; swapped layers: {sorted(self.swaps)}.")
            paths = [key.module_path]
        for path in paths:
            rec = self.swaps.pop(path)
            setattr(rec.site.layer, rec.attr, rec.old)
            if site is not None:
                self._record(self._intervention(
                    site=name, step=int(step if step is not None else
                                        getattr(self.doctor, "global_step", 0) or 0),
                    what=f"restored ReLU of Keras layer {path}", before=None,
                    id_suffix=":restore", measure_after=False, undo=True))
        return paths

    reads_dead = True

    def decide(self, record: RecordLike) -> list[Intervention]:
        events: list[Intervention] = []
        if (dead := self.evidence.add(record)) is None:
            return events  # sampled windows: the dead readings wait for more steps
        for row in record.site_rows:
            path = record.key(str(row["site"])).module_path
            frac = dead.get(str(row["site"]))
            site = self.sites.get(path)
            if (site is None or path in self.swaps or path in self._skipped or frac is None
                    or math.isnan(frac)):
                continue
            fam = site.family()
            if fam is None or fam.name != "relu":
                continue
            streak = self.streaks.get(path, 0) + 1 if frac > self.threshold else 0
            self.streaks[path] = streak
            if streak >= self.patience:
                try:
                    events.append(
                        self._swap(site, path, str(row["site"]), step=record.step,
                                   before=site_snapshot(row),
                                   reason=f"dead fraction {frac:.2f} > {self.threshold:g} for "
                                   f"{streak} reading{'s' * (streak != 1)}{self.evidence.basis()}")
                    )
                except ReluDoctorError as e:  # one site it cannot swap: the others go on
                    frozen = not getattr(site.layer, "trainable", True)
                    if frozen and path in self._frozen_said:
                        continue  # (said once; asked again once it trains)
                    (self._frozen_said if frozen else self._skipped).add(path)
                    self.decline(str(row["site"]), str(e), record.step, "LeakyReLU swap",
                                 f"Keras layer {path!r}")
        return events

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "streaks": dict(self.streaks),
                "swapped": sorted(self.swaps), "skipped": sorted(self._skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
        self._skipped = {str(p) for p in state.get("skipped", [])}  # (declined once: said)

    def _carry_objects(self, old: Remedy) -> None:
        """The swaps an earlier fit made, still undoable: those of layers still watched; and
        the layers it left alone (a next fit does not decline them again)."""
        super()._carry_objects(old)
        self._skipped |= set(getattr(old, "_skipped", ()))
        for path, rec in getattr(old, "swaps", {}).items():
            site = self.sites.get(path)
            if site is not None and site.layer is rec.site.layer:
                self.swaps[path] = _Swap(site, rec.attr, rec.old)


@keras.saving.register_keras_serializable(package="relu_doctor")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """A learning-rate schedule times a constant factor (what :class:`KerasLRRescue` puts in
    place of a schedule, so the schedule goes on, reduced)."""

    def __init__(self, schedule: Any, factor: float) -> None:
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step: Any) -> Any:
        return self.schedule(step) * self.factor

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaledSchedule:
        return cls(keras.optimizers.schedules.deserialize(config["schedule"]), config["factor"])


def _schedule_of(optimizer: Any) -> Any:
    """The optimizer's learning-rate schedule (a ``LearningRateSchedule``, or a callable
    taking no argument), the live object, or None for a rate held in a variable. (Rebuilt
    from ``get_config()``, a schedule of the user's that Keras' serialization does not know
    could not be read back, and the optimizer would hold a copy.)"""
    live = getattr(optimizer, "_learning_rate", None)  # (Keras' own field; else its config)
    if live is None:
        cfg = optimizer.get_config().get("learning_rate")
        return keras.optimizers.schedules.deserialize(cfg) if isinstance(cfg, Mapping) else None
    if isinstance(live, keras.optimizers.schedules.LearningRateSchedule):
        return live
    if callable(live) and not isinstance(live, keras.Variable):
        return _Called(live)
    return None


@keras.saving.register_keras_serializable(package="relu_doctor")
class _Called(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """A learning rate given as a callable of no argument, as a schedule of the step (saved
    with the model as Keras saves the callable: a model saved before the rescue saves after)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self, step: Any) -> Any:
        return self.fn()

    def get_config(self) -> dict[str, Any]:
        return {"fn": keras.saving.serialize_keras_object(self.fn)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Called:
        return cls(keras.saving.deserialize_keras_object(config["fn"]))


def _name(schedule: Any) -> str:
    return type(schedule.fn if isinstance(schedule, _Called) else schedule).__name__


def lr_value(optimizer: Any) -> float:
    """The optimizer's current learning rate (a schedule's value at its iteration)."""
    lr = optimizer.learning_rate
    lr = getattr(lr, "value", lr)  # a variable's tensor (numpy 2 warns on its __array__)
    if isinstance(lr, torch.Tensor):
        return float(lr.detach())
    return float(keras.ops.convert_to_numpy(lr))


class KerasLRRescue(Remedy):
    """Scale a Keras optimizer's learning rate down on an exploding-gradient finding or a
    surge of dead units (the triggers of :class:`~relu_doctor.remedies.LRRescuer`), with a
    cooldown. A float learning rate is set through ``optimizer.learning_rate``; a
    ``LearningRateSchedule`` is replaced by the same schedule times the factor
    (:class:`ScaledSchedule`), so it goes on, reduced.
    """

    name = "lr_rescue"

    def __init__(
        self,
        optimizer: Any,
        *,
        factor: float = 0.5,
        min_lr: float = 1e-6,
        cooldown: int = 2,
        dead_jump: float = 0.2,
        triggers: Sequence[str] = ("exploding_gradient", "dead_surge"),
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self._reasons = LRRescuer(None, factor=factor, min_lr=min_lr, cooldown=cooldown,
                                  dead_jump=dead_jump, triggers=triggers)
        self.factor = self._reasons.factor
        self.min_lr = nonnegative("min_lr", min_lr)
        self.cooldown = self._reasons.cooldown
        self.cooldown_left = 0
        self.rescues = 0
        self._cut: tuple[float, int] | None = None  # the float rate the last cut set, its step
        self._warned_undone = False

    def _check_undone(self) -> None:
        """Where something set a float learning rate back above the last cut (Keras'
        ``LearningRateScheduler`` callback sets the rate each epoch from its function), say
        once that the cuts do not hold: the record says the rate was cut."""
        if self._cut is None or self._warned_undone:
            return
        opt = updating(self.optimizer)
        try:
            now = None if _schedule_of(opt) is not None else lr_value(opt)
        except Exception:  # (a rate that cannot be read: the callback says so)
            now = None
        cut, step = self._cut
        if now is None:
            self._cut = None
        elif now > cut * (1 + 1e-6):
            self._warned_undone = True
            warnings.warn(
                f"relu_doctor: lr_rescue cut the Keras learning rate to {cut:.4g} at step "
                f"{step}, and something set it back to {now:.4g} since (a "
                "LearningRateScheduler callback sets it each epoch from its function): its "
                "cuts do not hold. Give the optimizer a LearningRateSchedule instead (lr_rescue "
                "scales it), have the function scale the rate it is given, or pass "
                "lr_rescue=False.",
                ReluDoctorWarning,
                stacklevel=2,
            )
        else:
            self._cut = (now, step)  # (lowered further, by ReduceLROnPlateau say: held)

    def rescue(self, *, step: int = 0, reason: str = "requested",
               before: Mapping[str, Any] | None = None,
               evidence: Mapping[str, Any] | None = None) -> Intervention | None:
        """Scale the learning rate now; None when it is already at the floor."""
        self._check_undone()
        opt = updating(self.optimizer)  # (a LossScaleOptimizer's rate is its inner one's)
        old = lr_value(opt)
        new = max(old * self.factor, self.min_lr)
        if not old > 0 or new >= old:
            return None
        f = new / old
        sched = _schedule_of(opt)
        if sched is not None:  # a schedule (or a callable): the live object, scaled
            if isinstance(sched, ScaledSchedule):
                sched = ScaledSchedule(sched.schedule, sched.factor * f)
            else:
                sched = ScaledSchedule(sched, f)
            opt.learning_rate = sched
            how = f"schedule {_name(sched.schedule)} x {sched.factor:.4g}"
            self._cut = None
        else:
            opt.learning_rate = new
            how = "learning_rate"
            self._cut = (new, step)
        self.rescues += 1
        what = f"scaled the Keras learning rate by {f:.4g} ({reason}): {old:.4g} -> {new:.4g} ({how})"
        return self._record(
            self._intervention(site=MODEL, step=step, what=what, before=before, trigger=reason,
                               evidence=dict(evidence or {}),
                               changes=[{"lr_before": old, "lr_after": new, "factor": f}])
        )

    @property
    def reads_dead(self) -> bool:
        return self._reasons.reads_dead

    def state_dict(self) -> dict[str, Any]:
        """Its own state and that of the rescuer that decides (its pooled dead evidence and
        dead-fraction baseline)."""
        return {**super().state_dict(), "reasons": self._reasons.state_dict(),
                "cooldown_left": self.cooldown_left, "rescues": self.rescues}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._reasons.load_state_dict(state.get("reasons") or {})
        self.cooldown_left = int(state.get("cooldown_left", 0))
        self.rescues = int(state.get("rescues", 0))

    def decide(self, record: RecordLike) -> list[Intervention]:
        self._check_undone()
        found = self._reasons.reason(record)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return []
        if found is None:
            return []
        trigger, evidence = found
        ev = self.rescue(step=record.step, reason=trigger, before=model_snapshot(record),
                         evidence=evidence)
        if ev is None:
            return []
        self.cooldown_left = self.cooldown
        return [ev]


class KerasAutoClip:
    """AutoClip on the torch gradients of a Keras model, applied where the Keras optimizer
    clips (its ``_clip_gradients``, where ``clipnorm`` acts): once per update, on the
    gradient it applies (under mixed precision the inner optimizer's, unscaled, on finite
    steps only; with ``gradient_accumulation_steps`` the accumulated mean, not each
    micro-batch's); :meth:`detach` puts it back.

    Refuses an optimizer that already clips (``clipnorm``, ``global_clipnorm``,
    ``clipvalue``): AutoClip takes the place of a fixed threshold.
    """

    def __init__(self, model: Any, optimizer: Any, clip: AutoClip) -> None:
        optimizer = updating(optimizer)
        refuse_clipping(optimizer)
        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self._attached = False

    def attach(self) -> KerasAutoClip:
        if self._attached:
            return self
        original = self.optimizer._clip_gradients  # (Keras' own; it clips nothing: above)
        clip = self.clip

        # Never traced into a compiled train step (jit_compile=True): its Python counters
        # would recompile the step at every call, and dynamo gives up after eight.
        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def clip_gradients(grads: Any) -> Any:
            grads = original(grads)
            clip.clip_grads_([g for g in grads if isinstance(g, torch.Tensor)])
            return grads

        self.optimizer._clip_gradients = clip_gradients
        self._attached = True
        # the clipper's hooks: its detach() (a plan's too) puts apply back, and a plan sees
        # that this clipper has an optimizer to clip for
        self.clip._handles.append(self)
        return self

    def remove(self) -> None:
        """Put the optimizer's ``_clip_gradients`` back (the clipper's hook handle protocol)."""
        if self._attached:
            vars(self.optimizer).pop("_clip_gradients", None)
            self._attached = False

    def detach(self) -> None:
        """Put ``_clip_gradients`` back and leave the clipper's hooks (idempotent)."""
        self.remove()
        if self in self.clip._handles:
            self.clip._handles.remove(self)


def refuse_clipping(optimizer: Any) -> None:
    """Raise :class:`ReluDoctorError` for ``autoclip`` beside a Keras optimizer that clips
    (``clipnorm``, ``global_clipnorm``, ``clipvalue``), or for no optimizer."""
    if optimizer is None:
        raise ReluDoctorError("autoclip: the model has no optimizer; compile it first.")
    refuse_several(optimizer, "autoclip")
    attr = clips_already(optimizer)
    if attr is not None:
        raise ReluDoctorError(
            f"autoclip: the Keras optimizer already clips ({attr}="
            f"{getattr(updating(optimizer), attr)!r}); AutoClip takes the place of a fixed "
            f"threshold: build the optimizer without {attr}, or pass autoclip=False."
        )


def several(optimizer: Any) -> bool:
    """Whether a Keras optimizer hands its variables to several others (a
    ``MultiOptimizer``): no learning rate of its own, and it clips in none of its own steps."""
    return getattr(updating(optimizer), "optimizers", None) is not None


def refuse_several(optimizer: Any, remedy: str) -> None:
    """Raise :class:`ReluDoctorError` for ``remedy`` (lr_rescue, autoclip) beside a
    ``MultiOptimizer``, which neither can act through."""
    if optimizer is not None and several(optimizer):
        raise ReluDoctorError(
            f"{remedy}: the Keras optimizer is a {type(updating(optimizer)).__name__}, whose "
            "variables each go to one of several optimizers with a learning rate and clipping "
            f"of its own, which {remedy} does not act through: pass {remedy}=False (and set "
            "clipnorm or a schedule on the sub-optimizers), or compile with one optimizer."
        )


class LossScale:
    """A Keras ``LossScaleOptimizer``'s scale (``mixed_float16``) as the Doctor reads a torch
    ``GradScaler``'s (``grad_scaler=``): its device tensor, read as each backward runs (the
    scale that backward was multiplied by), so that gradient statistics are the unscaled
    gradient's."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    @classmethod
    def of(cls, optimizer: Any) -> LossScale | None:
        """One for ``optimizer`` where it scales the loss, else None."""
        return cls(optimizer) if hasattr(optimizer, "dynamic_scale") else None

    def is_enabled(self) -> bool:
        return True

    @property
    def _scale(self) -> Any:
        scale = self.optimizer.dynamic_scale  # (before it is built: none yet, as GradScaler)
        return getattr(scale, "value", scale)

    @property
    def _init_scale(self) -> float:
        """The scale it starts from (a skip at the first step is compared with it)."""
        return float(self.optimizer.initial_scale)


def updating(optimizer: Any) -> Any:
    """The Keras optimizer that updates the weights: a ``LossScaleOptimizer`` (mixed
    precision) hands the unscaled gradient of a finite step to its inner one, and clips
    nothing itself."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def clips_already(optimizer: Any) -> str | None:
    """The clipping argument a Keras optimizer was built with (``clipnorm``,
    ``global_clipnorm``, ``clipvalue``; a loss-scale optimizer's inner one's), or None."""
    optimizer = updating(optimizer)
    for attr in ("clipnorm", "global_clipnorm", "clipvalue"):
        if getattr(optimizer, attr, None):
            return attr
    return None


#: The plan steps a Keras model can take. ReDo recycling and Continual Backprop re-initialise
#: units through torch modules (an ``nn.Linear``/``nn.Conv`` producer and consumer found in
#: the model's dataflow), which Keras layers are not: those steps are refused.
KERAS_PLAN_STEPS = ("clip", "lr", "swap")


def keras_plan_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The plan arguments for a Keras model: the default steps without those a Keras model
    cannot take; given steps that a Keras model cannot take are refused, naming them."""
    out = dict(options)
    if "steps" not in out:
        out["steps"] = tuple(s for s in DEFAULT_STEPS if s.remedy in KERAS_PLAN_STEPS)
        return out
    out["steps"] = plan_steps(out["steps"])  # PlanSteps, or remedy names
    bad = [s.remedy for s in out["steps"] if s.remedy not in KERAS_PLAN_STEPS]
    if bad:
        raise ReluDoctorError(
            f"treatment: the steps {bad} re-initialise units through torch modules "
            "(nn.Linear/nn.Conv weights linked by the model's dataflow), which Keras layers "
            f"are not; a Keras model takes the steps {list(KERAS_PLAN_STEPS)}."
        )
    return out


def keras_plan(
    model: Any, sites: Mapping[str, KerasSite], optimizer: Any, options: Mapping[str, Any]
) -> tuple[TreatmentPlan, KerasAutoClip | None]:
    """A :class:`~relu_doctor.remedies.TreatmentPlan` for a Keras model (``options`` from
    :func:`keras_plan_options`): the plan decides; its learning-rate step scales the Keras
    optimizer's ``learning_rate``, its swap step changes the layer, its clipper clips where
    the optimizer clips (:class:`KerasAutoClip`, returned, attached). Without an optimizer (or
    with a ``MultiOptimizer``) the clip and learning-rate steps stay idle; with one that clips
    already (``clipnorm``...), the clip step."""
    plan = TreatmentPlan(model, **options)  # no torch optimizer: the Keras controllers act
    clipper = None
    if optimizer is not None and several(optimizer):  # (no rate nor clipping of its own)
        optimizer = None
    names = {s.remedy for s in plan.steps}
    if "lr" in names and optimizer is not None:
        lr = plan.remedy("lr")
        assert isinstance(lr, LRRescuer)
        plan.use("lr", KerasLRRescue(optimizer, factor=lr.factor, min_lr=lr.min_lr, cooldown=0))
    if "swap" in names:
        swap = plan.remedy("swap")
        assert isinstance(swap, ActivationSwapper)
        plan.use("swap", KerasActivationSwap(sites, slope=swap.slope, patience=1))
    clips = clips_already(optimizer) if optimizer is not None else None
    if "clip" in names and optimizer is not None and clips is None:
        clip = plan.remedy("clip")
        assert isinstance(clip, AutoClip)
        clipper = KerasAutoClip(model, optimizer, clip).attach()
    elif "clip" in names and clips is not None and optimizer not in _SAID_IDLE_CLIP:
        _SAID_IDLE_CLIP.add(optimizer)  # (once per optimizer: a fit per epoch plans again)
        plan.warn(
            f"relu_doctor: the Keras optimizer clips its gradients itself ({clips}="
            f"{getattr(updating(optimizer), clips)}), so the treatment plan's clip step stays "
            f"idle (both would clip); its other steps act. Compile with an optimizer without "
            f"{clips} to let the plan clip when needed.")
    return plan, clipper


#: the optimizers whose clipping left a plan's clip step idle, said (see keras_plan)
_SAID_IDLE_CLIP: weakref.WeakSet[Any] = weakref.WeakSet()
