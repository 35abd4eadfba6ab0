"""What the remedy callbacks share: finding the monitor, the optimizers and schedulers.

The remedy callbacks are adapters: the decisions and the surgery live in
:mod:`relu_doctor.remedies`; a callback builds one framework-free controller, binds it to the
:class:`~relu_doctor.callbacks.ReluDoctor` monitor's Doctor when training starts (the Doctor is
created in the monitor's ``on_fit_start``), and round-trips its state through checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError

__all__ = ["RemedyCallback"]


class RemedyCallback(Callback):
    """Base of the remedy callbacks (not public)."""

    remedy_name = "remedy"

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None

    # ------------------------------------------------------------------ wiring
    def _doctor(self, trainer: pl.Trainer) -> Doctor:
        from relu_doctor.callbacks.monitor import ReluDoctor

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
