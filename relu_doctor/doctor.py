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
import contextvars
import errno
import os
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from relu_doctor._hooks import HookOwner
from relu_doctor._silence import Silence
from relu_doctor._validate import (
    callable_or_none,
    flag,
    name_or_function,
    path_or_none,
    positive_int,
)
from relu_doctor._validate import optimizers as optimizers_arg
from relu_doctor.diagnosis import REMEDY_NAMES, DiagnosisConfig, diagnosis_config
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, RunDirError, user_stacklevel
from relu_doctor.families import family_of, held_instead, relu_like_unwatched
from relu_doctor.history import (
    FindingTracker,
    IntervalRecord,
    LogRecord,
)
from relu_doctor.interval import IntervalReading, TableMemory
from relu_doctor.optimizer_tap import OptimizerTap
from relu_doctor.probes import Probe, in_backward, transformed_text, unwrapped, wrapper_scaler
from relu_doctor.recording import RunRecording
from relu_doctor.rundir import RESUME_ADVICE, RunWriter
from relu_doctor.sampling import DEFAULT_BUDGET, Sampler, Stopwatch, check_rate, model_device
from relu_doctor.sites import FrozenFeeds, Site, SiteKey
from relu_doctor.stats import AgreedSum, group_rank, group_size, reduce_sum
from relu_doctor.training_metrics import TrainingMetrics, WindowLoss

__all__ = ["Doctor", "IntervalRecord", "LogRecord", "watch"]

Listener = Callable[[IntervalRecord], None]

GRAD_NORM_WINDOW = 1024  # total gradient norms kept for the spike test (the latest logs)
KEEP_EVENTS = 10_000  # events kept in memory (all of them reach the run directory)
#: OS errors at opening the run directory that may pass (a full disk, a quota, a flaky mount):
#: training starts and writing is retried at each log. Any other (no such parent, a file in
#: the way, a read-only place, no permission) means it cannot be written: the user's mistake.
PASSING_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EAGAIN", "EINTR",
                                      "ENOMEM", "EMFILE", "ENFILE", "ESTALE", "ETIMEDOUT")
    if hasattr(errno, name)
)


class Doctor(IntervalReading, RunRecording, HookOwner):
    """Watches a model's ReLU-family activations. Create it with :func:`watch`.

    Args:
        model: the model.
        log_every_n_steps: steps per logging interval (the default window for "dead").
        every_n_steps: collect statistics on every n-th step only (1 = every step), a fixed
            rate that ignores ``overhead_budget``; ``"auto"`` (the default): the rate
            ``overhead_budget`` chooses.
        overhead_budget: the largest fraction of a training step the statistics may cost
            (default 0.03): relu_doctor measures itself (host clock on the CPU, CUDA events
            read at logging steps on a GPU; no synchronisation) and collects every n-th step
            with n chosen to stay under it, at least once per logging interval (see
            :mod:`relu_doctor.sampling`). None collects every step. Each record and
            ``to_pandas()`` state ``steps_collected`` out of ``steps_run``: the steps meant
            to collect in which a forward pass of the watched stream was recorded.
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
            statistics (fp16 AMP); not needed for bf16. Default: the one of what
            ``fabric.setup`` returned, where ``model`` is that and its precision has one.
        run_dir: write a run directory here as training goes, TensorBoard event files
            included (in ``run_dir`` itself: ``tensorboard --logdir`` its parent names the
            run after it).
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
        padding_mask: leave a padded batch's padding out of every statistic: the name of a
            keyword argument of the model's forward that holds the mask (``"attention_mask"``
            for Hugging Face models: nonzero at the real positions), or a function of the
            forward's ``(args, kwargs)`` returning it; read at each pass's outermost call. A
            site whose output, its unit dim left out, begins with the mask's shape
            (``(batch, seq, features)``, ``(batch, channels, seq)``) then counts its real
            positions only, forward and gradients (through the eager path, not the fused
            kernels; not under ``torch.compile``); any other site counts every position,
            said once. None (the default): every position.
        stream: which forward passes this Doctor records: ``"train"`` (default; gradients
            enabled, begun at a module in training mode: the model, or a part of it called
            on its own), ``"eval"`` (the others) or
            ``"all"`` (what :func:`~relu_doctor.scan` uses).
        keep_records: how many of the latest :class:`~relu_doctor.history.IntervalRecord`
            are kept in memory (``doc.records``; without a run directory also
            ``doc.history()`` and ``doc.to_run()``); memory stays bounded however long the
            run. With ``run_dir``, everything logged is read back from the directory.
        resume: continue the run already in ``run_dir`` after its last logged step (else a
            directory holding a run is refused, so two runs never mix).
        optimizer_pre_hook: read parameter gradients in the optimizer's step pre-hook. Pass
            False when the backward runs inside ``optimizer.step(closure)`` (Lightning's
            automatic optimisation), and call :meth:`before_optimizer_step` once the
            gradients are final; with LBFGS, whose closure runs several times a step, in
            its first evaluation of each step only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every_n_steps: int = 50,
        every_n_steps: int | Literal["auto"] = "auto",
        overhead_budget: float | None = DEFAULT_BUDGET,
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
        padding_mask: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
    ) -> None:
        path_or_none("run_dir", run_dir)
        if grad_scaler is None:  # (Fabric's, under 16-mixed)
            grad_scaler = wrapper_scaler(model)
        model = unwrapped(model)  # torch.compile's or Fabric's wrapper: the model it wraps
        for name, value in (("gradients", gradients), ("is_writer", is_writer),
                            ("optimizer_pre_hook", optimizer_pre_hook),
                            ("tensorboard", tensorboard), ("resume", resume)):
            flag(name, value)
        if functional is not None:
            flag("functional", functional)
        callable_or_none("all_reduce", all_reduce)
        name_or_function("padding_mask", padding_mask)
        if isinstance(padding_mask, str) and padding_mask.endswith("key_padding_mask"):
            # (a sequence trial's nn.TransformerEncoder: its src_key_padding_mask, True at the
            # padding, counted the padding alone, silently)
            raise ReluDoctorError(
                f"padding_mask: {padding_mask!r} is, by PyTorch's convention (nn.Transformer, "
                "nn.MultiheadAttention), True (or -inf) at the padding, where padding_mask "
                "wants the mask nonzero at the real positions, as 'attention_mask' is: give "
                f"padding_mask=lambda args, kwargs: None if kwargs.get({padding_mask!r}) is "
                f"None else kwargs[{padding_mask!r}] == 0 (0 at the real positions in either "
                "form of that mask; None where a call has none).")
        if padding_mask is not None and not _MAKING_EVAL_STREAM.get() and (
                found := _encoder_decoder(model)):
            # (an audio trial's Whisper under the HF callback: the decoder's mask, padded to
            # the encoder's length, was laid on the encoder's sites, silently; a T5 trial's
            # plain loop then had no word of it at all)
            warnings.warn(
                "relu_doctor: padding_mask on an encoder-decoder model "
                f"({found}): the one mask is laid on every site whose output "
                "begins with its shape, the encoder's and the decoder's alike where their "
                "lengths are equal, where it masks the other stack's positions wrongly "
                "(one mask a pass: no stack of its own). Leave padding_mask off on such a "
                "model, or make sure no other stack shares the mask's length.",
                ReluDoctorWarning, stacklevel=user_stacklevel())
        self.log_every_n_steps = positive_int("log_every_n_steps", log_every_n_steps)
        every, budget = check_rate(every_n_steps, overhead_budget)
        if every != "auto" and every > self.log_every_n_steps:
            warnings.warn(
                f"relu_doctor: every_n_steps={every} is more than log_every_n_steps="
                f"{self.log_every_n_steps}: most windows would collect nothing and judge "
                f"nothing, so each collects one step (every_n_steps={self.log_every_n_steps}). "
                "Log less often to collect less often.",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
            every = self.log_every_n_steps
        #: the host seconds this Doctor's hooks spent collecting (its budget's measure)
        self.stopwatch = Stopwatch()
        self.sampler = Sampler(
            every_n_steps=None if every == "auto" else every,
            overhead_budget=budget,
            max_every=self.log_every_n_steps,
            distributed=all_reduce is not None,
            spent=self.stopwatch.read,
            every_step=self.stopwatch.read_every_step,
        )
        # What is in effect (the run's configuration says it): "auto" where the budget
        # chooses the rate; a fixed rate has no budget.
        self.every_n_steps = (
            "auto" if self.sampler.adaptive else self.sampler.every_n_steps or 1
        )
        self.overhead_budget = self.sampler.overhead_budget if self.sampler.adaptive else None
        self.steps_run = 0  # steps in the open window, collecting or not
        self.config = diagnosis_config(tau, config)
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise ReluDoctorError(
                f"grad_scaler: expected a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        self.grad_scaler = grad_scaler
        #: the loss scale as the step now running began (None: the scaler had none yet, and
        #: starts from its _init_scale, read as the step ends), and how many steps of the
        #: open window the scaler skipped (device tensors: no sync until the log)
        self._scale_before: torch.Tensor | None = None
        self._scaler_skipped: torch.Tensor | None = None
        self.world_size = positive_int("world_size", world_size)
        #: the processes torch.distributed ran as the Doctor was made (1: none)
        self.processes = processes = group_size()
        if self.world_size > 1 and all_reduce is None and processes != self.world_size:
            raise ReluDoctorError(
                f"world_size: got {world_size} without all_reduce, and no process group of "
                f"{world_size} processes is running: one process's gradient statistics would "
                f"be divided by {world_size}. With several processes pass all_reduce= (the "
                "sum across processes, see the README's DDP section) beside it; for one, "
                "leave world_size at 1."
            )
        if processes > 1 and self.world_size == 1 and stream == "train":
            # (a world_size given without all_reduce: each process watches its own share)
            warnings.warn(
                f"relu_doctor: torch.distributed runs {processes} processes, and this Doctor "
                + ("sums its statistics across them (all_reduce=) with world_size=1: its "
                   f"gradient statistics are {processes} times those of the mean loss DDP "
                   f"optimises. Pass world_size={processes} beside all_reduce="
                   if all_reduce is not None else
                   "sums nothing across them (no all_reduce=): its statistics are this "
                   "process's batches alone, and under DDP its gradient statistics are "
                   f"{processes} times those of the mean loss DDP optimises, and its "
                   "remedies would each change this process's copy of the model alone. "
                   f"Pass all_reduce= (the sum across processes), world_size={processes} and "
                   "is_writer=(rank == 0)")
                + " to watch, on every process (the README's 'Distributed' section)"
                + ("" if all_reduce is not None else
                   "; where each process trains a model of its own, this is as meant") + ".",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
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
            stopwatch=self.stopwatch,
            padding_mask=padding_mask,
        )
        self.model = model
        self.functional = functional is not False
        self._has_sites = False
        self._warned_nonfinite: set[str] = set()  # metrics whose window mean was not finite
        self._warned_log_errors: set[str] = set()  # kinds of error a log at a step raised
        self._read_failed = False  # the last log's read failed, contained (see _log)
        self.eval: Doctor | None = None
        self._eval_name: str | None = _eval_name(eval_stream)
        self._passes_logged = 0  # an evaluation stream's passes already logged
        #: an evaluation stream's training Doctor (whose steps it is read at), else None
        self._training_doctor: weakref.ref[Doctor] | None = None
        if self._eval_name is not None:
            making = _MAKING_EVAL_STREAM.set(True)  # (its warnings are this Doctor's, said)
            try:
                self.eval = Doctor(
                    model, log_every_n_steps=log_every_n_steps, every_n_steps=1,  # every eval pass
                    include=include, exclude=exclude,
                    unit_dims=unit_dims, gradients=False, config=self.config,
                    run_dir=None if run_dir is None else Path(run_dir) / self._eval_name,
                    all_reduce=all_reduce, world_size=world_size, is_writer=is_writer,
                    functional=functional, tensorboard=tensorboard, keep_records=keep_records,
                    resume=resume, stream="eval", padding_mask=padding_mask,
                )
            finally:
                _MAKING_EVAL_STREAM.reset(making)
            self.eval._training_doctor = weakref.ref(self)
        opts: list[torch.optim.Optimizer] = optimizers_arg("optimizer", optimizer)
        self.tap = self._make_tap(opts, optimizer_pre_hook)
        self.all_reduce = all_reduce
        self.is_writer = is_writer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._writer: RunWriter | None = None
        self.resume = bool(resume)
        #: what the refusal of a ``run_dir`` that holds a run advises: an integration sets
        #: its own way of continuing a run (its framework's checkpoint) before attaching
        self.resume_advice = RESUME_ADVICE
        self._wrote_run_dir = False  # a writer was opened: the run directory holds the record
        self._claimed_run_dir = False  # the run directory was checked as ours to write
        self._announced: set[tuple[str, str]] = set()  # (remedy, site) changes said once
        self._saved_to: set[str] = set()  # directories save() wrote: saved over freely
        self._write_error: str | None = None  # the first write failure, warned once
        self._unfolded = False  # site windows logged by a final log, not yet folded
        self._unwritten: list[list[int]] = []  # [first, last] steps that did not reach disk
        self._events_unwritten: list[dict[str, Any]] = []  # kept back by a failed write
        self._closed = False  # the run directory written and closed: events go in one by one
        self._said_after_close = False
        self._run_id: str | None = None  # the run the run directory holds, once opened
        self.tensorboard = bool(tensorboard)
        self._tb: Any = None
        self._optimizers = opts
        self._training = TrainingMetrics()  # loss, learning rates, user metrics
        #: an integration's own measure of the training loss between logs (add to it), the
        #: records' ``window_loss`` in place of the mean of the steps' ``loss`` where it
        #: took any (see :meth:`_window_loss`)
        self.window_loss = WindowLoss()
        self._exited = False
        self._in_block = False  # inside a `with` block (see close)
        self.expects_steps = False  # watch() sets it: a block without step() then warns
        self.global_step = 0
        #: the step said ahead to be training's last (:meth:`expect_last_step`), else None
        self._last_ahead: int | None = None
        self.window_steps = 0  # steps of the open window that recorded a pass (collected)
        self._window_scheduled = 0  # steps of the open window meant to collect
        self._passes_at_step = 0  # the probe's passes when the last step ended
        self.keep_records = positive_int("keep_records", keep_records)
        self._records: deque[IntervalRecord] = deque(maxlen=self.keep_records)
        self._records_dropped = 0
        self._last_judged: IntervalRecord | None = None  # kept however many records follow
        self._events: deque[dict[str, Any]] = deque(maxlen=KEEP_EVENTS)
        self._tracker = FindingTracker()
        self._grad_norm_history: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
        self._first_rms: dict[str, float] = {}  # each site's activation RMS at its first log
        self._silence = Silence()  # each unit's past, for sampled windows (see _silence)
        # ... and at its first log with most of its units alive: growth is measured from it
        self._growth_base: dict[str, float] = {}
        #: by site, the remedies that left it alone (declined events): not advised there
        self._declined: dict[str, set[str]] = {}
        # the unit tables' blocks: the latest records' (keep_records), and one more free
        self._table_memory = TableMemory(self.keep_records + 2)
        self._frozen_feeds = FrozenFeeds()  # (the sites' frozen feeds, looked up once)
        #: the frozen layer feeding each of the sites given, or None (their rows'
        #: ``frozen``), asked once per log: by default each site's producer where it and its
        #: block do not train (:func:`~relu_doctor.sites.frozen_feed`); an integration whose
        #: sites are not torch modules (Keras) sets its own
        self.frozen_feed: Callable[[list[Site]], list[str | None]] | None = None
        self._warned_empty = False  # a window with collecting steps recorded nothing
        #: (optimizer steps, collecting steps, collecting steps since the optimizer last
        #: stepped, whether its stopping was said, whether calls too often were said) of
        #: the logged windows (see _check_step_calls)
        self._step_calls = [0, 0, 0, 0, 0]
        self._collected_last = False  # whether the step before the one now taken collected
        self._warned_sites_differ = False  # the processes held different sites at a read
        self._agreed_sums: dict[str, AgreedSum] = {}  # (see sum_across)
        self._warned_no_site = False  # (see _warn_no_site_yet)
        self._alone = False  # no cross-process call: an exception's exit (see __exit__)
        self._step_called = False  # step() was called (the exit warns when it never was)
        self._listeners: list[Listener] = []
        # at the next step, ask the remedies for a held final record (one was logged, or
        # this Doctor was attached: a resumed run's remedies may have loaded one)
        self._check_held = False
        self._event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._capture: Any = None
        self._meta_dirty = True
        self._meta_unmasked = 0  # the sites a padding mask did not fit, in meta.json
        #: what stopped training early ("KeyboardInterrupt", "ValueError: ..."), said in the
        #: run directory's meta.json and the report (see note_exception); None otherwise
        self.ended_by: str | None = None
        #: (steps collected, steps run) in the windows closed so far (see lifetime_steps)
        self._lifetime_steps: tuple[int, int] | None = (0, 0)
        self._previous_sites: list[dict[str, Any]] = []  # a continued run's (see recording)
        self._previous_unwritten: list[list[int]] = []  # its logs never written (same)
        self._previous_dropped = 0  # its logs a Doctor without run_dir= no longer held (same)
        #: the step the lifetime counts began at, where a run was continued without them
        self._lifetime_since: int | None = None
        #: the last step of the run continued with no state loaded since (said at the log)
        self._unloaded_resume: int | None = None
        #: an evaluation stream's: the training step of the checkpoint its state came from
        #: (its own step is its last log's, 0 before the first: see _kept_step)
        self._resumed_at: int | None = None
        self._replace_at: int | None = None  # ... a kept log a log at its step replaces
        self._warned_other_model = False
        self.probe.on_new_site(self._mark_meta_dirty)
        # a layer replaced at another width: the new one's growth and findings are its own
        self.probe.on_renewal(self._renewed)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Doctor:
        """Register every hook (idempotent); after the watch ended (its block left,
        ``close()``), it watches again."""
        if self.probe.attached:
            return self
        self._exited = False
        self._fold_logged_windows()
        self.probe.attach()
        self._check_held = True
        try:
            if self.tap is not None:
                self.tap.attach()
            if self.functional:
                from relu_doctor.functional import FunctionalCapture

                self._capture = FunctionalCapture(self.probe).attach()
            if self.is_writer and self.run_dir is not None and self._writer is None:
                try:
                    self._open_writer()
                except OSError as e:
                    if e.errno is None or e.errno in PASSING_ERRNOS:
                        self._write_failed(e)  # train on, retry at the next log
                    else:  # before training starts: an error, with the OS's reason
                        raise RunDirError(
                            f"run_dir: cannot write to {str(self.run_dir)!r} "
                            f"({e.strerror or e}); pass a directory you can create and write."
                        ) from e
                if self.tensorboard and self._tb is None:
                    from relu_doctor.reports.tensorboard import RunTensorBoard, run_log_dir

                    self._tb = RunTensorBoard(
                        run_log_dir(self.run_dir),
                        continued=self._writer is not None and self._writer.last_step is not None)
                    self.add_listener(self._tb.write_record)
                    self.add_event_listener(self._tb.write_event)
            if self.eval is not None:
                self.eval.attach()
            self._tell_listeners("watch_attached")
        except BaseException:
            self.detach()
            raise
        self.sampler.start(model_device(self.model))
        self.probe.collecting = self._collecting()
        self._note_scale()
        self._say_relu_like()
        return self

    def _say_relu_like(self) -> None:
        """Once per model: the ReLU-like activations of no family it holds are not watched
        (a Keras trial's MobileNetV3 ran 19 hard swishes beside its ReLUs, said nowhere)."""
        if self._training_doctor is not None or self.model in _TOLD_RELU_LIKE:
            return
        found = relu_like_unwatched(self.model)
        if not found or not any(family_of(m) is not None for m in self.model.modules()):
            return  # (where it holds no family's module, the message that none ran names them)
        _TOLD_RELU_LIKE.add(self.model)
        listed = ", ".join(f"{k} x{n}" for k, n in sorted(found.items()))
        warnings.warn(
            f"relu_doctor: the model also runs {listed}: ReLU-like, but of no activation "
            "family relu_doctor counts, so those are not watched (the ReLU-family sites "
            "are). relu_doctor.register_family can add one.",
            ReluDoctorWarning, stacklevel=user_stacklevel())

    def _loss_scale(self, *, initial: bool = False) -> torch.Tensor | None:
        """The loss scaler's scale (its device tensor), where one scales the loss; with
        ``initial``, the scale it started from (a GradScaler makes its tensor at its first
        ``scale()`` from its ``_init_scale``, which ``load_state_dict`` sets: read as the
        step ends, after a resumed fit restored it)."""
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return None
        if initial:
            start = getattr(sc, "_init_scale", None)
            return torch.tensor(float(start)) if isinstance(start, (int, float)) else None
        scale = getattr(sc, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def _note_scale(self) -> None:
        """Before a step: the loss scale it begins with (a copy: the scaler updates its own
        in place), to tell at its end whether the scaler skipped it. Every step, collecting
        or not: skips are judged against the steps run (one tiny device op, with a scaler
        only)."""
        scale = self._loss_scale()
        self._scale_before = None if scale is None else scale.detach().clone()

    def _count_skipped(self) -> None:
        """At the end of a step: the scaler lowers its scale exactly where it skipped the
        update (non-finite gradients); counted on the device."""
        now = self._loss_scale()
        before = self._scale_before
        if before is None:  # it had no scale as the step began: the one it started from
            before = self._loss_scale(initial=True) if now is not None else None
        if before is None or now is None or before.shape != now.shape:
            return
        skipped = (now.detach() < before.to(now.device)).sum(dtype=torch.int64)
        self._scaler_skipped = skipped if self._scaler_skipped is None else (
            self._scaler_skipped + skipped)

    def _peek_skipped(self) -> int:
        """The open window's steps the loss scaler skipped (a read-back)."""
        return 0 if self._scaler_skipped is None else int(self._scaler_skipped)

    def _take_skipped(self, close: bool) -> int:
        """:meth:`_peek_skipped`, counted anew from here where the window closes (read at a
        log: the read-back has synchronised; a final log, whose windows go on, keeps it)."""
        skipped = self._peek_skipped()
        if close:
            self._scaler_skipped = None
        return skipped

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
        self.sampler.stop()
        if self.eval is not None:
            self.eval.detach()
        self._tell_listeners("watch_detached")

    def _tell_listeners(self, name: str) -> None:
        """Call each listener's ``name`` method where it has one: a treatment plan takes its
        clipper's optimizer hook off when the watch ends and puts it back when it watches
        again (a plan's clipper stayed on the optimizer after the block, which had "removed
        every hook": a trial)."""
        for fn in list(self._listeners):
            if callable(method := getattr(fn, name, None)):
                method(self)  # (a plan bound since to another Doctor leaves it be)

    def _fold_logged_windows(self) -> None:
        """Fold the windows of a final log (see :meth:`log`) into the lifetime counts."""
        if not self._unfolded:
            return
        self._unfolded = False
        sites = self.probe.sites()
        summed, world = self._sum_windows(sites, close=True)
        if world is not None:  # (else left open: see _sum_windows)
            for s in sites:
                s.stats.close_window(summed[s.name])
            self.probe.close_passes(sites)
        self._reset_window_counts()

    def _reset_window_counts(self) -> None:
        # the closed window's steps go to the lifetime's (the lifetime findings say them)
        if self._lifetime_steps is not None:
            self._lifetime_steps = (self._lifetime_steps[0] + self.window_steps,
                                    self._lifetime_steps[1] + self.steps_run)
        self.window_steps = self._window_scheduled = self.steps_run = 0

    def __enter__(self) -> Doctor:
        self._exited = False
        self._in_block = True
        self._alone = False
        if self.ended_by is not None:  # entered again after an error: training goes on
            self.ended_by = None
            self._meta_dirty = True
        if self.eval is not None:
            self.eval._alone = False
        return self.attach()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._in_block = False
        error = exc[0] if exc and isinstance(exc[0], BaseException) else None
        self._end(exc_type is not None, error, alone=exc_type is not None, depth=0)

    def _end(self, raised: bool, error: BaseException | None, *, alone: bool,
             depth: int) -> None:
        """Log the last, partial window (an exception's too: ``raised``, ``error``), take
        every hook off and close the run directory: the end of the watch. ``alone``: with
        several processes, log this process's own window, unjudged, with no collective (see
        sum_across): an exception raised on one process leaves the others elsewhere (in
        DDP's own all-reduce), where a cross-process sum would meet theirs and abort both,
        hiding the user's traceback. ``depth``: the frames between the user's call and
        here, beyond one."""
        self._alone = alone and self.all_reduce is not None
        if self.eval is not None:
            self.eval._alone = self._alone
        if error is not None:
            self.note_exception(error)
        self._warn_stray_passes(not raised)
        self.log_final(keep_window=True, stacklevel=3 + depth)
        if self.eval is not None and self.probe.attached:
            try:  # the evaluation window too
                self.log_eval()
            except Exception as e:
                warnings.warn(
                    f"relu_doctor: the last evaluation window could not be logged: "
                    f"{type(e).__name__}: {e}",
                    ReluDoctorWarning,
                    stacklevel=3 + depth,
                )
        self.detach()
        super().close()
        self._exited = True
        if self.expects_steps and not raised and not self._step_called:
            warnings.warn(
                "relu_doctor: the watch ended without a call to doc.step(), so nothing "
                "was logged. Call doc.step() once per optimizer step while it watches.",
                ReluDoctorWarning,
                stacklevel=3 + depth,
            )

    def close(self) -> None:
        """End the watch, as leaving its ``with`` block does: where a watch made without
        ``with`` (in a notebook) still watches the model, the last, partial window is
        logged and every hook taken off first (a trial's ``close()`` left them counting, the
        window unsaved; an exception being handled, ``except: doc.close()``, is said as the
        block's is); then the run directory is closed (its open segments compacted, its
        lock released). With several processes that window is this process's own, logged
        with no collective (a close on one rank alone cannot wait for the others). Inside
        a ``with`` block it closes the run directory only. Reading it back still works.
        Idempotent."""
        if self.probe.attached and not self._exited and not self._in_block:
            error = sys.exc_info()[1]
            self._end(error is not None, error, alone=True, depth=1)
            return
        super().close()

    def note_exception(self, exc: BaseException) -> None:
        """Training stopped on ``exc`` (a ``with watch(...)`` block's exception, a Lightning
        fit's): ``meta.json`` and the report say so (:attr:`ended_by`), so that a run cut
        short is not read as one that ran its course. The first one is kept."""
        if self.ended_by is None:
            text = " ".join(str(exc).split())
            name = type(exc).__name__
            self.ended_by = f"{name}: {text[:200]}{'…' if len(text) > 200 else ''}" if text else name
            self._meta_dirty = True

    def _warn_stray_passes(self, ok: bool) -> None:
        """At a ``watch`` block's exit: training passes after its last ``step()`` are in the
        window still open, which the exit logs; said once. (An integration's loop knows its
        steps: a Lightning batch that skips the optimizer is no pass after the last step.)"""
        stray = self.probe.passes - self._passes_at_step
        if not (ok and self.expects_steps and stray > 0 and self.steps_run > 0
                and self.probe.attached and not self._unfolded
                and self.probe.collecting and not self.probe.compiled):
            return
        warnings.warn(
            f"relu_doctor: {stray} training pass{'es' if stray > 1 else ''} ran after the "
            f"last step() (step {self.global_step}); belonging to no step, "
            f"{'they are' if stray > 1 else 'it is'} still counted in the last window "
            f"(steps {self.global_step - self.steps_run + 1}-{self.global_step}), which was "
            "open. Call step() after such a pass, or make it in eval mode or under "
            "torch.no_grad(), which are not recorded.",
            ReluDoctorWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ per step
    def _collecting(self) -> bool:
        log_next = (self.global_step + 2) % self.log_every_n_steps == 0
        return self.sampler.collect(self.global_step, log_next=log_next)

    def _next_is_log_step(self) -> bool:
        return ((self.global_step + 1) % self.log_every_n_steps == 0
                or self._last_ahead == self.global_step)

    def _update_step(self) -> bool:
        """Whether the next log reads the update ratio of the optimizer step now being
        taken: the step before a logging step, so that the logging step pays for the log
        alone (as a collecting step due there comes one step early: the copy of the
        parameters and its pass cost the 256-site MLP's logging step ~9 ms of ~65); the
        logging step itself where every step logs; and a step said ahead to be training's
        last (:meth:`expect_last_step`) that ends a partial window (one that ends a whole
        window was read at the step before, as where it is not said). Where the step before
        a log collects, the logging step reads it, so that no step pays for two of the
        three."""
        every, step = self.log_every_n_steps, self.global_step
        logs = (step + 1) % every == 0
        if every == 1 or (self._last_ahead == step and not logs):
            return True
        if (step + 2) % every == 0:  # (one collecting, as one due at the log is: the log's)
            return not self.probe.collecting
        # at the log, where no step of its window read one (the step before collected, its
        # optimizer did not step, a resume at it, an unscheduled log between them)
        return logs and (self._collected_last or (self.tap is not None and self.tap.unread))

    def expect_last_step(self) -> None:
        """Say, before its optimizer step, that the step now being taken is training's
        last. Its optimizer step then keeps the parameters' copy, as at a logging step, so
        the last, partial window has an update ratio (else NaN: its end is known only once
        its step ran); and its :meth:`step` is ``last=True``. The integrations call it where
        the framework knows the last step ahead (Lightning, the Hugging Face Trainer,
        Keras); in a plain loop, call it before the last ``opt.step()``. No host sync."""
        self._last_ahead = self.global_step

    def _current_scale(self) -> torch.Tensor | float | None:
        scale = self._loss_scale()  # the device tensor: reading it does not sync
        if self.world_size > 1:
            return self.world_size if scale is None else scale * self.world_size
        return scale

    def _renewed(self, site: str) -> None:
        """``site`` was made anew at another width (its layer replaced): its growth is
        measured from the new layer's first log, and its findings end and begin anew."""
        self._first_rms.pop(site, None)
        self._growth_base.pop(site, None)
        self._tracker.restart(site)
        self._silence.forget(site)

    def step(
        self, loss: torch.Tensor | float | None = None, *, last: bool = False
    ) -> IntervalRecord | None:
        """Mark the end of one training step (one optimizer step).

        Args:
            loss: this step's loss (a tensor stays on its device: it is summed there and
                read once, at the logging step); its mean over the window is the record's
                ``loss`` metric.
            last: this is training's last optimizer step (a bool). A window it closes is
                logged as a ``final`` record: remedies hold it, changing nothing, since no
                step would train what they changed, and decide on it at the end of the
                next step if training goes on. (The integrations pass it where the
                framework knows the last step; a window still open at the end of training
                is logged as ``final`` by :meth:`log_final` or the ``with`` block's exit.)

        Returns the :class:`~relu_doctor.history.IntervalRecord` when this step closed a logging interval, else None.
        No host synchronisation happens unless it logs.

        Raises:
            ReluDoctorError: called after the ``with watch(...)`` block ended, or after a
                recorded pass that ran no watched activation while none was ever seen (one
                process; with several (``all_reduce``), a warning, and it goes on).
        """
        if self._exited:
            raise ReluDoctorError(
                "step: called after the `with relu_doctor.watch(...)` block ended; its hooks "
                "are removed. Call doc.step() inside the block (indent the training loop)."
            )
        t0 = time.perf_counter()
        self._step_called = True  # (even if it raises below: the exit's hint is not for it)
        if not self._has_sites and self.probe.collecting:  # (a step that collects nothing
            missing = self.missing_activations()           # records no pass to judge by)
            if missing is not None:
                if self.all_reduce is not None:
                    self._warn_no_site_yet(missing)
                elif not self.may_see_activations():
                    raise ReluDoctorError(missing)
        if last is not False and last is not True:
            last = flag("last", bool(last) if isinstance(last, np.bool_) else last)
        if self._last_ahead is not None and self._last_ahead < self.global_step:
            # training went on past the step said to be its last: that step's update ratio
            # is not the one the next log reads (unless this step copied anew)
            self._last_ahead = None
            if (self.tap is not None and not self._update_step()
                    and (self.global_step + 1) % self.log_every_n_steps):  # (a log reads it)
                self.tap.forget_update()
        last = last or self._last_ahead == self.global_step
        release = self._check_held  # training went on after a final record (_release_held)
        if loss is not None:
            self.log_metrics({"loss": loss})
        self.probe.close_pass()  # a pass cut short by an error elsewhere ends with the step
        if self._capture is not None:
            self._capture.close_pass()
        # Collected: meant to collect, and a pass of the stream was recorded in it (a model
        # left in eval(), or not run at this step, records none; the budget's sampling then
        # tries the next step). Compiled hooks count no passes as they run: there, every
        # step meant to collect.
        collected = self.probe.collecting and (
            self.probe.passes != self._passes_at_step or self.probe.compiled
        )
        self._passes_at_step = self.probe.passes
        self._window_scheduled += self.probe.collecting
        self.window_steps += collected
        if self.grad_scaler is not None:
            self._count_skipped()
        self.sampler.done(collected=collected)
        self.steps_run += 1
        self.global_step += 1
        record = None
        # what every step does counts against the budget (a collecting step's parking and
        # unparking below are in the steps the sampler compares)
        self.stopwatch.add_every_step(t0)
        if self.global_step % self.log_every_n_steps == 0:
            with self.sampler.log_lap():  # what a log costs counts against the budget
                record = self._log(final=last, keep=False, contain=True)
            if not self._has_sites and self.all_reduce is None:
                self._warn_none_ran()
            self.probe.transformed_calls = 0  # (a window's own: said of the window they ran in)
        if release and (record is None or not record.final):  # a final one is held anew
            self._release_held()
        self._collected_last = self.probe.collecting  # (see _update_step)
        self.probe.collecting = self._collecting()
        if self.grad_scaler is not None:
            self._note_scale()
        return record

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Read ``optimizer``'s parameter gradients now (after backward and AMP unscaling,
        before the update). Only needed with ``optimizer_pre_hook=False``; no host sync."""
        if self.tap is not None and self.probe.attached:
            self.tap.before_step(optimizer)

    def need_collected_per_window(self, n: int) -> None:
        """Collect at least ``n`` steps of every logging window (the remedies that judge dead
        units ask for :data:`~relu_doctor.remedies.evidence.MIN_EVIDENCE_STEPS` when bound), even
        where the overhead budget would collect fewer; warns once when that costs more than
        the budget. A fixed ``every_n_steps`` is left as given."""
        self.sampler.need_per_window(n, self.log_every_n_steps)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after each logging interval."""
        self._listeners.append(fn)

    def _release_held(self) -> None:
        """Training went on after a ``final`` record (a second ``fit``, a ``with`` block
        entered again, a run resumed from a checkpoint holding one): at the end of the first
        step since, the remedies decide on the record they held (``Remedy.release_held``).
        Not before that step: some remedies read the model's dataflow from a forward pass,
        which a resumed process has not run yet. After its log, if it logs: the remedies
        decide on what they held there, and observe the new record, whose window ran before
        those decisions."""
        self._check_held = False
        for fn in self._listeners:
            release = getattr(fn, "release_held", None)
            if release is not None:
                release()

    def log_metrics(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Add training metrics (accuracy, a loss term...) to the open logging window; each
        is recorded as its mean over the window (the run's ``metrics`` table, the report's
        training curve). Tensors stay on their device until the logging step: no host
        synchronisation.

        Args:
            metrics: ``{name: value}``, each value a number (numpy's included) or a
                one-element tensor or array.
        """
        self._training.add(metrics)

    def add_metric_source(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        """Call ``fn()`` at each logging step for more training metrics ``{name: value}``
        (the Lightning callback passes ``trainer.callback_metrics``)."""
        self._training.add_source(fn)

    def add_event_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(event)`` for each event passed to :meth:`record_event`."""
        self._event_listeners.append(fn)

    # ------------------------------------------------------------------ reading
    def _mark_meta_dirty(self) -> None:
        self._meta_dirty = True
        self._check_previous_sites()  # (a new site: is it the continued run's?)

    def _window_loss(self, *, keep: bool = False) -> float | None:
        """The window's mean training loss, which the remedies' loss guard reads: an
        integration's measure (:attr:`window_loss`) where it took one, else the mean of
        the steps' ``loss`` (``step(loss=...)``, ``log_metrics``), NaN kept; None where
        there is neither, and for an evaluation stream. With several processes, the mean
        over all of them (one small collective at every training log, on every process):
        each process's own would let the remedies judge a change apart on each, and the
        copies of the model part. ``keep``: the window is not logged (its record is None):
        an integration's measure stays for the next log, as the steps' ``loss`` does."""
        if self._training_doctor is not None:
            return None
        total, count = self.window_loss.take()
        if keep and count:
            self.window_loss.add(total, count)
        if not count:
            total, count = self._training.loss_sum()
        total, count = self._loss_across(total, count)
        return float(total) / count if count else None

    def _loss_across(self, total: torch.Tensor | float, count: int) -> tuple[torch.Tensor | float, int]:
        """A sum of losses and their count, summed across processes (one collective, which
        every process must reach; a host read of the count); as they are with one process."""
        if self.all_reduce is None or self._alone:
            return total, count
        dev = model_device(self.model) or torch.device("cpu")
        pair = torch.stack([
            torch.as_tensor(total, dtype=torch.float32, device=dev).reshape(()),
            torch.tensor(float(count), device=dev)])
        summed = self.reduce_sum([pair])[0]
        return summed[0], round(float(summed[1]))

    def reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed across processes in one collective call (``all_reduce``); the
        same tensors where there is one process. The one cross-process sum of the library."""
        if self.all_reduce is None or self._alone:
            return list(tensors)
        return reduce_sum(tensors, self.all_reduce)

    def sum_across(
        self, named: Mapping[str, torch.Tensor], device: torch.device | None, *,
        purpose: str = "windows",
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """``(named summed across processes, number of processes)``: the sums of tensors
        that every process holds under the same names (sites' windows), matched by name
        (:class:`~relu_doctor.stats.AgreedSum`, one for each ``purpose``: each remembers
        the names last agreed on). Where the processes do not hold the same sites, this
        process's own tensors and None, with one warning: the run goes on, each process
        reading its own batches, until they do (every process learns it at once, from the
        same sums, so all of them act alike on it)."""
        if self.all_reduce is None:
            return dict(named), 1
        if self._alone:  # (see __exit__)
            return dict(named), None
        if purpose not in self._agreed_sums:
            self._agreed_sums[purpose] = AgreedSum(self.all_reduce)
        summed, world = self._agreed_sums[purpose](named, device)
        if summed is not None:
            return summed, world
        if not self._warned_sites_differ and self.is_writer:  # once, by the writer alone
            self._warned_sites_differ = True
            warnings.warn(
                f"relu_doctor: at step {self.global_step} the {world} processes do not hold "
                f"the same activation sites (the writing process holds "
                f"{len(self.probe.sites())}): a "
                "branch or an expert that not every process has run yet, a site whose hook "
                "failed on one process, or an activation whose shape differs between "
                "processes (then until the end). Until they hold the same sites, each "
                "process reads its own windows without summing them across processes: the "
                "statistics written (rank zero's) count that process's batches only, and "
                "nothing is judged on them (no finding begins or ends, no remedy acts), so "
                "that every process goes on acting alike. The windows stay open, summed "
                "whole at the first log where the processes agree.",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
        return dict(named), None

    def log(self, *, final: bool = False) -> IntervalRecord | None:
        """Close the current window now: read, diagnose, record, write, notify listeners.

        Args:
            final: the last log of a ``with`` block, after its last optimizer step. Its
                record is ``final``: remedies judge their earlier interventions on it and
                hold it, changing nothing, since no step would train what they changed (a
                recycled unit would be saved untrained); they decide on it at the end of
                the next step if training goes on. The sites' windows stay readable
                (``doc.units(...)`` after the block) and are folded into the lifetime
                counts if the Doctor is attached again. (:meth:`log_final` is the same at
                a framework's end of training, closing the window.)
        """
        with self.sampler.log_lap():  # what a log costs counts against the budget
            return self._log(final, keep=final)

    def log_final(self, *, keep_window: bool = False, stacklevel: int = 2) -> IntervalRecord | None:
        """At the end of training: log the last, partial window as a ``final`` record (see
        :meth:`log`), if it holds a step and was not logged yet (so a second call does
        nothing). The window is closed, as :meth:`log` closes it, so a later ``fit`` with
        the same Doctor starts a new one; ``keep_window=True`` (a ``with`` block's exit)
        keeps it readable instead. A failure warns and returns None: the end of training is
        the user's. A window whose steps all came after the last collecting one is logged
        too, for its steps and training metrics (``steps_collected=0``): it judges nothing
        (see :attr:`IntervalRecord.judged <relu_doctor.history.IntervalRecord>`)."""
        if self.steps_run == 0 or not self.probe.attached or self._unfolded:
            return None
        try:
            with self.sampler.log_lap():
                return self._log(final=True, keep=keep_window)
        except Exception as e:
            warnings.warn(
                f"relu_doctor: the last partial window (steps after "
                f"{self.global_step - self.steps_run}) could not be logged: "
                f"{type(e).__name__}: {e}",
                ReluDoctorWarning,
                stacklevel=stacklevel + 1,
            )
            return None

    def _log(self, final: bool, keep: bool, *, contain: bool = False) -> IntervalRecord | None:
        """``final``: the record's flag (no step follows); ``keep``: the sites' windows stay
        readable, folded at the next attach (a ``with`` block's exit). ``contain`` (a log at
        :meth:`step`, inside the user's training loop, in one process): a bug of relu_doctor's
        in reading the window warns once per kind of error and gives None, the window left
        whole for the next log, where it stopped training. (With several processes it
        raises, as a process that skipped the others' collective calls would hang them; a
        :class:`ReluDoctorError`, a usage error, and what listeners raise, always do.)"""
        self._read_failed = False
        if self._unloaded_resume is not None:
            self._say_unloaded_resume()
        try:
            record = self._read(close=not keep, final=keep)
        except ReluDoctorError:
            raise
        except Exception as e:
            if not contain or self.all_reduce is not None:
                raise
            self._read_failed = True
            self._warn_log_failed(e)
            return None
        self.sampler.at_log(self.reduce_sum)  # after the read-back: the clock's events are done
        # (here: every process reaches it, as at_log; a window not logged keeps its loss)
        window_loss = self._window_loss(keep=record is None)
        self._unfolded = keep and record is not None
        if not self._unfolded:
            self._reset_window_counts()
        if record is None:
            return None
        record.final = final
        record.overhead = self.sampler.overhead() if self.sampler.adaptive else None
        self._check_held = self._check_held or (final and record.judged)
        record.metrics = self._training.read(
            self._optimizers, self.tap.used_lrs if self.tap is not None else None
        )
        record.window_loss = window_loss
        for name, value in self._training.nonfinite.items():
            if name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                warnings.warn(
                    f"relu_doctor: the mean of {name!r} over the window ending at step "
                    f"{record.step} is {value}; it is left out of that window's metrics (a gap "
                    "in the report's curve), here and in later windows without another "
                    "warning. A loss that is not finite usually means training diverged: "
                    "lower the learning rate, clip gradients "
                    f"({REMEDY_NAMES[self.config.loop]['clip']}).",
                    ReluDoctorWarning,
                    stacklevel=user_stacklevel(),
                )
        events = [e.to_dict() for e in record.finding_events]
        self._events.extend(events)
        if len(self._records) == self.keep_records:
            self._records_dropped += 1
        self._records.append(record)
        if record.judged:
            self._last_judged = record
        self._write_record(record, events)
        if record.judged:
            for fn in self._listeners:
                fn(record)
        elif self._tb is not None:  # kept for its steps and metrics; nothing acts on it
            self._tb.write_record(record)
        if self.eval is not None and (
            self.eval.probe.passes > self.eval._passes_logged or self.all_reduce is not None
        ):
            self._log_eval(contain=contain)  # the evaluation window closes with the training one
        return record

    def _say_unloaded_resume(self) -> None:
        """At the first log of a run continued with ``resume=True`` and no state loaded:
        its steps went on after the last log, which a loop restarted at an earlier
        checkpoint does not (an operations trial's run, back at step 150, was logged from
        171: 20 steps ahead, every finding begun again, with no word)."""
        last, self._unloaded_resume = self._unloaded_resume or 0, None
        warnings.warn(
            f"relu_doctor: this run continues the one in {str(self.run_dir)!r} after its last "
            f"log (step {last}) with no Doctor state loaded: its steps go on from {last + 1} "
            "and its lifetime counts began again there. Where training resumed from a "
            "checkpoint, load the Doctor's state saved with it (doc.load_state_dict(state) "
            "after watch): the steps then follow the checkpoint's, and the logs past it are "
            "written again.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn_log_failed(self, error: Exception) -> None:
        kind = type(error).__name__
        if kind in self._warned_log_errors:
            return
        self._warned_log_errors.add(kind)
        warnings.warn(
            f"relu_doctor: reading the window at step {self.global_step} failed ({kind}: "
            f"{error}), a bug in relu_doctor: training goes on, and the window is read whole "
            "at the next log. Please report it with the traceback "
            "(warnings.simplefilter('error', relu_doctor.ReluDoctorWarning) shows it).",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def log_eval(self) -> IntervalRecord | None:
        """Close the evaluation stream's window now (``eval_stream``), logged at this
        training step; its ``window_steps`` is the number of evaluation passes it holds.
        None without an evaluation stream or when the window is empty. With several
        processes every call reads (a process that ran no evaluation pass, where another
        did, takes part in the sum: evaluation on rank zero alone)."""
        return self._log_eval()

    def _log_eval(self, *, contain: bool = False) -> IntervalRecord | None:
        """:meth:`log_eval`; ``contain``: see :meth:`_log` (the window's passes are then
        counted at the next log)."""
        ev = self.eval
        if ev is None or (ev.probe.passes == ev._passes_logged and self.all_reduce is None):
            return None
        ev.global_step = self.global_step
        ev.window_steps = ev.steps_run = ev.probe.passes - ev._passes_logged
        with ev.sampler.log_lap():
            record = ev._log(final=False, keep=False, contain=contain)
        if not ev._read_failed:  # (else they are read, and counted, at the next log)
            ev._passes_logged = ev.probe.passes
        return record

    def _count_open_window(self) -> Callable[[], None] | None:
        """An evaluation stream's steps are its passes: its open window holds those since
        its last log, which ``doc.eval.to_pandas()``/``current()`` read (a T5 trial's read
        between logs found the last closed window, or nothing before the first). Not with
        several processes: a read of an open window is a collective there, which a
        process that ran no evaluation pass would not join. The counts go back after the
        read: kept, a checkpoint saved then resumed with a window not logged yet, and
        dropped the evaluation record logged at that step (a review)."""
        training = self._training_doctor() if self._training_doctor is not None else None
        if training is None or self.all_reduce is not None:
            return None
        was = self.global_step, self.window_steps, self.steps_run

        def restore() -> None:
            self.global_step, self.window_steps, self.steps_run = was

        self.global_step = training.global_step  # (the step its window is read at)
        self.window_steps = self.steps_run = self.probe.passes - self._passes_logged
        return restore

    @contextlib.contextmanager
    def paused(self) -> Iterator[Doctor]:
        """Leave out every forward pass run inside the block, from both streams, and every
        activation called in it inside a pass (a forward hook of yours computing
        ``F.relu`` of a layer's output: a sequence trial's was a site of its own).

        Evaluation passes (eval mode, no grad) are left out of the training stream without
        it; use this for anything else (a probe pass, a metric computed in training mode).
        A backward run inside it keeps the gradients of the forward it differentiates.

        Example:
            >>> import torch, torch.nn as nn, relu_doctor
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            >>> with relu_doctor.watch(net) as doc:
            ...     with doc.paused():
            ...         _ = net(torch.randn(2, 4))  # a probe pass: not recorded
            ...     net(torch.randn(16, 4)).sum().backward()  # a training pass: recorded
            ...     _ = doc.step()
            >>> doc.history()["elements"].tolist()  # the training pass's 16 rows x 8 units
            [128.0]
        """
        probes = [self.probe] + ([self.eval.probe] if self.eval is not None else [])
        before = [(p.paused, p.paused_in_backward) for p in probes]
        backward = in_backward()  # (a hook of yours run again by a checkpoint's backward)
        for p in probes:
            p.paused, p.paused_in_backward = True, backward or p.paused_in_backward
        try:
            yield self
        finally:
            for p, (was, was_backward) in zip(probes, before, strict=True):
                p.paused, p.paused_in_backward = was, was_backward

    def _warn_no_site_yet(self, missing: str) -> None:
        """With several processes, a pass that ran no activation on this one is not an
        error: its branches may not have run here yet, and a process stepping aside would
        leave the others waiting in their cross-process sums. Said once; it goes on."""
        if self._warned_no_site:
            return
        self._warned_no_site = True
        warnings.warn(
            f"relu_doctor: {missing} With several processes it goes on watching, so that "
            "every process makes the same cross-process calls: a process whose branches "
            "ran no activation yet holds no site, and its windows are its own until it does.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def may_see_activations(self) -> bool:
        """Whether the model holds an activation this Doctor could watch (an activation
        module, or a module whose ``forward`` may call a functional one): a recorded pass
        that ran none then skipped them (a branch, stochastic depth), which is no error."""
        return bool(self.probe.targets()) or (
            self._capture is not None and self._capture.may_capture()
        )

    def _warn_none_ran(self) -> None:
        """Once, at a log with no site yet while the model holds activations it could
        watch (see :meth:`may_see_activations`): nothing has been collected so far."""
        if self._warned_no_site or self.missing_activations() is None:
            return
        self._warned_no_site = True
        modules = len(self.probe.targets())
        warnings.warn(
            f"relu_doctor: no watched activation ran in the {self.probe.passes} recorded "
            f"forward passes of {type(self.model).__name__} up to step {self.global_step} "
            f"({modules} activation module{'s' if modules != 1 else ''} watched"
            f"{', functional calls captured' if self.functional else ''}), so nothing has "
            f"been collected yet{held_instead(self.model)}. It goes on watching. "
            + (f"{func} " if (func := transformed_text(self.probe.transformed_calls)) else "")
            + "If its activations should have run, check that they run in training passes "
            "(model.train(), gradients enabled) on floating-point tensors, and that "
            "include/exclude select them; an activation computed inline (GPT-OSS's "
            "gate * torch.sigmoid(gate * alpha), x * torch.sigmoid(x)) calls no activation "
            "a hook can see.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def missing_activations(self) -> str | None:
        """Why there is nothing to watch, once a recorded forward pass ran no ReLU-family
        activation (or the model can show none); None otherwise. Python only (no sync)."""
        if self._has_sites or self.probe.sites():
            self._has_sites = True
            return None
        outside = 0 if self._capture is None else self._capture.outside_calls
        return self.probe.missing_activations(functional=self.functional, outside_calls=outside)

    def site_key(self, name: str) -> SiteKey:
        """The :class:`~relu_doctor.sites.SiteKey` of the site whose display name is ``name``."""
        return self.probe.site(name).key

    @property
    def records(self) -> list[IntervalRecord]:
        """The latest ``keep_records`` interval records (memory stays bounded)."""
        return list(self._records)

    @property
    def sites(self) -> list[Site]:
        return self.probe.sites()

    @property
    def collecting(self) -> bool:
        """Whether the step now running collects statistics (chosen at the previous
        :meth:`step`, by the fixed rate or the overhead budget); each window's record
        counts the steps collected (``steps_collected``)."""
        return self.probe.collecting

    def _make_tap(self, opts: list[torch.optim.Optimizer], pre_hook: bool) -> OptimizerTap | None:
        """The optimizer tap reading ``opts`` for this Doctor (None where there are none)."""
        if not opts:
            return None
        return OptimizerTap(self.model, opts, is_update_step=self._update_step,
                            collecting=self._collecting, pre_hook=pre_hook,
                            stopwatch=self.stopwatch)

    def set_optimizer(self, optimizer: Any) -> None:
        """Read the per-layer gradient norms, update ratios and learning rates from
        ``optimizer`` (one, a list, or None: none) from now on, in place of those given
        as ``optimizer=``: training went on with a new one (a second phase, a model grown
        and its optimizer made again). The open window's per-layer sums so far (the old
        one's) are dropped. Remedies made with the old one keep it: make them anew."""
        opts: list[torch.optim.Optimizer] = optimizers_arg("optimizer", optimizer)
        old = self.tap
        if old is not None:
            old.detach()
        self._optimizers = opts
        self.tap = self._make_tap(opts, old.pre_hook if old is not None else True)
        if self.tap is not None and self.probe.attached:
            self.tap.attach()
        # (the open window's steps so far are none of the new one's to step at)
        self._step_calls = [0, -self.window_steps, 0, 0, 0]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers given as ``optimizer=`` (a recycler bound without its own resets
        their state for the units it recycles)."""
        return list(self._optimizers)

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
            device = model_device(self.model)  # (a restored window may be elsewhere)
            summed, _ = self.sum_across(
                {t: st["window"] if device is None else st["window"].to(device)
                 for t, st in sites.items()}, device, purpose="checkpoint",
            )
            sites = {t: {**st, "window": summed[t]} for t, st in sites.items()}
        # an integration's loss for the guard, summed over the open window's batches
        window_loss = self.window_loss.state_dict()
        if reduce and self._training_doctor is None:  # (an evaluation stream reads none)
            total, count = self._loss_across(
                0.0 if window_loss["total"] is None else window_loss["total"], window_loss["count"])
            window_loss = {"total": total if count else None, "count": count}
        # an evaluation stream's passes in its open window (its steps are its passes),
        # summed with its windows (a review: a 2-process resume logged half of them)
        passes_open = (self.probe.passes - self._passes_logged
                       if self._training_doctor is not None else 0)
        if reduce and self._training_doctor is not None:
            passes_open = round(float(self.reduce_sum([torch.tensor(
                float(passes_open), dtype=torch.float64,
                device=model_device(self.model) or torch.device("cpu"))])[0]))
        return {
            "global_step": self.global_step,
            "window_steps": self.window_steps,
            "steps_run": self.steps_run,
            "window_scheduled": self._window_scheduled,
            "lifetime_steps": None if self._lifetime_steps is None else list(self._lifetime_steps),
            "lifetime_since": self._lifetime_since,
            # (read back: a sync, as a checkpoint makes; every process skips the same steps)
            "scaler_skipped": self._peek_skipped(),
            "training_metrics": self._training.state_dict(),
            "window_loss": window_loss,
            "sites": sites,
            "findings_open": self._tracker.state_dict(),
            # sites made anew since the last log: their findings begin anew at the next
            "findings_restarted": sorted(self._tracker.restarted),
            "grad_norm_history": list(self._grad_norm_history),
            "declined": {site: sorted(r) for site, r in self._declined.items()},
            # the baselines (each site's first RMS, its growth base) and the remedy changes
            # already said: a resumed run judges growth and says each first change as one run
            # would
            "first_rms": dict(self._first_rms),
            "growth_base": dict(self._growth_base),
            # each unit's past, which a sampled window's silent units are judged on
            "silence": self._silence.state_dict(),
            "announced": sorted([remedy, site] for remedy, site in self._announced),
            "tap": self.tap.state_dict() if self.tap is not None else None,
            "eval": None if self.eval is None else self.eval.state_dict(reduce=reduce),
            "passes_open": passes_open,
            # (a load chooses which process restores the open window: see load_state_dict)
            "processes": self.processes,
            "rank": group_rank(),
            "reduced": bool(reduce and self.all_reduce is not None),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, windows: bool | None = None) -> None:
        """Restore from :meth:`state_dict`. Sites not yet seen are restored on first call.

        Args:
            state: from :meth:`state_dict`.
            windows: restore the open windows too. Default: where several processes load a
                state whose windows are whole (saved with ``reduce=True``, the sums of all,
                or by a single process), by process zero alone; else by every process. A
                state of several processes saved without ``reduce=True`` holds the saving
                process's part of the open window alone, which every process restores (said
                once): the window after the resume counts that part once a process (a Fabric
                trial's ``fabric.save(..., {"relu_doctor": doc})``, every process's
                ``state_dict()`` unreduced and process zero's kept).
        """
        windows = self._restored_windows(state) if windows is None else bool(windows)
        self.global_step = int(state["global_step"])
        self.window_steps = int(state["window_steps"])
        self._unloaded_resume = None
        self._last_ahead = None  # (said of a step of the run before the checkpoint)
        since = state.get("lifetime_since")  # where the counts it restores began
        if since != self._lifetime_since:
            self._lifetime_since = since if isinstance(since, int) else None
            self._meta_dirty = True
        # the open window's steps: an evaluation stream's are its passes, counted apart
        evaluation = self._training_doctor is not None
        open_steps = int(state.get("passes_open") or 0) if evaluation else self.window_steps
        # the open window's passes before the checkpoint are not in it (see passes_seen)
        self.probe.passes_known = open_steps == 0
        if evaluation:  # (restored, they are logged with the passes that follow)
            self._passes_logged = self.probe.passes - (open_steps if windows else 0)
        # (a checkpoint from before steps_run was saved: every step of it collected)
        self.steps_run = int(state.get("steps_run", self.window_steps))
        self._window_scheduled = int(state.get("window_scheduled", self.window_steps))
        # (a checkpoint from before they were saved: unknown, and not said)
        steps = state.get("lifetime_steps")
        self._lifetime_steps = (int(steps[0]), int(steps[1])) if steps else None
        skipped = int(state.get("scaler_skipped") or 0)
        self._scaler_skipped = torch.tensor(skipped, dtype=torch.int64) if skipped else None
        if windows:  # (the sums are this process's: the one that carries the windows)
            self._training.load_state_dict(state.get("training_metrics", {}))
            self.window_loss.load_state_dict(state.get("window_loss"))
        else:
            self.window_loss.load_state_dict(None)
        self._passes_at_step = self.probe.passes
        self._tracker.load_state_dict(state.get("findings_open", state.get("began", [])),
                                      restarted=state.get("findings_restarted") or ())
        self._grad_norm_history = deque(
            (float(x) for x in state.get("grad_norm_history", [])), maxlen=GRAD_NORM_WINDOW
        )
        self._declined = {str(site): {str(r) for r in rs}
                          for site, rs in (state.get("declined") or {}).items()}
        self._first_rms.update({str(k): float(v) for k, v in (state.get("first_rms") or {}).items()})
        # (a checkpoint from before the growth base was saved: the first RMS, as it was then)
        base = state.get("growth_base", state.get("first_rms")) or {}
        self._growth_base.update({str(k): float(v) for k, v in base.items() if float(v) > 0})
        self._silence.load_state_dict(state.get("silence"))
        self._announced |= {(str(r), str(s)) for r, s in state.get("announced") or []}
        self._continue_after_checkpoint()
        if self.tap is not None and state.get("tap"):
            # The tap's window holds gradients already summed across processes (DDP): the
            # same on every rank, so every rank restores it.
            self.tap.load_state_dict(state["tap"])
        sites: Mapping[str, Any] = state.get("sites", {})
        if not windows:
            sites = {t: {**s, "window": torch.zeros_like(s["window"])} for t, s in sites.items()}
        self.probe.load_site_state(sites, functional=self.functional)
        self.probe.collecting = self._collecting()
        if self.eval is not None and state.get("eval"):
            self.eval._resumed_at = self.global_step
            self.eval.load_state_dict(state["eval"], windows=windows)
            self.eval._check_kept_log()

    def _restored_windows(self, state: Mapping[str, Any]) -> bool:
        """Whether this process restores a state's open windows (see :meth:`load_state_dict`)."""
        if self.processes <= 1 or "processes" not in state:
            return True  # (a state from before they were recorded: as then)
        saved_by, saver, rank = int(state["processes"] or 1), int(state.get("rank") or 0), group_rank()
        if saved_by <= 1 or state.get("reduced"):  # (the whole window: one process holds it)
            return rank == 0
        if saver != rank and state.get("window_steps"):
            warnings.warn(  # (each process that restores another's part says so)
                f"relu_doctor: the checkpoint's open window ({state['window_steps']} steps) "
                f"holds process {saver}'s statistics alone, of {saved_by} (saved by "
                f"state_dict() without reduce=True), and process {rank} restores them as its "
                "own: the window closing after the resume "
                "counts that part more than once and the others' not. For an exact resume, "
                "save doc.state_dict(reduce=True), called on every process (the README's "
                "'Distributed' section).",
                ReluDoctorWarning, stacklevel=user_stacklevel())
        return True

    def __repr__(self) -> str:
        return (
            f"Doctor(sites={len(self.probe.sites())}, step={self.global_step}, "
            f"attached={self.probe.attached})"
        )


#: the models told that they hold ReLU-like activations of no family (Doctor._say_relu_like)
_TOLD_RELU_LIKE: weakref.WeakSet[nn.Module] = weakref.WeakSet()

#: set while a Doctor makes its evaluation stream's Doctor (eval_stream=): what the
#: training Doctor said of its arguments is not said again
_MAKING_EVAL_STREAM: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "relu_doctor_making_eval_stream", default=False)


def _encoder_decoder(model: nn.Module) -> str:
    """The class of the part of ``model`` that runs two stacks on sequences of their own
    lengths, a Hugging Face encoder-decoder (T5, BART, Whisper...) or torch's
    ``nn.Transformer``, the model itself or held in it (a LightningModule's, a wrapper's:
    a review); "" where none."""
    for m in model.modules():
        if bool(getattr(getattr(m, "config", None), "is_encoder_decoder", False)) or \
                isinstance(m, nn.Transformer):
            return type(m).__name__
    return ""


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
    others = [d for d in _WATCHING if d.probe.model is model and d.probe.attached]
    if others:  # (a notebook cell run again: a trial's model ended up with three Doctors)
        where = others[0].run_dir
        warnings.warn(
            f"relu_doctor: {type(model).__name__} is already watched by another Doctor, "
            f"still attached ({'run_dir ' + repr(str(where)) if where else 'no run_dir'}): "
            "each counts what it watches of every pass, at its own cost. A cell run again? "
            "Call the other's "
            "close() (or leave its with block) first.",
            ReluDoctorWarning, stacklevel=2)
    _WATCHING.add(doc)
    return doc.attach()


#: the Doctors :func:`watch` made, while they live (see its warning)
_WATCHING: weakref.WeakSet[Doctor] = weakref.WeakSet()


