"""``AdaptiveGradClip``: AutoClip or AGC gradient clipping inside ``Trainer.fit``.

A thin adapter around :class:`relu_doctor.remedies.AutoClip` / :class:`~relu_doctor.remedies.AGC`.
Clipping runs in ``on_before_optimizer_step``: Lightning calls it after the backward and after
AMP unscaling, before the optimizer step. Under DDP the gradients are already averaged
across processes there, so every rank clips the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from relu_doctor._validate import glob_patterns, matches
from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.remedies import AGC, AutoClip, Remedy

__all__ = ["AdaptiveGradClip"]

MODES = ("autoclip", "agc")


class AdaptiveGradClip(RemedyCallback[AutoClip | AGC]):
    """Adaptive gradient clipping: AutoClip (the gradient norm clipped to a percentile of its
    own history) or AGC (unit-wise, relative to the weight norm).

    No host synchronisation per step: the norm history, threshold and clip counts stay on
    the device and are read at the :class:`~relu_doctor.callbacks.ReluDoctor` monitor's
    logging intervals. There the threshold, the number clipped, the fraction and the
    gradient norm before clipping (RMS over the interval's steps) go to the Trainer's loggers
    (``relu_doctor/clip/threshold``, ``relu_doctor/clip/clipped``, ``relu_doctor/clip/fraction``,
    ``relu_doctor/clip/grad_norm``; one suffix ``_<i>`` per optimizer beyond the first), and
    an interval that clipped anything is an ``intervention`` event (a report of what it
    clipped, not judged). The norm history round-trips through checkpoints.

    Args:
        mode: ``"autoclip"`` or ``"agc"``.
        percentile: AutoClip's percentile of the norm history, in (0, 100].
        history: AutoClip's history length (a ring buffer on the device).
        warmup_steps: AutoClip steps that only record their norm.
        clipping: AGC's ratio lambda (e.g. 0.01 to 0.16).
        eps: AGC's floor of the weight norm.
        exclude: glob patterns of parameter names (``named_parameters`` of the
            LightningModule) left unclipped; AGC's paper leaves the final classifier alone,
            e.g. ``exclude="head.*"``.

    Example::

        trainer = L.Trainer(callbacks=[ReluDoctor(), AdaptiveGradClip("autoclip", percentile=10)])
    """

    def __init__(
        self,
        mode: str = "autoclip",
        *,
        percentile: float = 10.0,
        history: int = 1000,
        warmup_steps: int = 0,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ReluDoctorError(
                f"mode: expected one of {list(MODES)}, got {mode!r}. 'autoclip' clips the "
                "global norm to a percentile of its history; 'agc' clips unit-wise."
            )
        self.mode = mode
        self.percentile = percentile
        self.history = history
        self.warmup_steps = warmup_steps
        self.clipping = clipping
        self.eps = eps
        self.exclude = glob_patterns("exclude", exclude)
        self._make()  # the remedy validates the arguments, now
        self.clippers: dict[int, AutoClip | AGC] = {}
        self._params: dict[int, list[torch.Tensor]] = {}

    def _make(self) -> AutoClip | AGC:
        if self.mode == "autoclip":
            return AutoClip(self.percentile, history=self.history, warmup_steps=self.warmup_steps)
        return AGC(self.clipping, eps=self.eps)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    # ------------------------------------------------------------------ controllers
    # One clipper per optimizer (its own norm history): made when the optimizers are.
    def _controllers(self) -> list[Remedy]:
        return list(self.clippers.values())

    def _save(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "clippers": {i: c.state_dict() for i, c in self.clippers.items()},
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        for i, st in state.get("clippers", {}).items():
            self._clipper(int(i)).load_state_dict(st)

    def _start_over(self) -> None:
        for c in self.clippers.values():
            c.detach()
        self.clippers = {}

    def _clipper(self, i: int) -> AutoClip | AGC:
        """The clipper of the ``i``-th optimizer (made on first use)."""
        if i not in self.clippers:
            self.clippers[i] = self._adopt(self._make())
        return self.clippers[i]

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ReluDoctorError(
                f"checkpoint: AdaptiveGradClip state is for mode {state.get('mode')!r}, "
                f"this callback runs {self.mode!r}."
            )

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        clip = getattr(trainer, "gradient_clip_val", None)
        if clip:  # (before anything is bound, as HF's max_grad_norm and Keras' clipnorm)
            how = getattr(trainer.gradient_clip_algorithm, "value", "norm")
            raise ReluDoctorError(
                f"AdaptiveGradClip: the Trainer clips gradients itself (gradient_clip_val="
                f"{clip}, gradient_clip_algorithm={how!r}), after "
                f"{self.mode}: both would clip, and the norms relu_doctor records would be "
                f"before the Trainer's clip. {self.mode} takes its place: pass "
                "Trainer(gradient_clip_val=None), or drop AdaptiveGradClip."
            )
        self._trainer = trainer
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._params = {}
        optimizers = self._optimizers(trainer)
        for i, opt in enumerate(optimizers):
            self._clipper(i).optimizer_index = i if len(optimizers) > 1 else None
            params = [p for g in opt.param_groups for p in g["params"]]
            self._params[i] = [p for p in params if matches(names.get(id(p), ""), (), self.exclude)]
        self._apply_pending()

    def _bind(self, trainer: pl.Trainer, doctor: Doctor) -> None:
        super()._bind(trainer, doctor)
        doctor.add_listener(self._on_record)  # after the clippers: reads what they closed

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        for i, opt in enumerate(self._optimizers(trainer)):
            if opt is optimizer:
                clipper = self.clippers.get(i)
                if clipper is not None:
                    clipper.clip_(self._params.get(i, []))
                return

    def _on_record(self, record: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        metrics: dict[str, float] = {}
        for i, clipper in self.clippers.items():
            stats = clipper.last
            if not stats:
                continue
            sfx = "" if i == 0 else f"_{i}"
            if stats["threshold"] is not None:
                metrics[f"relu_doctor/clip/threshold{sfx}"] = float(stats["threshold"])
            metrics[f"relu_doctor/clip/clipped{sfx}"] = float(stats["clipped"])
            metrics[f"relu_doctor/clip/fraction{sfx}"] = float(stats["clip_fraction"])
            if stats.get("grad_norm") is not None:
                metrics[f"relu_doctor/clip/grad_norm{sfx}"] = float(stats["grad_norm"])
        self._log(trainer, metrics, record.step)
