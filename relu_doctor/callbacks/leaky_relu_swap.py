"""``LeakyReluSwap``: swap a dying site's ReLU for LeakyReLU (or PReLU) during training.

A thin adapter around :class:`relu_doctor.remedies.ActivationSwapper`.

==============================  ===============================================================
``setup``                       build the swapper on the LightningModule; for PReLU, get ready
                                to recreate checkpointed PReLU modules before the model's
                                weights are loaded
``load_state_dict``             re-apply the checkpoint's swaps to the model, undoing those in
                                place that it does not hold (the base keeps a state that comes
                                before ``setup`` until the swapper exists)
``on_fit_start``                PReLU: give re-applied slopes to the new optimizers (before
                                their checkpointed state is loaded)
``on_train_start``              bind the swapper to the ReluDoctor monitor's Doctor, with the
                                Trainer's optimizers and schedulers
==============================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.events import Intervention
from relu_doctor.families import family_of
from relu_doctor.remedies import ActivationSwapper, swap_activation

__all__ = ["LeakyReluSwap"]


class LeakyReluSwap(RemedyCallback[ActivationSwapper]):
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

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        patience: int = 2,
        slope: float = 0.01,
        kind: str = "leaky_relu",
        per_unit: bool = False,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.patience = patience
        self.slope = slope
        self.kind = kind
        self.per_unit = per_unit
        self.include = include
        self.exclude = exclude
        self._make(nn.Identity())  # the remedy validates the arguments, now
        self._hook: Any = None

    def _make(self, model: nn.Module) -> ActivationSwapper:
        return ActivationSwapper(
            model,
            kind=self.kind,
            slope=self.slope,
            per_unit=self.per_unit,
            threshold=self.threshold,
            patience=self.patience,
            include=self.include,
            exclude=self.exclude,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kind=self.kind, include=self.include, exclude=self.exclude)

    def _swapper(self) -> ActivationSwapper | None:
        return self.remedy

    @property
    def swapper(self) -> ActivationSwapper | None:
        """The :class:`~relu_doctor.remedies.ActivationSwapper` (after ``setup``)."""
        return self.remedy

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if self.kind == "prelu" and trainer.world_size > 1:
            raise ReluDoctorError(
                "kind: 'prelu' creates parameters during training, which a DDP-wrapped model "
                "does not synchronise; use kind='leaky_relu' with more than one process."
            )
        if self.remedy is None or self.remedy.model is not pl_module:
            self._install(self._make(pl_module))
        if self.kind == "prelu" and self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
                self._recreate_prelu
            )

    def _recreate_prelu(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any
    ) -> None:
        """Before a checkpoint's weights load: put a PReLU wherever the checkpoint has PReLU
        slopes for what is a ReLU in this fresh model, and undo the PReLU swaps in place
        where it has none (saved before them: ``trainer.test(ckpt_path="best")`` after
        ``fit``), which a strict load refused as missing keys before the callbacks' state
        came to undo them."""
        if self.remedy is not None and self.remedy.swaps:
            self.remedy.undo_unsaved({"swaps": [
                {"path": p} for p in self.remedy.swaps if f"{prefix}{p}.weight" in state_dict]})
        for path, m in list(module.named_modules()):
            key = f"{prefix}{path}.weight"
            if not path or key not in state_dict or family_of(m) is None:
                continue
            if isinstance(m, nn.ReLU):
                n = int(state_dict[key].numel())
                swap_activation(module, path=path, kind="prelu", slope=self.slope, num_parameters=n)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._remove_hook()
        if self.remedy is not None and self.kind == "prelu":
            self.remedy.add_param_groups(
                self._optimizers(trainer), schedulers=self._schedulers(trainer)
            )

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        if self.remedy is not None:
            self.remedy.optimizers = self._optimizers(trainer)
            self.remedy.schedulers = self._schedulers(trainer)
        super()._bind(trainer, doctor)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ API
    def restore(self, site: str | None = None) -> list[Intervention]:
        """Undo the swap of ``site`` (or every swap); the interventions are recorded."""
        if self.remedy is None:
            return []
        return self.remedy.restore(site, step=self._step())

    @property
    def swaps(self) -> dict[str, Any]:
        """``{module path: SwapRecord}`` of the swaps in place."""
        return dict(self.remedy.swaps) if self.remedy is not None else {}
