"""``DormantReset``: recycle dormant units (ReDo, Sokar et al. 2023) during training.

A thin adapter around :class:`relu_doctor.remedies.DormantRecycler`: built on the
LightningModule at ``setup``, bound to the ReluDoctor monitor's Doctor (with the Trainer's
optimizers, whose state slices it resets) at ``on_train_start``, checkpointed through the
base's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch.nn as nn

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.doctor import Doctor
from relu_doctor.remedies import DormantRecycler

__all__ = ["DormantReset"]


class DormantReset(RemedyCallback[DormantRecycler]):
    """Every ``every`` logging intervals, recycle the units the
    :class:`~relu_doctor.callbacks.ReluDoctor` monitor found dormant (ReDo score <= tau, dead
    units included): re-initialise their incoming weights (the Linear/Conv feeding the
    activation, through an optional BatchNorm whose slice is reset too), zero their outgoing
    weights (the consuming layers, conv-to-linear flattening included) and reset the
    optimizer state (Adam/AdamW moments, SGD momentum) of exactly those slices.

    Producer and consumer layers are read from one recorded forward pass of the model (its
    dataflow). A site whose units cannot be recycled without changing the network's output
    (its units also feed a residual sum, say) is left alone
    with a warning naming it, or raises with ``on_unlinkable="raise"``. Decisions come from the
    monitor's records (summed across processes) and the re-initialisation draws from a
    generator seeded by (seed, step, site), so every rank recycles the same units with the
    same values. Each recycling is an ``intervention`` event.

    Args:
        tau: own dormant threshold in (0, 1); default: the monitor's ``tau``.
        every: recycle at every n-th logging interval.
        max_fraction: at most this fraction of a site's units at once (most dormant first).
        include: glob patterns of site names to treat (default: all).
        exclude: glob patterns of site names to leave alone.
        on_unlinkable: ``"warn"`` or ``"raise"``.
        seed: base seed of the re-initialisation.
        reset_adam_step: restart Adam's step count for the recycled slices
            (:mod:`~relu_doctor.remedies.adam_step`); the Trainer's optimizers must then be
            ``torch.optim.Adam``/``AdamW``, checked when training starts.

    Attributes:
        recycler: the :class:`~relu_doctor.remedies.DormantRecycler` (after ``setup``).

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(tau=0.1), DormantReset(every=4)])
    """

    def __init__(
        self,
        tau: float | None = None,
        *,
        every: int = 1,
        max_fraction: float = 1.0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        on_unlinkable: str = "warn",
        seed: int = 0,
        reset_adam_step: bool = False,
    ) -> None:
        super().__init__()
        self.tau = tau
        self.every = every
        self.max_fraction = max_fraction
        self.include = include
        self.exclude = exclude
        self.on_unlinkable = on_unlinkable
        self.seed = seed
        self.reset_adam_step = reset_adam_step
        self._make(nn.Identity())  # the remedy validates the arguments, now

    def _make(self, model: nn.Module) -> DormantRecycler:
        return DormantRecycler(
            model,
            tau=self.tau,
            every=self.every,
            max_fraction=self.max_fraction,
            include=self.include,
            exclude=self.exclude,
            on_unlinkable=self.on_unlinkable,
            seed=self.seed,
            reset_adam_step=self.reset_adam_step,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def recycler(self) -> DormantRecycler | None:
        """The :class:`~relu_doctor.remedies.DormantRecycler` (after ``setup``)."""
        return self.remedy

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if self.remedy is None or self.remedy.model is not pl_module:
            self._install(self._make(pl_module))

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        if self.remedy is not None:
            self.remedy.optimizers = self._optimizers(trainer)
            self.remedy.adam_step.check(self.remedy.optimizers)
        super()._bind(trainer, doctor)
