"""``DormantReset``: recycle dormant units (ReDo, Sokar et al. 2023) during training.

A thin adapter around :class:`relu_doctor.remedies.DormantRecycler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.remedies import DormantRecycler

__all__ = ["DormantReset"]


class DormantReset(RemedyCallback):
    """Every ``every`` logging intervals, recycle the units the
    :class:`~relu_doctor.callbacks.ReluDoctor` monitor found dormant (ReDo score <= tau, dead
    units included): re-initialise their incoming weights (the Linear/Conv feeding the
    activation, through an optional BatchNorm whose slice is reset too), zero their outgoing
    weights (the consuming layers, conv-to-linear flattening included) and reset the
    optimizer state (Adam/AdamW moments, SGD momentum) of exactly those slices.

    Producer and consumer layers are found for ``nn.Sequential`` models and models torch.fx
    can trace. A site where they cannot be found (a residual sum feeds it, say) is left alone
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

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(tau=0.1), DormantReset(every=4)])
    """

    remedy_name = "dormant_reset"

    def __init__(
        self,
        tau: float | None = None,
        every: int = 1,
        max_fraction: float = 1.0,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        on_unlinkable: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._kwargs: dict[str, Any] = dict(
            tau=tau,
            every=every,
            max_fraction=max_fraction,
            include=include,
            exclude=exclude,
            on_unlinkable=on_unlinkable,
            seed=seed,
        )
        DormantRecycler(nn.Identity(), **self._kwargs)  # validate the arguments now
        self.recycler: DormantRecycler | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        k = self._kwargs
        return self._generate_state_key(include=k["include"], exclude=k["exclude"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.recycler is None or self.recycler.model is not pl_module:
            self.recycler = DormantRecycler(pl_module, **self._kwargs)
            self.recycler.warn = rank_zero_warn
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.recycler.load_state_dict(state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.recycler is not None
        self.recycler.optimizers = self._optimizers(trainer)
        self.recycler.bind(self._doctor(trainer))

    def state_dict(self) -> dict[str, Any]:
        if self.recycler is None:
            return dict(self._pending or {})
        return self.recycler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.recycler is None:
            self._pending = dict(state_dict)
        else:
            self.recycler.load_state_dict(state_dict)
