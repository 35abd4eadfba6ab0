"""The remedy-callback base: how a framework-free remedy controller is wired into a Trainer.

The remedy controllers of :mod:`relu_doctor.remedies` decide and act; a remedy callback only
adapts them. :class:`RemedyCallback` holds everything the four remedy callbacks share:

- building the controller(s) when the Trainer can give what they need (the model at
  ``setup``, the optimizers at ``on_fit_start``), with warnings sent through
  ``rank_zero_warn``;
- the checkpoint state: ``state_dict``/``load_state_dict`` go to the controller, and a state
  that arrives before the controller exists (Lightning restores callbacks before the
  optimizers are made) is kept *pending* here, in one place, and applied when the controller
  is built;
- binding to the :class:`~relu_doctor.callbacks.ReluDoctor` monitor's Doctor at
  ``on_train_start`` (the Doctor is made in the monitor's ``on_fit_start``), with the
  Trainer's optimizers and LR schedulers;
- scalars to the Trainer's loggers from rank zero;
- starting over when the callback is passed to the ``fit`` of another model (a
  hyper-parameter loop): nothing of the last model's run is carried (:meth:`_start_over`);
  another ``fit`` of the same model goes on where the last one stopped;
- refusing, before training starts (``on_train_start``), a strategy that shards parameters
  (:data:`SHARDED_STRATEGIES`) when a controller cannot act on shards
  (:attr:`~relu_doctor.remedies.Remedy.on_shards`). Under DDP every controller acts
  identically on every rank: it decides from the records, summed across ranks, and draws
  from generators seeded the same everywhere.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.remedies import ActivationSwapper, Remedy
from relu_doctor.remedies.base import refuse_sharded

__all__ = ["SHARDED_STRATEGIES", "RemedyCallback", "sharded_strategy"]

#: Lightning strategies that shard parameters across processes, by class name (matched on
#: the strategy's class and its bases: subclasses count, and nothing is imported).
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def sharded_strategy(trainer: pl.Trainer) -> str | None:
    """The Trainer's strategy, in words, when it shards parameters across processes; else
    None (one device, DDP)."""
    strategy = type(trainer.strategy)
    if not {c.__name__ for c in strategy.__mro__} & set(SHARDED_STRATEGIES):
        return None
    return f"Lightning's {strategy.__name__} (parameters sharded across processes)"

R = TypeVar("R", bound=Remedy)
Q = TypeVar("Q", bound=Remedy)


class RemedyCallback(Callback, Generic[R]):
    """Base of the remedy callbacks (not public).

    A subclass builds its controller with :meth:`_install` (from ``__init__`` when it needs
    nothing of the Trainer, else from the hook that has what it needs) and may override:

    - :meth:`_bind`: what the controller gets at ``on_train_start`` (the Trainer's
      optimizers and schedulers), before ``bind(doctor)``;
    - :meth:`_check_state`: refuse a checkpoint state that is not for this callback;
    - :meth:`_controllers`, :meth:`_save`, :meth:`_restore`: for a callback that runs more
      than one controller (one clipper per optimizer).
    """

    def __init__(self) -> None:
        super().__init__()
        self.remedy: R | None = None
        self._pending_state: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._bound: Doctor | None = None
        self._module: weakref.ref[pl.LightningModule] | None = None  # the last fit's
        self._state_loaded = self._checked_load = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A module other than the last fit's starts the controllers over (subclasses that
        override this call it first)."""
        if self._module is not None and self._module() is not pl_module:
            self._start_over()
        self._module = weakref.ref(pl_module)
        self._state_loaded = self._checked_load = False  # (a checkpoint's state comes next)

    def _start_over(self) -> None:
        """Forget the last model's run: subclasses whose controllers outlive a model (the
        learning rate, the clippers) rebuild them; those made for a model rebuild anyway."""

    # ------------------------------------------------------------------ controllers
    def _install(self, remedy: R) -> R:
        """Make ``remedy`` this callback's controller and apply a checkpoint state that came
        before it."""
        self.remedy = self._adopt(remedy)
        self._apply_pending()
        return remedy

    @staticmethod
    def _adopt(remedy: Q) -> Q:
        """A controller as the callbacks run it: warnings from rank zero only, as
        ReluDoctorWarning (a filter on it missed them: they were UserWarnings)."""
        remedy.warn = functools.partial(rank_zero_warn, category=ReluDoctorWarning)
        return remedy

    def _apply_pending(self) -> None:
        if self._pending_state is not None and self._controllers():
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    def _controllers(self) -> list[Remedy]:
        """The controllers built so far."""
        return [] if self.remedy is None else [self.remedy]

    def acts_at(self, site: str) -> bool:
        """Whether this callback's remedy may act at ``site`` (its ``include``/``exclude``;
        True before it is built)."""
        return all(r.acts_at(site) for r in self._controllers())

    def _save(self) -> dict[str, Any]:
        assert self.remedy is not None
        return self.remedy.state_dict()

    def _restore(self, state: Mapping[str, Any]) -> None:
        assert self.remedy is not None
        self.remedy.load_state_dict(state)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise :class:`~relu_doctor.errors.ReluDoctorError` for a state of another kind."""

    def _named_remedies(self) -> list[tuple[str, Remedy]]:
        """The controllers this callback runs, each with the name a refusal gives it."""
        return [(type(self).__name__, r) for r in self._controllers()]

    def _refuse_sharding(self, trainer: pl.Trainer) -> None:
        """Raise :class:`~relu_doctor.errors.ReluDoctorError` naming the strategy when it
        shards parameters and a controller cannot act on shards."""
        strategy = sharded_strategy(trainer)
        for who, remedy in self._named_remedies():
            refuse_sharded(f"{who} ({type(remedy).__name__})", remedy.on_shards,
                           strategy, arg="strategy")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if not self._controllers():
            return dict(self._pending_state or {})
        return self._save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state_loaded = True
        if not state_dict:
            return
        self._check_state(state_dict)
        self._pending_state = dict(state_dict)
        self._apply_pending()

    def _swapper(self) -> ActivationSwapper | None:
        """The swapper this callback runs, if any: its swaps are checked against the
        checkpoint a stage loads (:meth:`_check_loaded`)."""
        return None

    def _check_loaded(self, trainer: pl.Trainer) -> None:
        """At a stage's start, once: a checkpoint loaded without this callback's state
        (``ModelCheckpoint(save_weights_only=True)``, a run without the callback) leaves the
        swaps in place, whose weights it may not have been trained with: said, as the
        Hugging Face callback says it (a review: nothing was said)."""
        swapper = self._swapper()
        if self._checked_load or not getattr(trainer, "ckpt_path", None) or swapper is None:
            return
        self._checked_load = True
        if not self._state_loaded and swapper.swaps:
            swapper.warn(f"relu_doctor: {type(self).__name__}: the checkpoint loaded "
                         f"({trainer.ckpt_path!r}) holds no state of this callback: the swaps of "
                         f"{', '.join(map(repr, swapper.swaps))} stay, and its weights may have been "
                         "trained without some of them.")

    # ------------------------------------------------------------------ wiring
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loaded(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loaded(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loaded(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loaded(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_sharding(trainer)
        self._trainer = trainer
        doctor = self._doctor(trainer)
        self._bound = doctor
        self._bind(trainer, doctor)

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        """Give the controllers what they need of the Trainer, then bind them to ``doctor``
        (subclasses add their optimizers and schedulers, then call this)."""
        for remedy in self._controllers():
            remedy.bind(doctor)

    def _doctor(self, trainer: pl.Trainer) -> Doctor:
        """The training Doctor of the Trainer's ReluDoctor monitor."""
        from relu_doctor.callbacks.monitor import ReluDoctor  # monitor does not import us

        monitors = [c for c in trainer.callbacks if isinstance(c, ReluDoctor)]  # type: ignore[attr-defined]
        me = type(self).__name__
        if not monitors:
            raise ReluDoctorError(
                f"{me} decides from the ReluDoctor monitor's statistics, but the Trainer has no "
                f"ReluDoctor callback; use Trainer(callbacks=[ReluDoctor(), {me}(...)])."
            )
        doctor = monitors[0].doctor
        if doctor is None:
            raise ReluDoctorError(
                f"{me}: the ReluDoctor monitor has not started (its Doctor is created in "
                "on_fit_start); remedies work inside Trainer.fit."
            )
        return doctor

    def _step(self) -> int:
        """The monitor's step (optimizer steps), 0 before training started."""
        return self._bound.global_step if self._bound is not None else 0

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [o for o in trainer.optimizers if isinstance(o, torch.optim.Optimizer)]

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[Any]:
        return [cfg.scheduler for cfg in trainer.lr_scheduler_configs]

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Scalars to every logger of the Trainer, from rank zero."""
        if not trainer.is_global_zero or not metrics:
            return
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
