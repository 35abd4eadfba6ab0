"""``LRRescue``: scale the learning rate down on a gradient explosion or a surge of dying units.

A thin adapter around :class:`relu_doctor.remedies.LRRescuer`, which scales every param
group's learning rate and the Trainer's LR schedulers' base values consistently, so the
schedules continue, reduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.doctor import Doctor
from relu_doctor.remedies import LRRescuer

__all__ = ["LRRescue"]


class LRRescue(RemedyCallback[LRRescuer]):
    """Multiply every param group's learning rate by ``factor`` when the
    :class:`~relu_doctor.callbacks.ReluDoctor` monitor reports an exploding gradient or a
    site's dead fraction jumps by ``dead_jump`` or more between two logging intervals.

    After a reduction ``cooldown`` logging intervals pass before the next; the learning rate
    never goes below ``min_lr``. The Trainer's LR schedulers keep the reduction: chainable
    ones (StepLR, ExponentialLR, ReduceLROnPlateau...) continue from the reduced
    ``group["lr"]``, closed-form ones (LambdaLR, OneCycleLR, CyclicLR...) from their scaled
    ``base_lrs`` / ``initial_lr`` / ``max_lr``. Decisions come from the monitor's records
    (summed across processes): every rank rescues at the same step. Each rescue is an
    ``intervention`` event saying which trigger fired and every group's lr before and after.

    Args:
        factor: multiply the learning rate by this, in (0, 1).
        min_lr: the floor.
        cooldown: logging intervals to wait after a reduction.
        dead_jump: rise of a site's dead fraction between two intervals that counts as a
            surge, in (0, 1].
        triggers: any of ``"exploding_gradient"``, ``"dead_surge"``, ``"nonfinite"``.

    Attributes:
        rescuer: the :class:`~relu_doctor.remedies.LRRescuer`.

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(), LRRescue(factor=0.5, cooldown=2)])
    """

    def __init__(
        self,
        factor: float = 0.5,
        *,
        min_lr: float = 1e-6,
        cooldown: int = 2,
        dead_jump: float = 0.2,
        triggers: Sequence[str] = ("exploding_gradient", "dead_surge"),
    ) -> None:
        super().__init__()
        self._options: dict[str, Any] = {"factor": factor, "min_lr": min_lr, "cooldown": cooldown,
                                         "dead_jump": dead_jump, "triggers": triggers}
        # Needs nothing of the Trainer until on_train_start: built (and validated) now.
        self._install(LRRescuer(**self._options))

    def _start_over(self) -> None:
        self._install(LRRescuer(**self._options))

    @property
    def rescuer(self) -> LRRescuer:
        """The :class:`~relu_doctor.remedies.LRRescuer`."""
        assert self.remedy is not None
        return self.remedy

    @property
    def state_key(self) -> str:
        return self._generate_state_key(triggers=self.rescuer.triggers)

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        self.rescuer.optimizers = self._optimizers(trainer)
        self.rescuer.schedulers = self._schedulers(trainer)
        super()._bind(trainer, doctor)
