"""``ReluDoctorTreatment``: the treatment plan in a Trainer, and the init check at fit start.

A thin adapter around :class:`relu_doctor.remedies.TreatmentPlan` (which decides, in order,
which remedy acts where): built at ``on_train_start`` with the LightningModule and the
Trainer's optimizers and LR schedulers, bound to the :class:`~relu_doctor.callbacks.ReluDoctor`
monitor's Doctor, checkpointed through the base's ``state_dict``. A strategy that shards
parameters is refused at ``setup`` when a step of the plan cannot act on shards. The plan's
AutoClip clips in ``on_before_optimizer_step``: Lightning runs the backward inside
``optimizer.step(closure)``, after the step's pre-hooks. With
``stop_when_hopeless`` a hopeless run stops the Trainer (``trainer.should_stop``). The first
training batch is checked with :func:`relu_doctor.check_init` before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.init_check import InitReport, check_init
from relu_doctor.remedies import (
    DEFAULT_STEPS,
    ActivationSwapper,
    AutoClip,
    PlanStep,
    Remedy,
    TreatmentPlan,
)
from relu_doctor.remedies.plan_steps import plan_steps

__all__ = ["ReluDoctorTreatment"]


class ReluDoctorTreatment(RemedyCallback[TreatmentPlan]):
    """Treat the run with a :class:`~relu_doctor.remedies.TreatmentPlan`: gentlest first
    (clipping, the learning rate, then ReDo recycling and the LeakyReLU swap), one change per
    site per cooldown, each judged on its target metric, none repeated where it did not help.

    Args:
        steps: the plan's ordered steps (default
            :data:`~relu_doctor.remedies.plan.DEFAULT_STEPS`).
        cooldown: logging intervals a site is left alone after a change.
        stop_when_hopeless: stop the Trainer when the run is hopeless (most units dead since
            monitoring began, or non-finite values) after the plan's steps had their chance;
            a ``stop`` intervention records the evidence.
        check_init: run :func:`relu_doctor.check_init` on the first training batch (its
            first element when the batch is a tuple or list) and warn about what it finds.
        seed: seed of the re-initialisations.

    Attributes:
        plan: the :class:`~relu_doctor.remedies.TreatmentPlan` (after ``on_train_start``).
        init_report: what the init check found (None before the first batch, or when the
            batch was not a model input).

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(), ReluDoctorTreatment(),
                                       EarlyStopping(monitor="relu_doctor/health", mode="max")])
    """

    def __init__(
        self,
        *,
        steps: Sequence[PlanStep | str] = DEFAULT_STEPS,
        cooldown: int = 2,
        stop_when_hopeless: bool = False,
        check_init: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.options: dict[str, Any] = {
            "steps": plan_steps(steps), "cooldown": cooldown,
            "stop_when_hopeless": stop_when_hopeless, "seed": seed,
        }
        self.check_init = bool(check_init)
        self.init_report: InitReport | None = None
        self._clip: AutoClip | None = None
        self._said_idle_clip = False  # the clip step left idle beside gradient_clip_val
        # validates the arguments now, and says which steps can act on shards
        self._template: TreatmentPlan | None = self._new_template()

    def _new_template(self) -> TreatmentPlan:
        """A plan of these options on a stand-in module (its remedies, before training)."""
        import torch.nn as nn

        return TreatmentPlan(nn.Identity(), **self.options)

    def __getstate__(self) -> dict[str, Any]:
        """Without the template plan, whose remedies hook its stand-in module: Lightning's
        ``DDPStrategy(start_method="spawn")`` pickles the callbacks into each process, and
        the hooks do not pickle. It is made again where needed."""
        return {**self.__dict__, "_template": None}

    @property
    def plan(self) -> TreatmentPlan | None:
        """The :class:`~relu_doctor.remedies.TreatmentPlan` (after ``on_train_start``)."""
        return self.remedy

    def _named_remedies(self) -> list[tuple[str, Remedy]]:
        if self._template is None:  # (unpickled: see __getstate__)
            self._template = self._new_template()
        plan = self.remedy or self._template
        return [(f"{type(self).__name__} step {s.remedy!r}", plan.remedy(s.remedy))
                for s in plan.steps]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._refuse_sharding(trainer)

    def _swapper(self) -> ActivationSwapper | None:
        plan = self.remedy
        if plan is None or not any(s.remedy == "swap" for s in plan.steps):
            return None
        swapper = plan.remedy("swap")
        return swapper if isinstance(swapper, ActivationSwapper) else None

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        if self.remedy is None or self.remedy.model is not trainer.lightning_module:
            self._install(
                TreatmentPlan(
                    trainer.lightning_module, optimizer=self._optimizers(trainer) or None,
                    schedulers=self._schedulers(trainer), **self.options,
                )
            )
        else:  # another fit of the same model: Lightning made its optimizers anew
            self.remedy.use_optimizers(self._optimizers(trainer) or None,
                                       self._schedulers(trainer))
        super()._bind(trainer, doctor)
        self._clip = None
        plan = self.remedy
        assert plan is not None
        if any(s.remedy == "clip" for s in plan.steps) and plan.optimizers:
            clip = plan.remedy("clip")
            assert isinstance(clip, AutoClip)
            clip.detach()
            trainers = getattr(trainer, "gradient_clip_val", None)
            if trainers:  # two clippers would both clip: the step stays idle (no hook)
                if not self._said_idle_clip:
                    self._said_idle_clip = True
                    rank_zero_warn(
                        f"ReluDoctorTreatment: the Trainer clips gradients itself "
                        f"(gradient_clip_val={trainers}), so the plan's clip step stays idle "
                        "(both would clip); its other steps act. Pass "
                        "Trainer(gradient_clip_val=None) to let the plan clip when needed.",
                        category=ReluDoctorWarning)
                return
            # The plan's step pre-hook would see the previous step's gradients (Lightning's
            # closure recomputes them after it): clip in on_before_optimizer_step instead. A
            # pre-hook that clips nothing stays, so the plan knows it has a clipper.
            clip.attach(plan.optimizers[0], params=[])
            self._clip = clip

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        plan = self.remedy
        if self._clip is not None and plan is not None and optimizer is plan.optimizers[0]:
            self._clip.clip_([p for g in optimizer.param_groups for p in g["params"]])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.check_init and self.init_report is None and trainer.global_step == 0:
            if type(pl_module).forward is pl.LightningModule.forward:  # (it raises)
                self.check_init = False
                rank_zero_warn(
                    f"ReluDoctorTreatment: init check skipped: {type(pl_module).__name__} "
                    "defines no forward(), and the check runs the model on the first batch's "
                    "input. Define forward(), or call relu_doctor.check_init(network, x) on the "
                    "network it trains; pass check_init=False to skip it without a word.",
                    category=ReluDoctorWarning)
                return
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            try:
                self.init_report = check_init(pl_module, x)
            except (ReluDoctorError, TypeError, RuntimeError, ValueError) as e:
                self.check_init = False  # not a model input: leave it
                rank_zero_warn(f"ReluDoctorTreatment: init check skipped ({e}).",
                               category=ReluDoctorWarning)
                return
            for f in self.init_report.findings:
                if f.severity != "info":
                    rank_zero_warn(f"init check: {f}", category=ReluDoctorWarning)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self.remedy is not None and self.remedy.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.remedy is not None:
            self.remedy.detach()
