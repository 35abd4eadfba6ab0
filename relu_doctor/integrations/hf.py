"""Hugging Face ``transformers.Trainer``: ``ReluDoctorCallback`` makes relu_doctor one line.

A thin adapter from Trainer events to :class:`~relu_doctor.Doctor`, which holds the
statistics, windows, diagnosis, run directory and TensorBoard files.

========================  =====================================================================
``on_train_begin``        build the Doctor on the unwrapped model and the Trainer's optimizer
                          (``<output_dir>/relu_doctor``; restored from the checkpoint being
                          resumed), bind the remedies, attach
``on_step_end``           one step per optimizer step (after ``gradient_accumulation_steps``
                          micro-batches); a closed interval asks the Trainer to log now; a
                          treatment plan that found the run hopeless stops training
                          (``control.should_training_stop``)
``on_log``                the interval's scalars (``relu_doctor/<metric>/<site>``, the
                          run-level ``relu_doctor/health``...) join the Trainer's ``logs``,
                          so every ``report_to`` backend gets them; an evaluation's
                          ``logs`` (the metrics ``EarlyStoppingCallback`` and
                          ``metric_for_best_model`` read) get the last interval's run-level
                          numbers as ``eval_relu_doctor/health``... and the evaluation
                          stream's scalars (``relu_doctor_val/...``)
``on_save``               the Doctor's and the remedies' state into the checkpoint directory
``on_train_end``          log the last, partial window; detach
========================  =====================================================================

``evaluate``/``predict`` passes run with the model in eval mode and gradients off: the
Doctor leaves them out of the training stream, or collects them as the evaluation stream
(``eval_stream=True``). Under DDP (``accelerate``), counts are summed across processes at
logging time only; rank zero writes.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from relu_doctor.integrations._common import (
    FindingWarner,
    check_metrics,
    check_run_dir,
    check_warn,
    flag,
    flush_and_detach,
    fresh_dir,
    health_scalars,
    missing,
    plan_options,
    record_scalars,
    remedies_on,
    remedy_options,
    safe_step,
    summary_scalars,
)

try:
    from transformers.trainer_callback import CallbackHandler, TrainerCallback
except ImportError as e:
    raise missing(
        "transformers", e, what="relu_doctor.integrations.hf", install="transformers"
    ) from None

import torch
import torch.nn as nn

from relu_doctor._validate import glob_patterns, name_or_function, positive_int, unwrapped_optimizer
from relu_doctor._validate import unit_dims as check_unit_dims
from relu_doctor.diagnosis import DiagnosisConfig, diagnosis_config
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.history import IntervalRecord
from relu_doctor.remedies import (
    ActivationSwapper,
    AutoClip,
    DormantRecycler,
    LRRescuer,
    TreatmentPlan,
)
from relu_doctor.reports import tensorboard as tb
from relu_doctor.sampling import DEFAULT_BUDGET, check_rate

__all__ = ["STATE_FILE", "ReluDoctorCallback"]

#: The file holding relu_doctor's state in each checkpoint directory.
STATE_FILE = "relu_doctor.pt"
_STATE_VERSION = 1


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper."""
    return unwrapped_optimizer(optimizer)  # type: ignore[no-any-return]


def _scaler(optimizer: Any) -> Any:
    """The loss scaler of accelerate's ``AcceleratedOptimizer`` (fp16), or None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if callable(getattr(scaler, "is_enabled", None)) else None


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t)
    return t


#: The Trainer's console callbacks, which print every ``logs`` key.
_PRINTERS = ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback")


class _ConsoleTrim(TrainerCallback):
    """Put right before the Trainer's console printer: takes the per-site and per-layer
    scalars out of ``logs`` once the ``report_to`` callbacks (earlier in the list) have them,
    so that a console line holds the model-wide numbers, not a hundred site keys; its
    ``restore`` twin, right after the printer, puts them back for the callbacks after it."""

    def __init__(self, owner: ReluDoctorCallback, *, restore: bool = False) -> None:
        self.owner = owner
        self.restore = restore

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None:
            return
        if self.restore:
            logs.update(self.owner._trimmed)
            self.owner._trimmed = {}
        else:
            self.owner._trimmed = {k: logs.pop(k) for k in self.owner._detail if k in logs}
            self.owner._detail.clear()


class ReluDoctorCallback(TrainerCallback):
    """Watch a ``transformers`` model's ReLU-family activations during ``Trainer.train``.

    Args:
        log_every_n_steps: optimizer steps per logging interval; None: the Trainer's
            ``logging_steps``.
        every_n_steps: a fixed rate (collect every n-th optimizer step), or ``"auto"``
            (default): the rate ``overhead_budget`` chooses.
        overhead_budget: the largest fraction of a step the statistics may cost (default
            0.03, see :class:`~relu_doctor.Doctor`); None collects every step.
        tau: dormant threshold on the ReDo score (default 0.1).
        include: glob patterns of module paths to watch.
        exclude: glob patterns of module paths to leave out.
        unit_dims: ``{pattern: dim}`` overriding which dim holds the units.
        functional: capture functional activations too (``F.gelu`` in a forward; HF's own GELU
            and SiLU classes are watched as modules, known by name).
        padding_mask: leave the padding of padded batches out of every statistic:
            ``"attention_mask"`` reads the Trainer's batches' mask (see
            :class:`~relu_doctor.Doctor`); not for an encoder-decoder, whose decoder's
            positions are not the encoder's. None (default): every position counts.
        run_dir: the run directory; default ``<args.output_dir>/relu_doctor`` (``_1``,
            ``_2``... when that holds an earlier run; a resumed run goes on in its own).
        gradients: collect gradient statistics.
        eval_stream: collect ``evaluate``/``predict`` passes as the evaluation stream
            (``<run_dir>/eval``, scalars ``relu_doctor_val/...``) instead of leaving them out.
        config: diagnosis thresholds.
        metrics: site metrics handed to the Trainer's ``logs``.
        console: print the per-site and per-layer scalars in the Trainer's console lines too
            (its progress bar or printer). By default those lines get only the model-wide
            numbers (``relu_doctor/health``, ``relu_doctor/dead_fraction``...); the
            ``report_to`` backends and the callbacks before the printer get every scalar.
        warn: lowest finding severity raised as a warning (main process), or None.
        leaky_relu_swap: swap dying ``nn.ReLU`` modules for LeakyReLU: True, or a dict of
            :class:`~relu_doctor.remedies.ActivationSwapper` arguments.
        dormant_reset: ReDo recycling of dormant units: True, or a dict of
            :class:`~relu_doctor.remedies.DormantRecycler` arguments.
        lr_rescue: scale the learning rate down through the Trainer's optimizer and
            scheduler: True, or a dict of :class:`~relu_doctor.remedies.LRRescuer` arguments.
        autoclip: AutoClip in place of ``max_grad_norm`` (set ``max_grad_norm=0``): True, or
            a dict of :class:`~relu_doctor.remedies.AutoClip` arguments.
        treatment: treat the run with a :class:`~relu_doctor.remedies.TreatmentPlan` on the
            Trainer's model, optimizer and scheduler instead of the single remedies above
            (refused beside them): True (the default plan), or a dict of its arguments
            (``steps``, ``cooldown``, ``stop_when_hopeless``...). Its clipper is a step
            pre-hook of the optimizer, used only with ``max_grad_norm=0``: where the Trainer
            clips (1.0 by default) the plan's clip step stays idle, said once (both would
            clip). With ``stop_when_hopeless`` a hopeless run stops training
            (``control.should_training_stop``) after a ``stop`` intervention with its
            evidence.

    Attributes:
        doctor: the :class:`~relu_doctor.Doctor` (None before training starts).
        remedies: the remedies in use, by name (the plan: ``"treatment_plan"``).

    Example::

        from relu_doctor.integrations.hf import ReluDoctorCallback

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[ReluDoctorCallback()])
        trainer.train()
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        *,
        every_n_steps: int | Literal["auto"] = "auto",
        overhead_budget: float | None = DEFAULT_BUDGET,
        tau: float | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        unit_dims: Mapping[str, int] | None = None,
        functional: bool | None = None,
        padding_mask: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        gradients: bool = True,
        eval_stream: bool = False,
        config: DiagnosisConfig | None = None,
        metrics: Sequence[str] | None = None,
        console: bool = False,
        warn: str | None = "warning",
        leaky_relu_swap: bool | Mapping[str, Any] = False,
        dormant_reset: bool | Mapping[str, Any] = False,
        lr_rescue: bool | Mapping[str, Any] = False,
        autoclip: bool | Mapping[str, Any] = False,
        treatment: bool | Mapping[str, Any] = False,
    ) -> None:
        self.log_every_n_steps = (
            None if log_every_n_steps is None
            else positive_int("log_every_n_steps", log_every_n_steps)
        )
        self.every_n_steps, self.overhead_budget = check_rate(every_n_steps, overhead_budget)
        self.config = replace(diagnosis_config(tau, config), loop="hf")  # its names
        self.include = include if glob_patterns("include", include) else None
        self.exclude = exclude if glob_patterns("exclude", exclude) else None
        self.unit_dims = None if unit_dims is None else check_unit_dims("unit_dims", unit_dims)
        self.functional = None if functional is None else flag("functional", functional)
        self.padding_mask = name_or_function("padding_mask", padding_mask)
        self.run_dir = check_run_dir(run_dir)
        self.gradients = flag("gradients", gradients)
        self.eval_stream = flag("eval_stream", eval_stream)
        self.metrics = check_metrics(metrics)
        self.console = flag("console", console)
        self.warn = check_warn(warn)
        # what _bind_remedies gives each from the Trainer is refused in its dict
        self._opts = {
            "leaky_relu_swap": remedy_options("leaky_relu_swap", leaky_relu_swap,
                                              ActivationSwapper,
                                              supplied=("optimizer", "schedulers"),
                                              stand_in={"model": nn.Identity()}),
            "dormant_reset": remedy_options("dormant_reset", dormant_reset, DormantRecycler,
                                            supplied=("optimizers",),
                                            stand_in={"model": nn.Identity()}),
            "lr_rescue": remedy_options("lr_rescue", lr_rescue, LRRescuer,
                                        supplied=("optimizer", "schedulers")),
            "autoclip": remedy_options("autoclip", autoclip, AutoClip),
        }
        self._plan_opts = plan_options(treatment, others=dict(self._opts))
        self.doctor: Doctor | None = None
        self.remedies: dict[str, Any] = {}
        self._pending: dict[str, float] = {}
        self._detail: set[str] = set()  # keys of this log's per-site/per-layer scalars
        self._trimmed: dict[str, Any] = {}  # those taken out for the console line
        self._last: IntervalRecord | None = None
        self._warner = FindingWarner(None)
        self._clip: AutoClip | None = None
        self._said_idle_clip = False  # the plan's clip step left idle beside max_grad_norm
        self._output_dir = "."
        self._stopped = False
        # takes the training passes' losses (the model output's ``loss``) for each record's
        # window_loss: the Trainer logs its own only after our log, once the remedies
        # judged without it (a review: their loss guard never ran)
        self._loss_hook: Any = None

    def _take_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        try:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(
                output, "loss", None)
            if (isinstance(loss, torch.Tensor) and loss.numel() == 1 and module.training
                    and torch.is_grad_enabled() and self.doctor is not None):
                self.doctor.window_loss.add(loss)
        except Exception:  # (never into the user's forward: no loss taken)
            return

    # ------------------------------------------------------------------ train lifecycle
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ReluDoctorError("model: the Trainer passed no model to ReluDoctorCallback.")
        if optimizer is None:
            raise ReluDoctorError(
                "optimizer: the Trainer has no optimizer yet; ReluDoctorCallback attaches in "
                "on_train_begin, once Trainer.train() created it (do not call its events "
                "yourself before training)."
            )
        clip_opts = self._opts["autoclip"]
        if clip_opts is not None and _clips_at(args):
            raise ReluDoctorError(
                f"autoclip: the Trainer clips the gradient norm itself (max_grad_norm="
                f"{args.max_grad_norm}) before relu_doctor sees the gradients; AutoClip takes "
                "its place: pass TrainingArguments(max_grad_norm=0), or autoclip=False."
            )
        if self.doctor is not None:
            # Where the last train() raised (an error, Ctrl-C), the Trainer called no
            # on_train_end: end that run as on_train_end does (its partial window logged, its
            # run directory closed). After an on_train_end, nothing is left to do.
            flush_and_detach(self.doctor, self._detach)
        self._detach()
        self._stopped = False
        self._last = None
        self._pending = {}  # (the last run's final scalars: not this run's first log's)
        self._output_dir = str(args.output_dir)
        opt = _inner(optimizer)
        self._move_first()
        world = int(getattr(args, "world_size", 1) or 1)
        is_zero = bool(state.is_world_process_zero)
        saved = self._checkpoint_state(args, state)
        if self.run_dir is not None:
            run_dir = Path(self.run_dir)
        elif saved is not None and saved.get("run_dir"):
            # Resumed: the run directory goes on (one inside output_dir is saved relative to
            # it, so a checkpoint copied to another output_dir continues there).
            run_dir = Path(args.output_dir, saved["run_dir"])
        else:
            run_dir = fresh_dir(Path(args.output_dir, "relu_doctor"))
        every = self.log_every_n_steps or (
            int(args.logging_steps) if args.logging_steps >= 1 else 50
        )
        doc = Doctor(
            model,
            log_every_n_steps=max(1, int(every)),
            every_n_steps=self.every_n_steps,
            overhead_budget=self.overhead_budget,
            include=self.include,
            exclude=self.exclude,
            unit_dims=self.unit_dims,
            gradients=self.gradients,
            optimizer=opt,
            # fp16: accelerate's optimizer wrapper holds the Trainer's GradScaler (its step
            # and update run inside the wrapper's step, before on_step_end's doc.step())
            grad_scaler=_scaler(optimizer),
            run_dir=run_dir,
            config=replace(self.config, clipped_by=(  # (HF clips at 1.0 by default)
                f"the Trainer's max_grad_norm={args.max_grad_norm:g}" if _clips_at(args)
                else None)),
            all_reduce=_all_reduce if world > 1 else None,
            world_size=world,
            is_writer=is_zero,
            functional=self.functional,
            padding_mask=self.padding_mask,
            resume=saved is not None,
            eval_stream=self.eval_stream,
        )
        if saved is not None:
            doc.load_state_dict(saved["doctor"], windows=is_zero or world == 1)
        new = "pass ReluDoctorCallback a new run_dir (or none: a fresh one in output_dir)"
        doc.resume_advice = (  # (said if run_dir holds a run and this is no resumed train())
            f"the checkpoint of step {state.global_step} this train() resumes from holds no "
            f"relu_doctor state (saved without this callback): {new}" if state.global_step else
            f"continue it with trainer.train(resume_from_checkpoint=...) from a checkpoint "
            f"saved with this callback, or {new}")
        doc.add_listener(self._on_record)
        self.doctor = doc
        self._loss_hook = model.register_forward_hook(self._take_loss)
        self._bind_remedies(model, opt, lr_scheduler, doc, saved, _clips_at(args))
        self._warner = FindingWarner(self.warn if is_zero else None,
                                     on=remedies_on(self.remedies))
        self._warner.load_state_dict((saved or {}).get("warned", ()))  # resumed: said before
        try:
            doc.attach()
        except BaseException:
            self._detach()  # the remedies bound above
            self.doctor = None
            raise

    def _move_first(self) -> None:
        """Put this callback right after the Trainer's flow callback in its handler, so that
        our ``on_log`` adds the scalars before the ``report_to`` callbacks write ``logs``.

        The handler is the caller of this event (transformers passes no handle to it)."""
        frame = inspect.currentframe()
        handler = None
        while frame is not None and handler is None:
            cand = frame.f_locals.get("self")
            if isinstance(cand, CallbackHandler):
                handler = cand
            frame = frame.f_back
        del frame
        if handler is None or self not in handler.callbacks:
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(1 if handler.callbacks else 0, self)
        cbs = handler.callbacks
        printer = next((i for i, c in enumerate(cbs) if type(c).__name__ in _PRINTERS), None)
        if not self.console and printer is not None and not any(
            isinstance(c, _ConsoleTrim) and c.owner is self for c in cbs
        ):
            cbs.insert(printer + 1, _ConsoleTrim(self, restore=True))
            cbs.insert(printer, _ConsoleTrim(self))

    def _bind_remedies(self, model: Any, opt: torch.optim.Optimizer, sched: Any, doc: Doctor,
                       saved: Mapping[str, Any] | None, max_grad_norm: float) -> None:
        sched = getattr(sched, "scheduler", sched)  # accelerate's AcceleratedScheduler
        scheds = [sched] if isinstance(sched, torch.optim.lr_scheduler.LRScheduler) else []
        # The scheduler steps the optimizer it was made for (accelerate's wrapper, whose
        # param groups are the inner optimizer's): a learning-rate cut scales that one, so
        # the scheduler keeps it; the clipper hooks the inner one's step.
        owner = getattr(sched, "optimizer", None)
        lr_opt = owner if isinstance(owner, torch.optim.Optimizer) else opt
        o = self._opts
        rem: dict[str, Any] = {}
        if self._plan_opts is not None:
            plan = TreatmentPlan(model, optimizer=opt, schedulers=scheds, **self._plan_opts)
            if lr_opt is not opt and any(s.remedy == "lr" for s in plan.steps):
                lr = plan.remedy("lr")
                assert isinstance(lr, LRRescuer)
                plan.use("lr", LRRescuer(lr_opt, schedulers=scheds, factor=lr.factor,
                                         min_lr=lr.min_lr, cooldown=0))
            rem["treatment_plan"] = plan
        if o["leaky_relu_swap"] is not None:
            rem["leaky_relu_swap"] = ActivationSwapper(
                model, optimizer=opt, schedulers=scheds, **o["leaky_relu_swap"]
            )
        if o["dormant_reset"] is not None:
            rem["dormant_reset"] = DormantRecycler(model, optimizers=opt, **o["dormant_reset"])
        if o["lr_rescue"] is not None:
            rem["lr_rescue"] = LRRescuer(lr_opt, schedulers=scheds, **o["lr_rescue"])
        if o["autoclip"] is not None:
            self._clip = AutoClip(**o["autoclip"]).attach(opt)  # type: ignore[assignment]
            rem["autoclip"] = self._clip
        for name in ("leaky_relu_swap", "dormant_reset"):  # (their refusals name the option)
            if name in rem:
                rem[name].options_name = name
        states = (saved or {}).get("remedies", {})
        for name, r in rem.items():
            last = self.remedies.get(name)  # another train() of this Trainer: go on from it
            if last is not None and type(last) is type(r) and getattr(last, "model", None) is model:
                r.carry_from(last)  # (its swaps in place adopted: a checkpoint undoes them)
            if name in states:
                r.load_state_dict(states[name])
            r.bind(doc)
        self.remedies = rem
        held = rem.get("treatment_plan")
        if isinstance(held, TreatmentPlan) and max_grad_norm and any(
                s.remedy == "clip" for s in held.steps):
            clip = held.remedy("clip")
            assert isinstance(clip, AutoClip)
            clip.detach()  # (an AutoClip with no hook: the plan skips it)
            if not self._said_idle_clip:  # (once: a fit per epoch binds again)
                self._said_idle_clip = True
                held.warn(
                    f"relu_doctor: the Trainer clips the gradient norm itself (max_grad_norm="
                    f"{max_grad_norm:g}; 1.0 by default), so the treatment plan's clip step "
                    "stays idle (both would clip); its other steps act. Pass "
                    "TrainingArguments(max_grad_norm=0) to let the plan clip when needed.")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The Trainer's max_steps is set from the epochs when not given, so the last step is
        # known ahead: its update ratio is read, and a remedy changes nothing there.
        if self.doctor is not None and not self._stopped and _ends_at(state, state.global_step + 1):
            self.doctor.expect_last_step()
        return None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.doctor is None or self._stopped:
            return None
        # called once per optimizer step by the Trainer (a Trainer of a version without
        # on_pre_optimizer_step says the last step here)
        record = safe_step(self.doctor, self._step_aside, last=_ends_at(state, state.global_step))
        if record is not None:
            control.should_log = True  # the Trainer logs at this step: on_log adds ours
        plan = self.remedies.get("treatment_plan")
        if isinstance(plan, TreatmentPlan) and plan.should_stop:
            control.should_training_stop = True  # the plan's stop event holds the evidence
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        doc = self.doctor
        if logs is None or doc is None:
            return
        last = self._last
        if (last is not None and last.step == state.global_step and "loss" in logs
                and not any(str(k).startswith("eval_") for k in logs)):
            # The training curve: the Trainer logs its loss right after each of our logs (we
            # ask it to), its mean since its previous log: our window's, when logging_steps
            # is log_every_n_steps (the default)
            doc.add_metrics(last, {"loss": logs["loss"]})
        added: dict[str, Any] = {}
        if any(str(k).startswith("eval_") for k in logs):
            # the evaluation's metrics dict itself: EarlyStoppingCallback and
            # metric_for_best_model="relu_doctor/health" read eval_relu_doctor/health there;
            # before the first log, the open window's (the Trainer raised KeyError at an
            # evaluation earlier than the first log: an HF trial)
            read = last if last is not None else _open_window(doc)
            if read is not None:
                added.update({f"eval_{k}": v for k, v in health_scalars(read).items()})
        if doc.eval is not None and any(str(k).startswith("eval_") for k in logs):
            rec = doc.log_eval()  # one evaluation-stream window per evaluation
            if rec is not None:
                self._warner(rec, "evaluation")
                scalars = record_scalars(rec, self.metrics, tb.VAL_PREFIX)
                self._detail.update(scalars.keys() - summary_scalars(rec, tb.VAL_PREFIX).keys())
                added.update(scalars)
        added.update(self._pending)
        self._pending = {}
        logs.update(added)
        # The Trainer put its copy of this log in state.log_history before calling us: the
        # run-level numbers go there too (trainer_state.json), not the per-site detail.
        history = getattr(state, "log_history", None)
        if added and history and history[-1].get("step") == state.global_step:
            history[-1].update({k: v for k, v in added.items() if k not in self._detail})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        doc = self.doctor
        if doc is None:
            return
        try:  # (training ended: what cannot be done is said, not raised)
            self._undo_swaps_after(args, state)
        except Exception as e:
            warnings.warn(f"relu_doctor: the swaps made after the best checkpoint could not be "
                          f"undone ({type(e).__name__}: {e}).", ReluDoctorWarning,
                          stacklevel=user_stacklevel())
        flush_and_detach(doc, self._detach)

    def _undo_swaps_after(self, args: Any, state: Any) -> None:
        """``load_best_model_at_end`` loaded the best checkpoint's weights into the model the
        training left, LeakyReLU swaps made after that checkpoint included: weights trained
        with ReLU there, read through a LeakyReLU (an HF trial: logits off by 0.02, and the
        reloaded checkpoint builds ReLU). Those swaps are undone, recorded and said once, so
        that the model is the checkpoint's (the swaps saved with it stay)."""
        best = getattr(state, "best_model_checkpoint", None)
        plan = self.remedies.get("treatment_plan")
        swapper = (plan.remedy("swap") if isinstance(plan, TreatmentPlan)
                   and any(s.remedy == "swap" for s in plan.steps)
                   else self.remedies.get("leaky_relu_swap"))
        if not (getattr(args, "load_best_model_at_end", False) and best) or not isinstance(
                swapper, ActivationSwapper) or not swapper.swaps:
            return
        path = Path(best, STATE_FILE)
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        remedies = saved.get("remedies", {})
        held = (remedies.get("treatment_plan", {}).get("remedies", {}).get("swap")
                if isinstance(plan, TreatmentPlan) else remedies.get("leaky_relu_swap")) or {}
        if not saved:  # (a checkpoint without relu_doctor's state: which swaps it had is unknown)
            swapper.warn(f"relu_doctor: load_best_model_at_end loaded {best!r}, which holds no "
                         "relu_doctor state: the LeakyReLU swaps stay, and the checkpoint's "
                         "weights may have been trained without some of them.")
            return
        swapper.undo_unsaved(held, loaded=f"load_best_model_at_end loaded {best!r}, which",
                             step=int(state.global_step))

    def _step_aside(self) -> None:
        self._detach()
        self._stopped = True

    def _detach(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._clip is not None:
            self._clip.detach()
            self._clip = None
        plan = self.remedies.get("treatment_plan")
        if isinstance(plan, TreatmentPlan):
            plan.detach()
        if self.doctor is not None:
            self.doctor.detach()

    def _on_record(self, record: IntervalRecord) -> None:
        self._last = record
        self._warner(record)
        scalars = record_scalars(record, self.metrics)
        self._detail.update(scalars.keys() - summary_scalars(record).keys())
        self._pending.update({**scalars, **health_scalars(record)})

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The Doctor's state (open windows summed across processes: call it on every
        process) and the remedies'."""
        if self.doctor is None:
            return {}
        return {
            "version": _STATE_VERSION,
            "doctor": self.doctor.state_dict(reduce=True),
            "remedies": {name: r.state_dict() for name, r in self.remedies.items()},
            "run_dir": self._saved_run_dir(),
            "warned": self._warner.state_dict(),
        }

    def _saved_run_dir(self) -> str | None:
        doc = self.doctor
        if doc is None or doc.run_dir is None:
            return None
        try:
            return str(doc.run_dir.resolve().relative_to(Path(self._output_dir).resolve()))
        except ValueError:
            return str(doc.run_dir.resolve())

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is None:
            return
        sd = self.state_dict()
        if state.is_world_process_zero:
            folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
            if folder.is_dir():
                torch.save(sd, folder / STATE_FILE)

    def _checkpoint_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        """The state saved with the checkpoint this training resumes from (global step > 0),
        or None for a fresh start."""
        if not state.global_step:
            return None
        path = Path(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not path.is_file():
            return None
        sd: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if sd.get("version") != _STATE_VERSION:
            raise ReluDoctorError(
                f"checkpoint: {str(path)!r} holds relu_doctor state version "
                f"{sd.get('version')!r}, expected {_STATE_VERSION}."
            )
        return sd



def _open_window(doc: Doctor) -> IntervalRecord | None:
    """The open window's record (:meth:`~relu_doctor.Doctor.current`), or None where it
    cannot be read (said: an evaluation's metrics then go without relu_doctor's)."""
    try:
        return doc.current()
    except Exception as e:
        warnings.warn(f"relu_doctor: the open window could not be read for the evaluation's "
                      f"metrics ({type(e).__name__}: {e}); they go without relu_doctor's.",
                      ReluDoctorWarning, stacklevel=user_stacklevel())
        return None


def _clips_at(args: Any) -> float:
    """The gradient norm the Trainer clips at (its ``max_grad_norm``; 1.0 by default), or 0
    where it does not clip (None, 0 or below: transformers clips only past 0)."""
    value = getattr(args, "max_grad_norm", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def _ends_at(state: Any, step: int) -> bool:
    """Whether the Trainer's training ends at optimizer step ``step`` (its ``max_steps``)."""
    return 0 < int(getattr(state, "max_steps", 0) or 0) <= int(step)
