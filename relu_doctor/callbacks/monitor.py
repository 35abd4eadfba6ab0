"""The Lightning monitor callback: a thin adapter from Trainer hooks to :class:`~relu_doctor.Doctor`.

All statistics, windows, diagnosis and the run directory live in the framework-free
:class:`~relu_doctor.Doctor`; this module only decides *when* (which Trainer hooks attach,
mark steps, read gradients, log) and *where* the results go (the Trainer's loggers,
rank-zero warnings).

Hook map:

==============================  ===============================================================
``on_fit_start``                build the Doctor on the LightningModule (optimizers, AMP scaler,
                                DDP reduction, run directory), restore checkpointed state, attach
``on_before_optimizer_step``    read parameter gradients (after AMP unscaling, before the
                                update). Lightning runs the backward inside
                                ``optimizer.step(closure)``, so the optimizer's own pre-hook
                                would see the previous step's gradients; with an fp16
                                GradScaler the closure runs first and the pre-hook (which
                                fires only for steps the scaler takes) is used instead
``on_train_batch_end``          mark one step per optimizer step (so ``accumulate_grad_batches=k``
                                gives one step per k batches); log at each interval
``on_validation_start/end``     nothing to pause: validation runs in eval mode without
                                gradients, which the probe leaves out of the training stream
                                (the Doctor's stream gating); with ``monitor_validation`` the
                                Doctor's evaluation stream collects it and is closed at
                                ``on_validation_end``; the sanity check runs ``paused()``
``on_train_end``                log the last, partial window
``on_fit_end``, ``teardown``,   detach every hook (also when training fails or is interrupted)
``on_exception``
==============================  ===============================================================
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from relu_doctor._validate import flag, glob_patterns, name_or_function, positive_int
from relu_doctor._validate import unit_dims as check_unit_dims
from relu_doctor.callbacks._remedy import RemedyCallback
from relu_doctor.callbacks.treatment import ReluDoctorTreatment
from relu_doctor.diagnosis import (
    REMEDY_NAMES,
    DiagnosisConfig,
    check_warn,
    diagnosis_config,
)
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError
from relu_doctor.history import IntervalRecord
from relu_doctor.integrations._common import FindingWarner
from relu_doctor.reports import tensorboard as tb
from relu_doctor.rundir import fresh_dir
from relu_doctor.runread import last_step, open_writer_state, read_meta
from relu_doctor.sampling import DEFAULT_BUDGET, check_rate

__all__ = ["ReluDoctor", "ReluDoctorWarning"]

_STATE_VERSION = 1
DEFAULT_DIR = "relu_doctor_logs"  # under default_root_dir, without a logger


def _patterns(name: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """Glob patterns as an immutable tuple (they are part of the state key), None for none."""
    return tuple(glob_patterns(name, value)) or None


class ReluDoctor(Callback):
    """Watch a LightningModule's ReLU-family activations during ``Trainer.fit``.

    Statistics are collected on the device by hooks and read once per logging interval;
    each interval's site metrics go to every logger of the Trainer (with a
    ``TensorBoardLogger``: scalars under ``relu_doctor/<metric>/<site>``, per-unit
    activation-rate histograms, a custom-scalars layout with every site of a metric in one
    chart, findings and interventions as text; with any other logger the scalars through
    ``log_metrics``). Nothing goes to the progress bar. Findings are raised once per
    (kind, site) as a rank-zero :class:`ReluDoctorWarning` with the suggested remedy. The
    run directory (``relu-doctor report RUN_DIR``) is written as training goes, by rank zero.

    Under DDP every rank collects its own batches; counts and sums are summed across ranks at
    logging time only, so the logged values equal those of one process seeing all the data.

    Args:
        log_every_n_steps: optimizer steps per logging interval (the window for "dead").
        every_n_steps: a fixed rate (collect every n-th optimizer step), or ``"auto"``
            (default): the rate ``overhead_budget`` chooses.
        overhead_budget: the largest fraction of a step the statistics may cost (default
            0.03, see :class:`~relu_doctor.Doctor`); None collects every step.
        tau: dormant threshold on the ReDo score, in (0, 1): a shortcut for
            ``config=DiagnosisConfig(tau=...)`` (default 0.1, DiagnosisConfig's).
        include: glob patterns of module paths to watch (paths inside the LightningModule,
            e.g. ``"net.*"``); default every ReLU-family module.
        exclude: glob patterns of module paths to leave out.
        run_dir: the run directory; default ``<trainer.log_dir>/relu_doctor`` (next to the
            logger's own files), or ``<default_root_dir>/relu_doctor_logs`` without a logger
            (``relu_doctor_logs_1``, ``_2``... when that holds an earlier run; a fit resumed
            from a checkpoint continues the directory of the run that saved it).
        gradients: collect gradient statistics (dL/d(output), zero dL/d(input)).
        monitor_validation: also collect validation batches, as a separate stream: scalars
            under ``relu_doctor_val/<metric>/<site>``, a run directory in
            ``<run_dir>/validation``, one window per validation run.
        unit_dims: ``{pattern: dim}`` overriding which dim holds the units.
        functional: capture functional activations (``F.relu`` inside a forward) too. None
            or True (default): on, as in :func:`relu_doctor.watch`; False: modules only. A
            model that runs no ReLU-family activation gets one rank-zero warning at the
            first training step and the callback steps aside (training goes on).
        config: diagnosis thresholds, ``tau`` included. Passing ``tau`` as well is an error
            unless the two agree.
        padding_mask: leave a padded batch's padding out of every statistic: the name of the
            keyword argument holding the mask (``"attention_mask"``) in the call of the
            outermost watched module, or a function of that call's ``(args, kwargs)``; see
            :class:`~relu_doctor.Doctor`. None (default): every position counts.
        metrics: site metrics logged as scalars; default
            :data:`relu_doctor.reports.tensorboard.DEFAULT_METRICS`.
        histograms: write per-unit activation-rate histograms to TensorBoard.
        warn: lowest finding severity raised as a warning (``"info"``, ``"warning"``,
            ``"critical"``), or None for no warnings.
        log_on_train_end: when training ends, close and log the last, partial window, so a
            run shorter than ``log_every_n_steps`` is still recorded.

    Attributes:
        doctor: the training :class:`~relu_doctor.Doctor` (None before the first fit). Remedy
            callbacks get each :class:`~relu_doctor.history.IntervalRecord` through
            ``doctor.add_listener(fn)`` and record what they do with
            ``doctor.record_event(...)``. It is created in this callback's
            ``on_fit_start``: look it up from ``on_train_start`` on.
        config: the :class:`~relu_doctor.DiagnosisConfig` in use (``tau`` included).
        val_doctor: the validation-stream Doctor (``monitor_validation=True``), else None.

    Example::

        from relu_doctor.callbacks import ReluDoctor

        trainer = L.Trainer(callbacks=[ReluDoctor(log_every_n_steps=50, run_dir="runs/exp1")])
        trainer.fit(model)
        print(trainer.callbacks[0].doctor.findings())
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        *,
        every_n_steps: int | Literal["auto"] = "auto",
        overhead_budget: float | None = DEFAULT_BUDGET,
        tau: float | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        gradients: bool = True,
        monitor_validation: bool = False,
        unit_dims: Mapping[str, int] | None = None,
        functional: bool | None = None,
        padding_mask: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
        config: DiagnosisConfig | None = None,
        metrics: Sequence[str] | None = None,
        histograms: bool = True,
        warn: str | None = "warning",
        log_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        self.log_every_n_steps = positive_int("log_every_n_steps", log_every_n_steps)
        self.every_n_steps, self.overhead_budget = check_rate(every_n_steps, overhead_budget)
        self.config = replace(diagnosis_config(tau, config), loop="lightning")  # its names
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise ReluDoctorError(
                f"run_dir: expected a path (str or os.PathLike) or None, got {run_dir!r}."
            )
        self.run_dir = run_dir
        self.gradients = flag("gradients", gradients)
        self.monitor_validation = flag("monitor_validation", monitor_validation)
        self.unit_dims = None if unit_dims is None else check_unit_dims("unit_dims", unit_dims)
        self.functional = None if functional is None else flag("functional", functional)
        self.padding_mask = name_or_function("padding_mask", padding_mask)
        self.metrics = tb.check_metrics(metrics)
        self.histograms = flag("histograms", histograms)
        self.warn = check_warn(warn)
        self.log_on_train_end = flag("log_on_train_end", log_on_train_end)

        self.doctor: Doctor | None = None
        self.val_doctor: Doctor | None = None
        self._trainer: pl.Trainer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._reads_grads_in_hook = True
        self._last_global_step = -1
        self._pause: Any = None  # the Doctor's paused() context, entered for a sanity check
        self._aside = False  # the model runs no activation: warned once, stepped aside
        # each finding once per (stream, kind, site), across fits; told the remedies at fit start
        self._warner = FindingWarner(self.warn, emit=_warn_on_rank_zero)  # picklable (spawn)
        self._own_writer: Any = None
        self._used_writers: dict[int, Any] = {}  # id -> writer that got our layout
        self._findings_text = tb.FindingsText()  # by (writer id, prefix)
        self._broken_writers: set[int] = set()  # ids of writers that failed: left out
        self._tb_warned: set[Any] = set()
        self._resolved_run_dir: Path | None = None
        self._capped = False  # a site with an upper cap was seen: chart saturation
        # callback_metrics keys that validation put there (val_loss...): not training metrics
        self._val_keys: set[str] = set()
        self._keys_before_val: set[str] | None = None
        self._failing = False  # in on_exception: no training metrics from the failed batch

    @property
    def tau(self) -> float:
        """The dormant threshold in use (``config.tau``)."""
        return self.config.tau

    # ------------------------------------------------------------------ checkpoint identity
    @property
    def state_key(self) -> str:
        """Tells instances apart by what they watch (patterns), not by how they report."""
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ fit lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._failing = False
        self._warner.on = _remedies_on(getattr(trainer, "callbacks", ()))
        self._detach_all()
        world = trainer.world_size
        all_reduce = (
            (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning runs the backward inside optimizer.step(closure) unless a GradScaler
        # drives the step (fp16): then the optimizer's pre-hook sees the unscaled gradients
        # of the steps actually taken. Otherwise read them in on_before_optimizer_step.
        self._reads_grads_in_hook = scaler is None
        state = self._pending_state
        if state is None and self.doctor is not None and self.doctor.model is pl_module:
            # A second fit of the same module continues where the first stopped.
            state = {"doctor": self.doctor.state_dict(), "val_doctor": None,
                     **self._default_dir_state()}
        self._pending_state = None
        if state and state.get("warned"):  # a resumed fit: not warned about again
            self._warner.load_state_dict(state["warned"])
        if self.run_dir is not None:
            run_dir = Path(self.run_dir)
        elif trainer.loggers:
            log_dir = trainer.log_dir  # a broadcast: every rank must ask
            run_dir = Path(log_dir or trainer.default_root_dir) / "relu_doctor"
            if state and state.get("doctor") and state.get("logger_run_dir"):
                run_dir = self._saved_run_dir(
                    trainer, Path(state["logger_run_dir"]), run_dir,
                    int(state["doctor"].get("global_step") or 0))
            elif not (state and state.get("doctor")):
                # a logger's folder that holds a run already (Lightning gave two jobs
                # launched at once one version_0: an operations trial's second fit raised
                # where it would have trained): this fit's record goes beside it
                free = Path(trainer.strategy.broadcast(str(fresh_dir(run_dir)), src=0))
                if free != run_dir:
                    _warn_on_rank_zero(
                        f"relu_doctor: {str(run_dir)!r} holds another run (another job given "
                        "the same logger folder, or an earlier fit of another module): this "
                        f"fit's record goes to {str(free)!r}.")
                run_dir = free
        else:
            # Not "<root>/relu_doctor": run from a source checkout, that is the package.
            # A checkpoint continues its own directory (an older one, without the name, the
            # unnumbered one); a new run takes the first free "_1", "_2"..., chosen on rank
            # zero for all (rank zero may have made the first one already when another looks).
            base = Path(trainer.default_root_dir) / DEFAULT_DIR
            if state and state.get("doctor"):
                run_dir = base.with_name(str(state.get("default_run_dir") or DEFAULT_DIR))
            else:
                run_dir = Path(trainer.strategy.broadcast(str(fresh_dir(base)), src=0))
        self._resolved_run_dir = run_dir
        writer = trainer.is_global_zero
        optimizers = [o for o in trainer.optimizers if isinstance(o, torch.optim.Optimizer)]
        if self.doctor is not None:
            self.doctor.close()  # one writer per run directory: the new one takes it over
        # Saved with reduce=True: rank 0 carries the windows summed over every rank.
        windows = world == 1 or trainer.global_rank == 0

        common: dict[str, Any] = {
            "include": self.include,
            "exclude": self.exclude,
            "unit_dims": self.unit_dims,
            # (its gradient findings advise no clipping beside the Trainer's own)
            "config": replace(self.config, clipped_by=(
                f"the Trainer's gradient_clip_val={trainer.gradient_clip_val}"
                if getattr(trainer, "gradient_clip_val", None) else None)),
            "all_reduce": all_reduce,
            "world_size": world,
            "is_writer": writer,
            "functional": self.functional,
            "padding_mask": self.padding_mask,
        }
        doctor = Doctor(
            pl_module,
            log_every_n_steps=self.log_every_n_steps,
            every_n_steps=self.every_n_steps,
            overhead_budget=self.overhead_budget,
            gradients=self.gradients,
            optimizer=optimizers or None,
            grad_scaler=scaler,
            run_dir=run_dir,
            # A checkpoint (or a second fit) continues its run directory after the
            # checkpoint's step; without one, a directory holding a run is refused.
            resume=bool(state and state.get("doctor")),
            optimizer_pre_hook=not self._reads_grads_in_hook,
            # validation passes (eval mode, no grad) as the Doctor's evaluation stream
            eval_stream="validation" if self.monitor_validation else False,
            tensorboard=False,  # the loggers (or _writers) get TensorBoard output
            **common,
        )
        doctor.resume_advice = (  # (said if run_dir holds a run and no checkpoint continues it)
            "continue it with trainer.fit(..., ckpt_path=...) from a checkpoint saved with this "
            "callback, or pass ReluDoctor a new run_dir (or none: a fresh relu_doctor_logs_N)")
        # The training curve of the report: what the LightningModule logged in training
        # (see _training_metrics), read at each logging step (the optimizers' learning rates
        # the Doctor reads itself).
        doctor.add_metric_source(lambda: self._training_metrics(trainer))
        if state and state.get("doctor"):
            doctor.load_state_dict(state["doctor"], windows=windows)
        doctor.add_listener(self._on_record)
        doctor.add_event_listener(self._on_event)
        self.doctor = doctor
        self.val_doctor = doctor.eval
        if self.val_doctor is not None:
            if state and state.get("val_doctor"):  # written before the stream was the Doctor's
                self.val_doctor.load_state_dict(state["val_doctor"], windows=windows)
            self.val_doctor.add_listener(self._on_val_record)
        self._aside = False
        doctor.attach()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the fit's last optimizer step, said ahead: its update ratio is read (Python ints)
        if (self.doctor is not None and not self._aside
                and _fit_ends_here(trainer, batch_idx, ahead=True)):
            self.doctor.expect_last_step()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.doctor is not None and self._reads_grads_in_hook:
            self.doctor.before_optimizer_step(optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.doctor is None or self._aside:
            return
        self._take_loss(trainer, pl_module, outputs)
        # One step per optimizer step: with gradient accumulation the global step moves once
        # every k batches. Python ints only: no host synchronisation between logging steps.
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        missing = self.doctor.missing_activations()
        if (missing is not None and self.doctor.all_reduce is None
                and not self.doctor.may_see_activations()):
            # warn once and step aside: training goes on (with several processes the
            # Doctor goes on instead, and says so: see Doctor.step)
            self._aside = True
            self._detach_all()
            rank_zero_warn(f"relu_doctor: {missing} The ReluDoctor callback steps aside.",
                           category=ReluDoctorWarning)
            return
        # logs through the listeners when an interval closes
        self.doctor.step(last=_fit_ends_here(trainer, batch_idx))

    def _take_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   outputs: Any) -> None:
        """Add the batch's loss to the window's (:attr:`Doctor.window_loss`, which the
        remedies' loss guard reads): what ``training_step`` returned (a device tensor, not
        read here), times the accumulation Lightning divided it by. What it logs
        (``train_loss``) reaches the record as one step's value, too noisy for the guard's
        2x bar."""
        try:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor) and loss.numel() == 1 and self.doctor is not None:
                k = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
                self.doctor.window_loss.add(loss * k if k != 1 else loss)
        except Exception:  # (an odd output: no loss taken, the guard off for it)
            return

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        doc = self.doctor
        if self.log_on_train_end and doc is not None and not self._aside:
            doc.log_final()  # final: remedies hold it, changing nothing after the last step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def _training_metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What the LightningModule logged in training, for the run's training curve: the
        training loop's own results where Lightning shows them (its logger connector's
        metrics for the loop running), else ``callback_metrics`` less the keys validation
        added there. Nothing from a batch that raised (``on_exception``)."""
        if self._failing:
            return {}
        found: dict[str, Any] = {}
        try:  # Lightning's internals, read-only: the training loop's results alone
            if trainer.training:
                found = dict(trainer._logger_connector.metrics["callback"])
        except Exception:
            found = {}
        if not found:  # (results reset at the fit's end, or another Lightning version):
            # callback_metrics less what validation logged there; a key both log is left
            # out, not guessed
            found = {k: v for k, v in trainer.callback_metrics.items() if k not in self._val_keys}
        return {k: v for k, v in found.items() if not str(k).startswith(tb.PREFIX)}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._failing = True  # the failed batch's self.log values are not a step's
        # The steps since the last log are logged, as at the end of training: nothing lost
        # when a fit dies. One process only: with several, the others may not be here, and
        # a collective would wait for them.
        doc = self.doctor
        if doc is not None and trainer.state.fn == "fit":  # (not a validate() or test() after)
            doc.note_exception(exception)
        if (self.log_on_train_end and doc is not None and not self._aside
                and doc.all_reduce is None):
            try:
                doc.log_final()
            except Exception as e:  # the fit's own error is the one raised
                rank_zero_warn(f"relu_doctor: the steps since the last log could not be "
                               f"logged after the fit's error ({e!r}).",
                               category=ReluDoctorWarning)
        self._finish()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish()

    def _detach_all(self) -> None:
        self._resume()
        if self.doctor is not None:
            self.doctor.detach()  # its evaluation stream too

    def _resume(self) -> None:
        pause, self._pause = self._pause, None
        if pause is not None:
            pause.__exit__(None, None, None)

    def _finish(self) -> None:
        self._detach_all()
        if self.doctor is not None:
            self.doctor.close()  # compacts the open segments, releases the run-dir lock
        last = self._findings_text.flush_last()
        for w in self._used_writers.values():
            if id(w) not in self._broken_writers:
                try:
                    for (wid, prefix), (step, findings) in last.items():
                        if wid == id(w):
                            w.add_text(f"{prefix}/findings", tb.findings_markdown(findings), step)
                    w.flush()
                except Exception as e:
                    self._tb_failed(getattr(w, "log_dir", None) or type(w).__name__, e)
        self._used_writers = {}
        self._findings_text = tb.FindingsText()
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    # ------------------------------------------------------------------ validation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keys_before_val = set(trainer.callback_metrics)
        # Validation runs in eval mode without gradients: the probe leaves it out of the
        # training stream by itself. The sanity check is left out of every stream.
        if self.doctor is not None and trainer.sanity_checking and self._pause is None:
            self._pause = self.doctor.paused()
            self._pause.__enter__()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._keys_before_val is not None:  # what this validation logged first
            self._val_keys |= set(trainer.callback_metrics) - self._keys_before_val
            self._keys_before_val = None
        self._resume()
        if self.doctor is not None and not trainer.sanity_checking and not self._aside:
            self.doctor.log_eval()  # one window per validation run, at its training step

    # ------------------------------------------------------------------ output
    def _writers(self, trainer: pl.Trainer) -> list[Any]:
        """TensorBoard writers (rank zero): every TensorBoardLogger's experiment, or else
        our own writer in the run directory (``tb.run_log_dir``) so it is complete."""
        tbs = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if tbs:
            writers = [lg.experiment for lg in tbs]
        else:
            if self._own_writer is None and self._resolved_run_dir is not None:
                self._own_writer = tb.open_writer(tb.run_log_dir(self._resolved_run_dir))
            writers = [self._own_writer] if self._own_writer is not None else []
        return writers

    def _to_writers(self, trainer: pl.Trainer, write: Callable[[Any], None]) -> None:
        """``write(w)`` then flush, for each TensorBoard writer. A writer that fails (a full
        disk under the user's TensorBoardLogger, a removed folder) warns once, naming it and
        the cause, and is left out from then on: training goes on, the run directory is
        still written."""
        try:
            writers = self._writers(trainer)
        except Exception as e:  # opening our own writer: never stop the training for a log
            writers = []
            self._tb_failed("(opening)", e)
        for w in writers:
            if id(w) in self._broken_writers:
                continue
            try:
                if id(w) not in self._used_writers:  # first use: the custom-scalars layout
                    tb.write_layout(w, self._layout())
                    self._used_writers[id(w)] = w
                write(w)
                w.flush()
            except Exception as e:
                self._broken_writers.add(id(w))
                self._tb_failed(getattr(w, "log_dir", None) or type(w).__name__, e)

    def _tb_failed(self, where: Any, e: Exception) -> None:
        if where in self._tb_warned:
            return
        self._tb_warned.add(where)
        tb.warn_stopped(where, e, stacklevel=3)  # rank zero only: _publish returns before

    def _layout(self) -> dict[str, Any]:
        prefixes = {tb.PREFIX: tb.PREFIX}
        if self.monitor_validation:
            prefixes[tb.VAL_PREFIX] = f"{tb.PREFIX} (validation)"
        return tb.custom_scalars_layout(self.metrics, prefixes=prefixes, capped=self._capped)

    def _publish(self, record: IntervalRecord, prefix: str) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        self._warn(record, prefix)
        if not trainer.is_global_zero:
            return
        self._capped = self._capped or tb.has_cap(record.site_rows)
        self._to_writers(trainer, lambda w: tb.write_record(
            w,
            record.step,
            sites=record.site_rows,
            units=record.unit_table,
            layers=record.layer_table,
            findings=self._findings_text.take((id(w), prefix), record),
            finding_events=record.finding_events,
            metrics=self.metrics,
            prefix=prefix,
            histograms=self.histograms,
            # The training curve (train/<name>) into our own event files only: under a
            # TensorBoardLogger, Lightning already logs what the module self.logs.
            training=getattr(record, "metrics", None) if w is self._own_writer else None,
        ))
        others = [lg for lg in trainer.loggers if not isinstance(lg, TensorBoardLogger)]
        if others:
            metrics = tb.scalars(
                record.site_rows, record.layer_table, metrics=self.metrics, prefix=prefix
            )
            for lg in others:
                lg.log_metrics(metrics, step=record.step)

    def _warn(self, record: IntervalRecord, prefix: str) -> None:
        self._warner(record, "validation" if prefix == tb.VAL_PREFIX else "")

    def _on_record(self, record: IntervalRecord) -> None:
        self._publish(record, tb.PREFIX)
        trainer = self._trainer
        if trainer is not None:
            # where EarlyStopping and ModelCheckpoint look: monitor="relu_doctor/health"
            # (higher is better) or "relu_doctor/dead_fraction"; the same on every rank
            health = record.health
            trainer.callback_metrics.update(
                {f"{tb.PREFIX}/{k}": torch.tensor(v) for k, v in health.items()}
            )

    def _on_val_record(self, record: IntervalRecord) -> None:
        self._publish(record, tb.VAL_PREFIX)

    def _on_event(self, event: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        self._to_writers(trainer, lambda w: tb.write_events(w, [event]))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counts and windows of every site, step counters, finding onsets (both streams).

        Under DDP each rank's open window is summed across ranks here (call it on every rank,
        as ``Trainer.save_checkpoint`` does); on resume rank zero carries the sums.
        """
        if self.doctor is None:
            return dict(self._pending_state) if self._pending_state else {}
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "doctor": self.doctor.state_dict(reduce=True),
            "val_doctor": None,  # the evaluation stream is inside the Doctor's state
            "warned": self._warner.state_dict(),
            **self._default_dir_state(),
        }
        return state

    def _default_dir_state(self) -> dict[str, str]:
        """The default run directory, which a resumed fit continues: without a logger its
        name (``relu_doctor_logs_2``; by name only, so a checkpoint moved with its
        ``default_root_dir`` works), beside a logger its whole path (a resumed fit's logger
        takes a new version directory)."""
        d = self._resolved_run_dir
        if self.run_dir is None and d is not None and d.name.startswith(DEFAULT_DIR):
            return {"default_run_dir": d.name}
        if self.run_dir is None and d is not None:
            return {"logger_run_dir": str(d.resolve())}
        return {}

    @staticmethod
    def _saved_run_dir(trainer: pl.Trainer, saved: Path, new: Path, step: int) -> Path:
        """The run directory of a fit resumed from a checkpoint of step ``step``, beside a
        logger (which gives the resumed fit a new version directory, ``new``'s parent): the
        one the checkpoint's run wrote (``saved``) where that run stopped early (an error,
        Ctrl-C, killed) or holds nothing after ``step``, so that one directory holds the
        whole run; else ``new``: a run that finished, a branch from one of its checkpoints
        must not replace its later records, and one still being written is not taken over.
        Said once either way; chosen on rank zero for all."""
        if saved == new.resolve():
            return new
        why = ""
        if trainer.is_global_zero:  # (the others take its answer: one reader, no hang)
            why = _why_not_continued(saved, step)
            rank_zero_warn(
                f"relu_doctor: the fit resumed from a checkpoint continues the run directory "
                f"{str(saved)!r} of the run that saved it (the logger's directory for this "
                f"fit is {str(new.parent)!r}), so that one run directory holds the whole run."
                if not why else
                f"relu_doctor: the run directory of the run that saved the checkpoint, "
                f"{str(saved)!r}, {why}: this fit's records go to {str(new)!r} from step "
                f"{step} on (pass ReluDoctor(run_dir=...) to choose it, that directory to "
                "continue it).",
                category=ReluDoctorWarning,
            )
        return Path(trainer.strategy.broadcast(str(new if why else saved), src=0))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the next fit starts."""
        if not state_dict:
            return
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ReluDoctorError(
                f"checkpoint: ReluDoctor state version {version!r} is not supported (expected "
                f"{_STATE_VERSION}); resume with the relu_doctor version that wrote it."
            )
        self._pending_state = dict(state_dict)


def _why_not_continued(saved: Path, step: int) -> str:
    """Why a fit resumed from a checkpoint of step ``step`` does not continue ``saved``, the
    run directory of the run that saved it (see ``ReluDoctor._saved_run_dir``), or ""."""
    try:
        if not saved.is_dir():
            return "is not here (a checkpoint moved to another machine?)"
        writer = open_writer_state(saved)
        if writer.writing:
            return f"is still being written, or was left by another machine ({writer.why})"
        try:
            stopped = bool(read_meta(saved).get("ended_by")) or bool(writer.why)
            after = (last_step(saved) or 0) > step
        except RunDirError as e:
            return f"cannot be read ({e})" if not writer.why else ""
    except OSError as e:
        return f"cannot be read ({e})"
    if after and not stopped:
        return (f"holds that run, which went on past step {step} and finished: this fit, a "
                "branch from its checkpoint, keeps its records apart")
    return ""


def _warn_on_rank_zero(text: str) -> None:
    rank_zero_warn(text, category=ReluDoctorWarning)


def _remedies_on(callbacks: Sequence[Any]) -> dict[str, Callable[[str], bool] | None]:
    """The remedy callbacks of a fit, as the findings' remedy texts name them
    (``"LeakyReluSwap"``...), each with its :meth:`~RemedyCallback.acts_at`, or
    ``{"plan": None}`` with a ReluDoctorTreatment: a finding's remedy text then says the
    remedy is on (see :class:`FindingWarner`)."""
    if any(isinstance(c, ReluDoctorTreatment) for c in callbacks):
        return {"plan": None}
    names = {n for n in REMEDY_NAMES["lightning"].values() if n}
    by_name: dict[str, list[RemedyCallback[Any]]] = {}
    for c in callbacks:
        if isinstance(c, RemedyCallback):  # a subclass goes by the remedy it specialises
            for name in [k.__name__ for k in type(c).__mro__ if k.__name__ in names][:1]:
                by_name.setdefault(name, []).append(c)
    return {name: functools.partial(_any_acts_at, tuple(cs)) for name, cs in by_name.items()}


def _any_acts_at(callbacks: tuple[RemedyCallback[Any], ...], site: str) -> bool:
    return any(c.acts_at(site) for c in callbacks)


def _fit_ends_here(trainer: pl.Trainer, batch_idx: int, *, ahead: bool = False) -> bool:
    """Whether the fit stops after the optimizer step of batch ``batch_idx`` (read at its
    end; ``ahead``: as it begins, before the step moves the global step), by Lightning's
    own stopping rules read now (so a data loader reloaded with another length, or a run
    resumed with another batch size, is read right): ``max_steps`` reached, or the last
    batch of the last epoch (``num_training_batches``, with the limits applied; the fetcher's
    look-ahead for an iterable of unknown length). Unknown stops (early stopping,
    ``max_time``) are not foreseen: the end of training logs what is left."""
    if trainer.max_steps != -1 and trainer.global_step + ahead >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs == -1 or trainer.current_epoch + 1 < max_epochs:
        return False
    if batch_idx + 1 == trainer.num_training_batches:
        return True
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))
