"""The standalone API: :func:`watch` a model in any PyTorch loop.

:class:`Doctor` wires the parts together and holds no maths of its own. Per step it only
marks the step boundary; at each logging interval the data goes one way: the probe's
on-device sums (:mod:`~relu_doctor.stats`) are summed across processes and read back in one
transfer (the one host synchronisation), turned into metrics (:mod:`~relu_doctor.metrics`),
diagnosed (:mod:`~relu_doctor.diagnosis`), recorded and written
(:mod:`~relu_doctor.history`), and handed to its listeners (the Lightning callback,
remedies).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from relu_doctor._validate import optimizers as optimizers_arg
from relu_doctor._validate import positive_int
from relu_doctor._version import __version__
from relu_doctor.diagnosis import DiagnosisConfig, Finding, diagnose, diagnosis_config
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError
from relu_doctor.events import Event, FindingEvent
from relu_doctor.history import (
    FORMAT_VERSION,
    FindingTracker,
    IntervalRecord,
    LogRecord,
    Run,
    event_dict,
)
from relu_doctor.metrics import UNIT_COLUMNS, layer_metrics, stacked_metrics
from relu_doctor.optimizer_tap import OptimizerTap
from relu_doctor.probes import Probe
from relu_doctor.rundir import RunWriter, load_run, read_table
from relu_doctor.sampling import Sampler
from relu_doctor.sites import Site, SiteKey
from relu_doctor.stats import ROW, read_back, reduce_sum, stats_seconds

__all__ = ["Doctor", "IntervalRecord", "LogRecord", "watch"]

Listener = Callable[[IntervalRecord], None]

GRAD_NORM_WINDOW = 1024  # total gradient norms kept for the spike test (the latest logs)
KEEP_EVENTS = 10_000  # events kept in memory (all of them reach the run directory)


def _versions() -> dict[str, str]:
    return {
        "relu_doctor": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }


class Doctor:
    """Watches a model's ReLU-family activations. Create it with :func:`watch`.

    Args:
        model: the model.
        log_every_n_steps: steps per logging interval (the default window for "dead").
        every_n_steps: collect statistics on every n-th step only (1 = every step), a fixed
            rate; ``"auto"`` (the default): the rate ``overhead_budget`` chooses.
        overhead_budget: the largest fraction of a training step the statistics may cost
            (``relu_doctor.sampling.DEFAULT_BUDGET`` = 0.03 is the intended default):
            relu_doctor times itself on the host clock and collects every n-th step with n
            chosen to stay under it (see :mod:`relu_doctor.sampling`); None (for now the
            default) collects every step. Each record states ``steps_collected`` out of
            ``steps_run``.
        tau: dormant threshold on the ReDo score, in (0, 1): a shortcut for
            ``config=DiagnosisConfig(tau=...)`` (default 0.1). Giving both ``tau`` and a
            ``config`` whose ``tau`` differs is an error.
        include: glob patterns of module paths to watch (default: every activation).
        exclude: glob patterns of module paths to leave out.
        unit_dims: ``{pattern: dim}`` overriding which dim holds the units.
        gradients: collect gradient statistics too.
        optimizer: optimizer(s) whose step hooks give per-layer gradient norms and
            update-to-weight ratios.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is divided out of the gradient
            statistics (fp16 AMP); not needed for bf16.
        run_dir: write a run directory here as training goes, TensorBoard event files
            (``<run_dir>/tensorboard``) included.
        tensorboard: with ``run_dir``, also write TensorBoard event files there (pass False
            when something else writes them, as the Lightning callback does).
        config: diagnosis thresholds, ``tau`` included.
        all_reduce: sums a flat tensor across processes (DDP); None for one process.
        world_size: number of processes whose gradients are averaged (DDP). Each process's
            dL/d(output) is divided by it, so gradient statistics are those of the objective
            actually optimised (the mean of the processes' losses), as one process seeing all
            the data would record them.
        is_writer: whether this process writes files (rank zero).
        functional: also capture functional activations called inside the model's modules
            (``F.relu``, ``torch.relu_``, ``x.relu()``, ``F.gelu`` ... in a ``forward``;
            sites ``<module path>:relu#k``). None or True (the default): on; False: modules
            only. A model that runs no ReLU-family activation at all is a
            :class:`~relu_doctor.ReluDoctorError` at the first :meth:`step` after a forward
            pass showed it. It costs about 0.1 ms per collecting step on the benchmark models
            (well under 1%).
        eval_stream: also collect the forward passes that are not training (the model in
            eval mode, or gradients disabled) as a separate evaluation stream: ``doc.eval``,
            a :class:`Doctor` of its own (its window is closed at each training log, or by
            :meth:`log_eval`), written to ``<run_dir>/eval``. A string names the stream's
            subdirectory instead (the Lightning callback's is ``"validation"``). By default
            (False) those passes are left out.
        stream: which forward passes this Doctor records: ``"train"`` (default; the root
            model in training mode with gradients enabled), ``"eval"`` (the others) or
            ``"all"`` (what :func:`~relu_doctor.scan` uses).
        keep_records: how many of the latest :class:`~relu_doctor.history.IntervalRecord`
            are kept in memory (``doc.records``; without a run directory also
            ``doc.history()`` and ``doc.to_run()``); memory stays bounded however long the
            run. With ``run_dir``, everything logged is read back from the directory.
        resume: continue the run already in ``run_dir`` after its last logged step (else a
            directory holding a run is refused, so two runs never mix).
        optimizer_pre_hook: read parameter gradients in the optimizer's step pre-hook. Pass
            False when the backward runs inside ``optimizer.step(closure)`` (Lightning's
            automatic optimisation, LBFGS), and call :meth:`before_optimizer_step` once the
            gradients are final.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every_n_steps: int = 50,
        every_n_steps: int | Literal["auto"] = "auto",
        overhead_budget: float | None = None,
        tau: float | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        unit_dims: Mapping[str, int] | None = None,
        gradients: bool = True,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        grad_scaler: Any = None,
        run_dir: str | os.PathLike[str] | None = None,
        config: DiagnosisConfig | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world_size: int = 1,
        is_writer: bool = True,
        functional: bool | None = None,
        optimizer_pre_hook: bool = True,
        tensorboard: bool = True,
        keep_records: int = 16,
        resume: bool = False,
        eval_stream: bool | str = False,
        stream: str = "train",
    ) -> None:
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise ReluDoctorError(
                f"run_dir: expected a path (str or os.PathLike) or None, got {run_dir!r}."
            )
        self.log_every_n_steps = positive_int("log_every_n_steps", log_every_n_steps)
        self.sampler = Sampler(
            every_n_steps=(
                None if every_n_steps == "auto" else positive_int("every_n_steps", every_n_steps)
            ),
            overhead_budget=overhead_budget,
            max_every=self.log_every_n_steps,
        )
        self.every_n_steps = self.sampler.every_n_steps or 1
        self.overhead_budget = self.sampler.overhead_budget
        self.steps_run = 0  # steps in the open window, collecting or not
        self._clock_mark = stats_seconds()
        self.config = diagnosis_config(tau, config)
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise ReluDoctorError(
                f"grad_scaler: expected a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        self.grad_scaler = grad_scaler
        self.world_size = positive_int("world_size", world_size)
        self.probe = Probe(
            model,
            include=include,
            exclude=exclude,
            unit_dims=unit_dims,
            gradients=gradients,
            grad_scale=(
                self._current_scale if (grad_scaler is not None or self.world_size > 1) else None
            ),
            require_modules=False,  # no activation at all: an error at the first step()
            stream=stream,
        )
        self.model = model
        self.functional = functional is not False
        self._has_sites = False
        self.eval: Doctor | None = None
        self._eval_name: str | None = _eval_name(eval_stream)
        self._eval_passes = 0  # eval passes already logged
        if self._eval_name is not None:
            self.eval = Doctor(
                model, log_every_n_steps=log_every_n_steps, every_n_steps=1,  # every eval pass
                include=include, exclude=exclude,
                unit_dims=unit_dims, gradients=False, config=self.config,
                run_dir=None if run_dir is None else Path(run_dir) / self._eval_name,
                all_reduce=all_reduce, world_size=world_size, is_writer=is_writer,
                functional=functional, tensorboard=tensorboard, keep_records=keep_records,
                resume=resume, stream="eval",
            )
        opts: list[torch.optim.Optimizer] = optimizers_arg("optimizer", optimizer)
        self.tap: OptimizerTap | None = (
            OptimizerTap(
                model,
                opts,
                is_log_step=self._next_is_log_step,
                collecting=self._collecting,
                pre_hook=optimizer_pre_hook,
            )
            if opts
            else None
        )
        self.all_reduce = all_reduce
        self.is_writer = is_writer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._writer: RunWriter | None = None
        self.resume = bool(resume)
        self._wrote_run_dir = False  # a writer was opened: the run directory holds the record
        self._write_error: str | None = None  # the first write failure, warned once
        self._unfolded = False  # site windows logged by a final log, not yet folded
        self._unwritten: list[list[int]] = []  # [first, last] steps that did not reach disk
        self.tensorboard = bool(tensorboard)
        self._tb: Any = None
        self._optimizers = opts
        # Training metrics of the open window: name -> [device sum or None, host sum, count].
        self._metric_acc: dict[str, list[Any]] = {}
        self._metric_sources: list[Callable[[], Mapping[str, Any]]] = []
        self._exited = False
        self.expects_steps = False  # watch() sets it: a block without step() then warns
        self.global_step = 0
        self.window_steps = 0
        self.keep_records = positive_int("keep_records", keep_records)
        self._records: deque[IntervalRecord] = deque(maxlen=self.keep_records)
        self._records_dropped = 0
        self._events: deque[dict[str, Any]] = deque(maxlen=KEEP_EVENTS)
        self._tracker = FindingTracker()
        self._grad_norm_history: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
        self._first_rms: dict[str, float] = {}  # each site's activation RMS at its first log
        self._listeners: list[Listener] = []
        self._event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._capture: Any = None
        self._meta_dirty = True
        self.probe.on_new_site(self._mark_meta_dirty)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Doctor:
        """Register every hook (idempotent)."""
        if self.probe.attached:
            return self
        self._fold_logged_windows()
        self.probe.attach()
        try:
            if self.tap is not None:
                self.tap.attach()
            if self.functional:
                from relu_doctor.functional import FunctionalCapture

                self._capture = FunctionalCapture(self.probe).attach()
            if self.is_writer and self.run_dir is not None and self._writer is None:
                try:
                    self._open_writer()
                except PermissionError as e:
                    raise RunDirError(
                        f"run_dir: cannot write to {str(self.run_dir)!r} ({e.strerror}); "
                        "pass a directory you can write to."
                    ) from None
                except OSError as e:  # disk full...: train on, retry at the next log
                    self._write_failed(e)
                if self.tensorboard and self._tb is None:
                    from relu_doctor.reports.tensorboard import RunTensorBoard

                    self._tb = RunTensorBoard(self.run_dir / "tensorboard")
                    self.add_listener(self._tb.write_record)
                    self.add_event_listener(self._tb.write_event)
            if self.eval is not None:
                self.eval.attach()
        except BaseException:
            self.detach()
            raise
        self.probe.collecting = self._collecting()
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent); the model is left exactly as it was."""
        if self._tb is not None:
            self._tb.flush()
        if self._capture is not None:
            self._capture.detach()
            self._capture = None
        if self.tap is not None:
            self.tap.detach()
        self.probe.detach()
        if self.eval is not None:
            self.eval.detach()

    def _fold_logged_windows(self) -> None:
        """Fold the windows of a final log (see :meth:`log`) into the lifetime counts."""
        if not self._unfolded:
            return
        self._unfolded = False
        sites = self.probe.sites()
        windows = self.reduce_sum([s.stats.window for s in sites]) if sites else []
        for s, w in zip(sites, windows, strict=True):
            s.stats.close_window(w)
        self.window_steps = 0

    def _open_writer(self) -> None:
        assert self.run_dir is not None
        writer = RunWriter(self.run_dir, resume=self.resume or self._wrote_run_dir)
        self._writer, self._wrote_run_dir = writer, True
        if writer.last_step is not None:
            if self.global_step == 0:  # resume=True without a checkpoint: go on after it
                self.global_step = writer.last_step
                self.probe.collecting = self._collecting()
            else:
                self._continue_after_checkpoint()
        self._write_meta()

    def _continue_after_checkpoint(self) -> None:
        """Drop what the run directory holds after the restored step (logged after the
        checkpoint, or a partial log of the window the checkpoint keeps open, which is
        logged again when it closes): the resumed run's record equals an uninterrupted one."""
        writer = self._writer
        keep = self.global_step - (1 if self.window_steps > 0 else 0)
        if writer is None or writer.last_step is None or writer.last_step <= keep:
            return
        try:
            writer.truncate_after(keep)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, error: BaseException) -> None:
        """Warn once (cause and path); the writer is dropped and re-opened at a later log."""
        if self._write_error is None:
            self._write_error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"relu_doctor: cannot write the run directory {str(self.run_dir)!r} "
                f"({self._write_error}); training goes on, statistics keep accumulating, and "
                "writing is retried at each later log (the report says which steps are "
                "missing).",
                ReluDoctorWarning,
                stacklevel=3,
            )
        writer = self._writer
        if writer is not None:
            writer.abandon()  # the lock is kept: the next log retries with it

    def _save_status(self) -> None:
        """Record the unwritten steps in place (``status.json``; works on a full disk)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # nothing more can be written; warned
                self._writer.write_status({"unwritten": self._unwritten, "error": self._write_error})

    def _note_unwritten(self, step: int) -> None:
        if self._unwritten and self._unwritten[-1][1] >= step - self.log_every_n_steps:
            self._unwritten[-1][1] = step
        elif len(self._unwritten) < 100:
            self._unwritten.append([step, step])
        else:
            self._unwritten[-1][1] = step
        self._meta_dirty = True

    def _write_record(self, record: IntervalRecord, events: list[dict[str, Any]]) -> None:
        """Write one log to the run directory; a failure never reaches training."""
        if not (self.is_writer and self.run_dir is not None):
            return
        try:
            if self._writer is None:
                self._open_writer()
            writer = self._writer
            assert writer is not None
            if self._meta_dirty:
                self._write_meta()
            writer.append_table("history", record.step, pd.DataFrame(record.site_rows))
            writer.append_table("units", record.step, record.unit_table)
            writer.append_table("layers", record.step, record.layer_table)
            writer.append_table("metrics", record.step, _metrics_frame(record))
            writer.write_findings(record.findings)
            writer.append_events(events)
        except Exception as e:  # disk full, permissions, a removed directory...
            self._note_unwritten(record.step)
            self._write_failed(e)
            self._save_status()

    def close(self) -> None:
        """Close the run directory (its open segments are compacted, its lock released).
        Reading it back (``history()``, ``to_run()``) still works. Idempotent."""
        if self.eval is not None:
            self.eval.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                if self._meta_dirty:
                    writer.write_meta(self._meta())
                writer.close()
            except Exception as e:
                self._write_failed(e)

    def __enter__(self) -> Doctor:
        self._exited = False
        return self.attach()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.window_steps > 0 and self.probe.attached and not self._unfolded:
            try:  # the last, partial window is logged on every exit, an exception's too
                self.log(final=True)
            except Exception as e:
                warnings.warn(
                    f"relu_doctor: the last partial window (steps after "
                    f"{self.global_step - self.window_steps}) could not be logged: "
                    f"{type(e).__name__}: {e}",
                    ReluDoctorWarning,
                    stacklevel=2,
                )
        if self.eval is not None and self.probe.attached:
            try:  # the evaluation window too
                self.log_eval()
            except Exception as e:
                warnings.warn(
                    f"relu_doctor: the last evaluation window could not be logged: "
                    f"{type(e).__name__}: {e}",
                    ReluDoctorWarning,
                    stacklevel=2,
                )
        self.detach()
        self.close()
        self._exited = True
        if self.expects_steps and exc_type is None and self.global_step == 0 and not self._records:
            warnings.warn(
                "relu_doctor: the watch block ended without a call to doc.step(), so nothing "
                "was logged. Call doc.step() once per optimizer step inside the block.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ per step
    def _stats_clock(self) -> float:
        """Seconds spent in statistics calls since the last call (host clock, no sync)."""
        now = stats_seconds()
        spent, self._clock_mark = now - self._clock_mark, now
        return spent

    def _collecting(self) -> bool:
        return self.sampler.collect(self.global_step)

    def _next_is_log_step(self) -> bool:
        return (self.global_step + 1) % self.log_every_n_steps == 0

    def _current_scale(self) -> torch.Tensor | float | None:
        sc = self.grad_scaler
        scale = None
        if sc is not None and sc.is_enabled():
            scale = getattr(sc, "_scale", None)  # the device tensor: reading it does not sync
        if self.world_size > 1:
            return self.world_size if scale is None else scale * self.world_size
        return scale

    def step(self, loss: torch.Tensor | float | None = None) -> IntervalRecord | None:
        """Mark the end of one training step (one optimizer step).

        Args:
            loss: this step's loss (a tensor stays on its device: it is summed there and
                read once, at the logging step); its mean over the window is the record's
                ``loss`` metric.

        Returns the :class:`~relu_doctor.history.IntervalRecord` when this step closed a logging interval, else None.
        No host synchronisation happens unless it logs.

        Raises:
            ReluDoctorError: called after the ``with watch(...)`` block ended.
        """
        if self._exited:
            raise ReluDoctorError(
                "step: called after the `with relu_doctor.watch(...)` block ended; its hooks "
                "are removed. Call doc.step() inside the block (indent the training loop)."
            )
        if not self._has_sites:
            missing = self.missing_activations()
            if missing is not None:
                raise ReluDoctorError(missing)
        if loss is not None:
            self.log_metrics({"loss": loss})
        if self.probe.collecting:
            self.window_steps += 1
        self.sampler.done(collected=self.probe.collecting, hook_s=self._stats_clock())
        self.steps_run += 1
        self.global_step += 1
        record = None
        if self.global_step % self.log_every_n_steps == 0:
            record = self.log()
        self.probe.collecting = self._collecting()
        return record

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Read ``optimizer``'s parameter gradients now (after backward and AMP unscaling,
        before the update). Only needed with ``optimizer_pre_hook=False``; no host sync."""
        if self.tap is not None and self.probe.attached:
            self.tap.before_step(optimizer)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after each logging interval."""
        self._listeners.append(fn)

    def log_metrics(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Add training metrics (accuracy, a loss term...) to the open logging window; each
        is recorded as its mean over the window (the run's ``metrics`` table, the report's
        training curve). Tensors stay on their device until the logging step: no host
        synchronisation.

        Args:
            metrics: ``{name: value}``, each value a number or a one-element tensor.
        """
        if not isinstance(metrics, Mapping):
            raise ReluDoctorError(
                f"metrics: expected a mapping {{name: value}}, got {type(metrics).__name__}."
            )
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ReluDoctorError(f"metrics: names must be non-empty strings, got {name!r}.")
            acc = self._metric_acc.setdefault(name, [None, 0.0, 0])
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ReluDoctorError(
                        f"metrics: {name!r} must be a number or a one-element tensor, got "
                        f"a tensor of shape {tuple(value.shape)}."
                    )
                v = value.detach().reshape(()).float()
                acc[0] = v if acc[0] is None else acc[0] + v.to(acc[0].device)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                acc[1] += float(value)
            else:
                raise ReluDoctorError(
                    f"metrics: {name!r} must be a number or a one-element tensor, got "
                    f"{type(value).__name__}."
                )
            acc[2] += 1

    def add_metric_source(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        """Call ``fn()`` at each logging step for more training metrics ``{name: value}``
        (the Lightning callback passes ``trainer.callback_metrics``)."""
        self._metric_sources.append(fn)

    def _read_metrics(self) -> dict[str, float]:
        """The open window's training metrics (one host read), learning rates and the
        sources' values; the window's sums are cleared. Local to this process."""
        acc, self._metric_acc = self._metric_acc, {}
        out: dict[str, float] = {}
        if acc:
            dev = next((a[0].device for a in acc.values() if a[0] is not None), None)
            zero = torch.zeros((), device=dev)
            sums = torch.stack([a[0].to(zero.device) if a[0] is not None else zero for a in acc.values()])
            for (name, a), s in zip(acc.items(), sums.tolist(), strict=True):
                out[name] = (s + a[1]) / a[2]
        groups = [(i, j, g) for i, o in enumerate(self._optimizers) for j, g in enumerate(o.param_groups)]
        for i, j, g in groups:
            name = "lr" if len(groups) == 1 else f"lr/{i}.{j}" if len(self._optimizers) > 1 else f"lr/{j}"
            out[name] = float(g["lr"])
        for fn in self._metric_sources:
            for name, value in fn().items():
                try:
                    out.setdefault(str(name), float(value))
                except (TypeError, ValueError, RuntimeError):
                    continue
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def add_event_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(event)`` for each event passed to :meth:`record_event`."""
        self._event_listeners.append(fn)

    # ------------------------------------------------------------------ reading
    def _mark_meta_dirty(self) -> None:
        self._meta_dirty = True

    def reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed across processes in one collective call (``all_reduce``); the
        same tensors where there is one process. The one cross-process sum of the library."""
        if self.all_reduce is None:
            return list(tensors)
        return reduce_sum(tensors, self.all_reduce)

    def _read(
        self, close: bool, *, final: bool = False
    ) -> tuple[IntervalRecord, list[FindingEvent]] | None:
        """Sum, read back, derive, diagnose: the record of the open window (closing it when
        ``close``; ``final``: logged as closed, its site windows folded at the next attach)."""
        sites = self.probe.sites()
        if not sites:
            return None
        windows = [s.stats.window for s in sites]
        logged = close or final
        grad_sq, layer_steps, ratio = (
            self.tap.read_and_reset() if (logged and self.tap is not None) else (None, 0, None)
        )
        extra = [] if grad_sq is None else [grad_sq]
        world = 1
        if self.all_reduce is not None:
            ones = torch.ones(1, dtype=torch.float64, device=windows[0].device)
            reduced = self.reduce_sum(windows + extra + [ones])
            windows, extra = reduced[: len(sites)], reduced[len(sites) : -1]
            world = round(float(reduced[-1]))
        host = read_back(
            windows
            + [s.stats.lifetime for s in sites]
            + extra
            + ([ratio] if ratio is not None and extra else [])
        )
        if close:
            for s, w in zip(sites, windows, strict=True):
                s.stats.close_window(w)
        n = len(sites)
        host_windows, host_life = host[:n], host[n : 2 * n]
        layer_rows: list[dict[str, Any]] = []
        if extra and self.tap is not None:
            rows, total = layer_metrics(
                self.tap.layers, host[2 * n], layer_steps, world,
                host[2 * n + 1] if ratio is not None else None,
            )
            layer_rows = [{"step": self.global_step, **r} for r in rows]
            if logged:
                self._grad_norm_history.append(total)  # bounded: the latest logs only
        site_rows: list[dict[str, Any]] = []
        units: dict[str, dict[str, torch.Tensor]] = {}
        # Every site at once: one tensor op per metric, not a loop of them per site.
        unit_list, metric_rows = stacked_metrics(
            host_windows,
            [life + w for life, w in zip(host_life, host_windows, strict=True)],  # before the fold
            self.config.tau,
        )
        for s, u, sm in zip(sites, unit_list, metric_rows, strict=True):
            site_rows.append(
                {
                    "step": self.global_step,
                    "site": s.name,
                    "family": s.family.name,
                    "leaky": s.family.leaky,
                    "cap": s.cap,
                    "order": s.order,
                    "unit_dim": s.unit_dim,
                    "unit_rule": s.unit_rule,
                    "window_steps": self.window_steps,
                    "steps_collected": self.window_steps,
                    "steps_run": self.steps_run,
                    **sm,
                }
            )
            units[s.name] = u
        unit_table = pd.DataFrame(
            {
                "step": self.global_step,
                "site": np.repeat(
                    np.array([s.name for s in sites], dtype=object), [s.units for s in sites]
                ),
                "unit": np.concatenate([np.arange(s.units) for s in sites]),
                **{c: torch.cat([u[c] for u in unit_list]).numpy() for c in UNIT_COLUMNS},
            }
        )
        findings = diagnose(
            site_rows, units, self.config, step=self.global_step,
            param_grad_norms=self._grad_norm_history, first_rms=self._first_rms,
        )
        if logged:
            for r in site_rows:
                rms = float(r.get("rms", math.nan))
                if math.isfinite(rms) and rms > 0:
                    self._first_rms.setdefault(str(r["site"]), rms)
        findings, new, events = self._tracker.update(findings, self.global_step, commit=logged)
        record = IntervalRecord(
            step=self.global_step,
            site_rows=site_rows,
            unit_table=unit_table,
            layer_table=pd.DataFrame(layer_rows),
            findings=findings,
            new_findings=new,
            keys={s.name: s.key for s in sites},
        )
        return record, events

    def log(self, *, final: bool = False) -> IntervalRecord | None:
        """Close the current window now: read, diagnose, record, write, notify listeners.

        Args:
            final: the last log of a ``with`` block: the sites' windows stay readable
                (``doc.units(...)`` after the block) and are folded into the lifetime
                counts if the Doctor is attached again.
        """
        read = self._read(close=not final, final=final)
        self._unfolded = final and read is not None
        if not self._unfolded:
            self.window_steps = 0
            self.steps_run = 0
        if read is None:
            return None
        record, finding_events = read
        record.metrics = self._read_metrics()
        if len(self._records) == self.keep_records:
            self._records_dropped += 1
        self._records.append(record)
        events = [e.to_dict() for e in finding_events]
        self._events.extend(events)
        self._write_record(record, events)
        for fn in self._listeners:
            fn(record)
        if self.eval is not None and self.eval.probe.passes > self._eval_passes:
            self.log_eval()  # the evaluation window closes with the training one
        return record

    def log_eval(self) -> IntervalRecord | None:
        """Close the evaluation stream's window now (``eval_stream``), logged at this
        training step; its ``window_steps`` is the number of evaluation passes it holds.
        None without an evaluation stream or when the window is empty."""
        ev = self.eval
        if ev is None or ev.probe.passes == self._eval_passes:
            return None
        ev.global_step = self.global_step
        ev.window_steps = ev.steps_run = ev.probe.passes - self._eval_passes
        self._eval_passes = ev.probe.passes
        return ev.log()

    @contextlib.contextmanager
    def paused(self) -> Iterator[Doctor]:
        """Leave out every forward pass run inside the block, from both streams.

        Evaluation passes (eval mode, no grad) are left out of the training stream without
        it; use this for anything else (a probe pass, a metric computed in training mode).

        Example:
            >>> import torch, torch.nn as nn, relu_doctor
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            >>> with relu_doctor.watch(net) as doc:
            ...     with doc.paused():
            ...         _ = net(torch.randn(2, 4))
            >>> doc.sites
            []
        """
        probes = [self.probe] + ([self.eval.probe] if self.eval is not None else [])
        before = [p.paused for p in probes]
        for p in probes:
            p.paused = True
        try:
            yield self
        finally:
            for p, was in zip(probes, before, strict=True):
                p.paused = was

    def missing_activations(self) -> str | None:
        """Why there is nothing to watch, once a recorded forward pass ran no ReLU-family
        activation (or the model can show none); None otherwise. Python only (no sync)."""
        if self._has_sites or self.probe.sites():
            self._has_sites = True
            return None
        return self.probe.missing_activations(functional=self.functional)

    def record_event(self, event: Event | Mapping[str, Any]) -> None:
        """Record an event (an :class:`~relu_doctor.events.Intervention` or its result) in
        memory and in the run directory, and tell the event listeners (its dict form)."""
        ev = {"step": self.global_step, **event_dict(event)}
        self._events.append(ev)
        if self._writer is not None:
            try:
                self._writer.append_events([ev])
            except OSError as e:
                self._write_failed(e)
        for fn in self._event_listeners:
            fn(ev)

    def _meta(self) -> dict[str, Any]:
        return {
            "versions": _versions(),
            "model": type(self.model).__name__,
            "device": str(next(iter(self.model.parameters()), torch.empty(0)).device),
            "sites": [s.describe() for s in self.probe.sites()],
            "unwritten": [list(r) for r in self._unwritten],
            "stream": self.probe.stream,
            "eval_stream": self._eval_name,
            "config": {
                "log_every_n_steps": self.log_every_n_steps,
                "every_n_steps": self.every_n_steps,
                "overhead_budget": self.overhead_budget,
                **self.config.__dict__,
            },
        }

    def _write_meta(self) -> None:
        if self._writer is not None:
            self._writer.write_meta(self._meta())
            self._meta_dirty = False

    def current(self) -> IntervalRecord | None:
        """The current window's record without closing it, or the last logged one when the
        current window is empty. Reads device tensors (a host sync): call it off the hot path."""
        sites = self.probe.sites()
        # A window counts as non-empty when it saw finite elements or non-finite steps (a
        # site whose every output was NaN has elements == 0 yet must be reported).
        seen_rows = [ROW["elements"], ROW["nonfinite"], ROW["grad_nonfinite"]]
        if sites and any(bool(s.stats.window[seen_rows].sum() > 0) for s in sites):
            read = self._read(close=False)
            return None if read is None else read[0]
        return self._records[-1] if self._records else None

    def _on_disk(self) -> bool:
        """Whether the run directory holds the record (``history()`` reads it back)."""
        return self._wrote_run_dir and self.run_dir is not None

    def findings(self) -> list[Finding]:
        """What is wrong now, most severe first (see :meth:`current`)."""
        rec = self.current()
        return [] if rec is None else rec.findings

    def to_pandas(self) -> pd.DataFrame:
        """One row per site: the site-level metrics of the current window (see :meth:`current`)."""
        rec = self.current()
        if rec is None:
            return pd.DataFrame(columns=["step", "site", "family"])
        return pd.DataFrame(rec.site_rows)

    def unit_table(self, site: str) -> pd.DataFrame:
        """One row per unit of ``site``: activation rate, mean |h|, dormant score, dead...
        (see :meth:`current`).

        The frame's ``attrs`` hold the unit dim and the rule that chose it.
        """
        s = self.probe.site(site)
        rec = self.current()
        if rec is None:
            raise ReluDoctorError(
                f"site: {site!r} has no statistics yet: run a forward pass (and call step()) "
                "before reading its units."
            )
        df = rec.unit_table[rec.unit_table["site"] == site].reset_index(drop=True)
        df.attrs.update({"unit_dim": s.unit_dim, "unit_rule": s.unit_rule, "family": s.family.name})
        return df

    units = unit_table  # the name before 0.2

    def site_key(self, name: str) -> SiteKey:
        """The :class:`~relu_doctor.sites.SiteKey` of the site whose display name is ``name``."""
        return self.probe.site(name).key

    def history(self) -> pd.DataFrame:
        """Every logged (step, site) row so far: read back from the run directory, or
        without one the rows of the last ``keep_records`` logs."""
        if self._on_disk():
            assert self.run_dir is not None
            return read_table(self.run_dir, "history")
        if not self._records:
            return pd.DataFrame()
        return pd.DataFrame([r for rec in self._records for r in rec.site_rows])

    @property
    def records(self) -> list[IntervalRecord]:
        """The latest ``keep_records`` interval records (memory stays bounded)."""
        return list(self._records)

    @property
    def sites(self) -> list[Site]:
        return self.probe.sites()

    def to_run(self) -> Run:
        """The run record: read back from the run directory, or without one built from the
        last ``keep_records`` logs (the current window when nothing was logged)."""
        run_dir = self.run_dir
        if self._on_disk() and run_dir is not None and self._records and (
            (run_dir / "meta.json").is_file()
        ):
            return load_run(run_dir)
        records = list(self._records)
        events = list(self._events)
        if not records:
            read = self._read(close=False) if self.probe.sites() else None
            if read is not None:
                records = [read[0]]
                events += [e.to_dict() for e in read[1]]

        def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

        return Run(
            meta={"format_version": FORMAT_VERSION, **self._meta(),
                  "records_dropped": self._records_dropped},
            history=pd.DataFrame([r for rec in records for r in rec.site_rows]),
            units=cat([r.unit_table for r in records]),
            layers=cat([r.layer_table for r in records]),
            events=events,
            last_findings=list(records[-1].findings) if records else [],
            tables={"metrics": cat([_metrics_frame(r) for r in records if r.metrics])},
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write everything recorded so far as a run directory at ``path``."""
        run = self.to_run()
        writer = RunWriter(path, replace=True)
        try:
            writer.write_meta(
                {k: v for k, v in run.meta.items() if k not in ("format_version", "run_id")}
            )
            frames = {"history": run.history, "units": run.units, "layers": run.layers,
                      **run.tables}
            for name, frame in frames.items():
                if not frame.empty:
                    writer.append_table(name, int(frame["step"].max()), frame)
            writer.write_findings(run.findings())
            writer.append_events(run.events)
        finally:
            writer.close()
        return Path(path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, reduce: bool = False) -> dict[str, Any]:
        """Counts and windows of every site, step counters and open findings.

        Args:
            reduce: sum every site's open window across processes (one collective through
                ``all_reduce``; every process must call it, as Lightning's
                ``save_checkpoint`` does), so that one process's state carries all of it.
                Lifetimes are already the same on every process.
        """
        sites = self.probe.site_state()
        if reduce and self.all_reduce is not None:
            tokens = sorted(sites)  # the same order on every process
            summed = self.reduce_sum([sites[t]["window"] for t in tokens])
            sites = {**sites, **{t: {**sites[t], "window": w} for t, w in zip(tokens, summed, strict=True)}}
        return {
            "global_step": self.global_step,
            "window_steps": self.window_steps,
            "sites": sites,
            "findings_open": self._tracker.state_dict(),
            "grad_norm_history": list(self._grad_norm_history),
            "tap": self.tap.state_dict() if self.tap is not None else None,
            "eval": None if self.eval is None else self.eval.state_dict(reduce=reduce),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, windows: bool = True) -> None:
        """Restore from :meth:`state_dict`. Sites not yet seen are restored on first call.

        Args:
            state: from :meth:`state_dict`.
            windows: restore the open windows too. Pass False on every process but one when
                the state was saved with ``reduce=True`` (that one carries the sums).
        """
        self.global_step = int(state["global_step"])
        self.window_steps = int(state["window_steps"])
        self._tracker.load_state_dict(state.get("findings_open", state.get("began", [])))
        self._grad_norm_history = deque(
            (float(x) for x in state.get("grad_norm_history", [])), maxlen=GRAD_NORM_WINDOW
        )
        self._continue_after_checkpoint()
        if self.tap is not None and state.get("tap"):
            # The tap's window holds gradients already summed across processes (DDP): the
            # same on every rank, so every rank restores it.
            self.tap.load_state_dict(state["tap"])
        sites: Mapping[str, Any] = state.get("sites", {})
        if not windows:
            sites = {t: {**s, "window": torch.zeros_like(s["window"])} for t, s in sites.items()}
        self.probe.load_site_state(sites)
        self.probe.collecting = self._collecting()
        if self.eval is not None and state.get("eval"):
            self.eval.load_state_dict(state["eval"], windows=windows)

    def __repr__(self) -> str:
        return (
            f"Doctor(sites={len(self.probe.sites())}, step={self.global_step}, "
            f"attached={self.probe.attached})"
        )


def _metrics_frame(record: IntervalRecord) -> pd.DataFrame:
    """The record's training metrics in the run's long format: one row per (step, name)."""
    names = list(record.metrics)
    return pd.DataFrame(
        {"step": [record.step] * len(names), "name": names,
         "value": [record.metrics[n] for n in names]}
    )


def _eval_name(eval_stream: object) -> str | None:
    """The evaluation stream's subdirectory name (``eval_stream``), None for no stream."""
    if eval_stream is False:
        return None
    if eval_stream is True:
        return "eval"
    if isinstance(eval_stream, str) and eval_stream and Path(eval_stream).name == eval_stream:
        return eval_stream
    raise ReluDoctorError(
        "eval_stream: expected True, False or a subdirectory name such as 'validation', "
        f"got {eval_stream!r}."
    )


def watch(model: nn.Module, **kwargs: Any) -> Doctor:
    """Watch ``model``'s ReLU-family activations; use as a context manager.

    Keyword arguments are those of :class:`Doctor`.

    Example:
        >>> import torch, torch.nn as nn, relu_doctor
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> with relu_doctor.watch(net, log_every_n_steps=2) as doc:
        ...     for _ in range(2):
        ...         net(torch.randn(16, 4)).sum().backward()
        ...         _ = doc.step()
        >>> list(doc.to_pandas()["site"])
        ['1']
    """
    doc = Doctor(model, **kwargs)
    doc.expects_steps = True
    return doc.attach()


