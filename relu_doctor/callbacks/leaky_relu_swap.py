"""``LeakyReluSwap``: swap a dying site's ReLU for LeakyReLU (or PReLU) during training.

A thin adapter around :class:`relu_doctor.remedies.ActivationSwapper`.

==============================  ===============================================================
``setup``                       build the swapper on the LightningModule; for PReLU, get ready
                                to recreate checkpointed PReLU modules before the model's
                                weights are loaded
``load_state_dict``             re-apply the checkpoint's swaps to the model
``on_fit_start``                PReLU: give re-applied slopes to the new optimizers (before
                                their checkpointed state is loaded)
``on_train_start``              listen to the ReluDoctor monitor's log records
==============================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.remedies import ActivationSwapper, swap_activation

__all__ = ["LeakyReluSwap"]


class LeakyReluSwap(RemedyCallback):
    """Replace the ReLU of a site whose dead fraction stays above ``threshold`` for
    ``patience`` consecutive logging intervals by LeakyReLU (or PReLU).

    Decisions come from the :class:`~relu_doctor.callbacks.ReluDoctor` monitor's log records
    (summed across processes), so every rank swaps the same modules. Outputs for positive
    inputs are unchanged; a module shared by several sites (a ResNet block's ``relu``) is
    swapped for all of them and the event says so. Each swap is an ``intervention`` event in
    the run directory and TensorBoard, with the site's metrics before and, at the next
    logging interval, after. Checkpoints keep the swaps: a resumed model has them.

    Args:
        threshold: dead fraction above which a site counts as dying, in [0, 1).
        patience: consecutive logging intervals above the threshold before swapping.
        slope: the negative slope (alpha), typically 0.01 to 0.3; PReLU's initial slope.
        kind: ``"leaky_relu"`` (fixed slope) or ``"prelu"`` (learned slope; single process
            only: DDP does not know parameters created after it wrapped the model).
        per_unit: PReLU with one slope per channel (units on dim 1) instead of one.
        include: glob patterns of site names to treat (default: every ReLU site).
        exclude: glob patterns of site names to leave alone.

    Attributes:
        swapper: the :class:`~relu_doctor.remedies.ActivationSwapper` (after ``setup``).

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(log_every_n_steps=50),
                                       LeakyReluSwap(threshold=0.5, patience=3, slope=0.1)])
    """

    remedy_name = "leaky_relu_swap"

    def __init__(
        self,
        threshold: float = 0.5,
        patience: int = 2,
        slope: float = 0.01,
        kind: str = "leaky_relu",
        *,
        per_unit: bool = False,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        # Validate now (with the library's messages) on a throwaway module.
        ActivationSwapper(
            nn.Identity(),
            kind=kind,
            slope=slope,
            per_unit=per_unit,
            threshold=threshold,
            patience=patience,
            include=include,
            exclude=exclude,
        )
        self.threshold = threshold
        self.patience = patience
        self.slope = slope
        self.kind = kind
        self.per_unit = per_unit
        self.include = include
        self.exclude = exclude
        self.swapper: ActivationSwapper | None = None
        self._pending: dict[str, Any] | None = None
        self._hook: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind=self.kind, include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.kind == "prelu" and trainer.world_size > 1:
            raise ReluDoctorError(
                "kind: 'prelu' creates parameters during training, which a DDP-wrapped model "
                "does not synchronise; use kind='leaky_relu' with more than one process."
            )
        if self.swapper is None or self.swapper.model is not pl_module:
            self.swapper = ActivationSwapper(
                pl_module,
                kind=self.kind,
                slope=self.slope,
                per_unit=self.per_unit,
                threshold=self.threshold,
                patience=self.patience,
                include=self.include,
                exclude=self.exclude,
            )
        self.swapper.warn = rank_zero_warn
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.swapper.load_state_dict(state)
        if self.kind == "prelu" and self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._recreate_prelu)

    def _recreate_prelu(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any
    ) -> None:
        """Before a checkpoint's weights load: put a PReLU wherever the checkpoint has PReLU
        slopes for what is a ReLU in this fresh model."""
        for path, m in list(module.named_modules()):
            key = f"{prefix}{path}.weight"
            if not path or key not in state_dict or family_of(m) is None:
                continue
            if isinstance(m, nn.ReLU):
                n = int(state_dict[key].numel())
                swap_activation(module, path, kind="prelu", slope=self.slope, num_parameters=n)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.swapper is None:
            self._pending = dict(state_dict)
        else:
            self.swapper.load_state_dict(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.swapper is not None and self.kind == "prelu":
            self.swapper.add_param_groups(self._optimizers(trainer), self._schedulers(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.swapper is not None
        self.swapper.optimizers = self._optimizers(trainer)
        self.swapper.schedulers = self._schedulers(trainer)
        self.swapper.bind(self._doctor(trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ API
    def restore(self, site: str | None = None) -> list[dict[str, Any]]:
        """Undo the swap of ``site`` (or every swap); the events are recorded."""
        if self.swapper is None:
            return []
        step = self.swapper.doctor.global_step if self.swapper.doctor is not None else 0  # type: ignore[attr-defined]
        return self.swapper.restore(site, step=step)

    @property
    def swaps(self) -> dict[str, Any]:
        """``{module path: SwapRecord}`` of the swaps in place."""
        return dict(self.swapper.swaps) if self.swapper is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self.swapper is None:
            return dict(self._pending or {})
        return self.swapper.state_dict()
