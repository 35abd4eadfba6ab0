"""Keras 3 (torch backend): ``ReluDoctorCallback`` makes relu_doctor one line in ``model.fit``.

A thin adapter: statistics, windows, diagnosis, the run directory and its TensorBoard files
live in :class:`~relu_doctor.Doctor`; this module decides *when* (which Keras callback
events attach, mark steps, pause, log) and *what* the sites are (Keras layers, see
:mod:`relu_doctor.integrations._keras_layers`).

==========================  ===================================================================
``on_train_begin``          check the model is built, find the sites, build the Doctor (run
                            directory), hook the layers, bind the remedies
``on_train_batch_end``      one step per optimizer step (``gradient_accumulation_steps``
                            respected); an interval that closes is logged and warned about;
                            a treatment plan that found the run hopeless stops ``fit``
                            (``model.stop_training``)
``on_test_begin/end``       validation passes run with the model in eval mode and gradients
                            off: left out of the training stream, or collected as the
                            evaluation stream (``monitor_validation=True``)
``on_epoch_end``            run-level numbers into Keras' ``logs`` (``relu_doctor/health``,
                            ``relu_doctor/dead_fraction``...) for ``History``, ``TensorBoard``,
                            ``EarlyStopping`` and ``ModelCheckpoint``
``on_train_end``            log the last, partial window; write the report when asked; unhook
==========================  ===================================================================
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
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
    keras_import_error,
    plan_options,
    remedies_on,
    remedy_options,
    safe_step,
)

try:
    import keras
except ImportError as e:
    raise keras_import_error(e) from None

import torch

from relu_doctor._validate import glob_patterns, matches, positive_int
from relu_doctor.diagnosis import DiagnosisConfig, diagnosis_config
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning, user_stacklevel
from relu_doctor.history import IntervalRecord
from relu_doctor.integrations._keras_layers import (
    FrozenLayers,
    KerasSite,
    UnseenCalls,
    find_sites,
    say_unseen,
)
from relu_doctor.integrations._keras_remedies import (
    KerasActivationSwap,
    KerasAutoClip,
    KerasLRRescue,
    LossScale,
    clips_already,
    keras_plan,
    keras_plan_options,
    lr_value,
    refuse_clipping,
    refuse_several,
    several,
    updating,
)
from relu_doctor.remedies.clipping import AutoClip
from relu_doctor.remedies.plan import TreatmentPlan
from relu_doctor.sampling import DEFAULT_BUDGET, check_rate

__all__ = ["ReluDoctorCallback"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise ReluDoctorError(
            f"keras backend: relu_doctor watches Keras 3 on the torch backend, but Keras runs "
            f"on {backend!r}; set the environment variable KERAS_BACKEND=torch before "
            "importing keras."
        )


class ReluDoctorCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Watch a Keras model's ReLU-family activations during ``model.fit``.

    Sites are Keras layers (``dense_1``, ``conv2d``, ``inner/dense``; an activation layer by
    its own name); units are a layer's ``units``/``filters``. Each logging interval goes to
    the run directory (with its TensorBoard event files), findings are raised once per (kind, site) as
    :class:`~relu_doctor.errors.ReluDoctorWarning`, and the run-level numbers of
    :func:`~relu_doctor.diagnosis.run_health` go into the epoch's ``logs``
    (``relu_doctor/health``, ``relu_doctor/dead_fraction``...).

    Another ``fit`` of the model of the last ``fit`` (a loop of one-epoch fits) continues
    the run: the same directory, steps counted on, the remedies going on where they
    stopped. The callback passed to the ``fit`` of another model (a hyper-parameter search)
    starts a new run for it, carrying nothing over, its epochs' logs included; so does a
    model fitted again after another. A new run needs a directory of its own: a ``run_dir``
    given here holds the first model's run, and is refused for the second.

    Args:
        log_every_n_steps: optimizer steps per logging interval (the window for "dead").
        every_n_steps: a fixed rate (collect every n-th optimizer step), or ``"auto"``
            (default): the rate ``overhead_budget`` chooses.
        overhead_budget: the largest fraction of a step the statistics may cost (default
            0.03, see :class:`~relu_doctor.Doctor`); None collects every step.
        tau: dormant threshold on the ReDo score (default 0.1).
        include: glob patterns of site paths to watch (default: every site).
        exclude: glob patterns of site paths to leave out.
        run_dir: the run directory; a directory holding a run is refused unless
            ``resume=True``. Default ``./relu_doctor_logs/<model name>`` (``_1``, ``_2``...
            when that holds an earlier run).
        resume: continue the run already in ``run_dir``.
        gradients: collect gradient statistics (dL/d(output), zero dL/d(input)).
        monitor_validation: also collect validation passes, as the evaluation stream
            (``<run_dir>/validation``).
        config: diagnosis thresholds.
        metrics: site metrics logged as TensorBoard scalars.
        warn: lowest finding severity raised as a warning, or None.
        report: write ``<run_dir>/report.html`` when ``fit`` ends.
        leaky_relu_swap: swap dying ReLUs for LeakyReLU: True, or a dict of
            :class:`~relu_doctor.integrations._keras_remedies.KerasActivationSwap` arguments
            (``slope``, ``threshold``, ``patience``).
        lr_rescue: scale the optimizer's learning rate down on exploding gradients or a
            dying surge: True, or a dict (``factor``, ``min_lr``, ``cooldown``, ``dead_jump``).
        autoclip: AutoClip the gradients in the optimizer: True, or a dict of
            :class:`~relu_doctor.remedies.AutoClip` arguments (``percentile``...).
        treatment: treat the run with a :class:`~relu_doctor.remedies.TreatmentPlan`
            instead of the single remedies above (refused beside them): True (the default
            plan: clipping, the learning rate, the LeakyReLU swap), or a dict of its
            arguments (``steps``, ``cooldown``, ``stop_when_hopeless``...). Its learning-rate
            step scales the Keras optimizer's ``learning_rate``, its swap step changes the
            layer, its clipper clips inside the optimizer's ``apply`` (idle when the
            optimizer has ``clipnorm``..., said once). ReDo recycling and Continual Backprop re-initialise
            torch modules and are refused. With ``stop_when_hopeless`` a hopeless run stops
            ``fit`` (``model.stop_training``) after a ``stop`` intervention with its evidence.

    Attributes:
        doctor: the :class:`~relu_doctor.Doctor` (None before the first fit).
        sites: the watched :class:`~relu_doctor.integrations._keras_layers.KerasSite` by path:
            the layers hooked, each a site of ``doctor.sites`` once it runs (a layer held
            as an attribute that ``call()`` never runs is hooked, and is no site).
        remedies: the remedies in use, by name (the plan: ``"treatment_plan"``).

    Example::

        from relu_doctor.integrations.keras import ReluDoctorCallback

        model.fit(x, y, epochs=5, callbacks=[ReluDoctorCallback(run_dir="runs/keras")])
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
        resume: bool = False,
        gradients: bool = True,
        monitor_validation: bool = False,
        config: DiagnosisConfig | None = None,
        metrics: Sequence[str] | None = None,
        warn: str | None = "warning",
        report: bool = False,
        leaky_relu_swap: bool | Mapping[str, Any] = False,
        lr_rescue: bool | Mapping[str, Any] = False,
        autoclip: bool | Mapping[str, Any] = False,
        treatment: bool | Mapping[str, Any] = False,
    ) -> None:
        _check_backend()
        super().__init__()
        self.log_every_n_steps = positive_int("log_every_n_steps", log_every_n_steps)
        self.every_n_steps, self.overhead_budget = check_rate(every_n_steps, overhead_budget)
        self.config = replace(diagnosis_config(tau, config), loop="keras")  # its names
        self.include = glob_patterns("include", include)
        self.exclude = glob_patterns("exclude", exclude)
        self.run_dir = check_run_dir(run_dir)
        self.resume = flag("resume", resume)
        self.gradients = flag("gradients", gradients)
        self.monitor_validation = flag("monitor_validation", monitor_validation)
        self.metrics = check_metrics(metrics)
        self.warner = FindingWarner(check_warn(warn))
        self.report = flag("report", report)
        self._swap_opts = remedy_options("leaky_relu_swap", leaky_relu_swap, KerasActivationSwap,
                                         stand_in={"sites": {}})
        self._lr_opts = remedy_options("lr_rescue", lr_rescue, KerasLRRescue,
                                       stand_in={"optimizer": None})
        self._clip_opts = remedy_options("autoclip", autoclip, AutoClip)
        plan = plan_options(treatment, others={"leaky_relu_swap": leaky_relu_swap,
                                               "lr_rescue": lr_rescue, "autoclip": autoclip})
        self._plan_opts = keras_plan_options(plan) if plan is not None else None
        self.doctor: Doctor | None = None
        self.sites: dict[str, KerasSite] = {}
        self.remedies: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._site_handles: list[tuple[Any, Any]] = []  # (probe, handle in its hook set)
        self._calls: dict[tuple[int, int], int] = {}
        self._failed: set[str] = set()
        self._stopped = False
        self._clipper: KerasAutoClip | None = None
        self._fitted: weakref.ref[Any] | None = None  # the model of the last fit
        self._batches = 0
        self._accumulate = 1
        self._opt: Any = None  # the model's optimizer, for the learning rate
        self._val_passes = 0  # the validation stream's passes as a validation run began
        self._warned_jit_val = False
        self._lr_used: float | None = None  # the logging step's rate, read as it began
        self._epoch = 0
        self._fresh: IntervalRecord | None = None  # logged since the last epoch's end
        self._val_doc: Doctor | None = None
        self._no_sites = False  # this fit's model has no site: the callback stepped aside
        self._said_scalar: set[str] = set()  # layers said to run on one value per sample
        self._in_batch = False  # between this callback's train batch begin and end
        self._inference_in_batch = 0  # passes with gradients in a train batch, training=False
        self._training_passes = 0  # passes taken as training ones, collecting or not
        self._unseen: UnseenCalls | None = None  # this fit's search (see UnseenCalls)
        # Keras' loss tracker (sum, count) as the batch began: see _take_loss
        self._loss_at: tuple[float, float] | None = None

    # ------------------------------------------------------------------ fit lifecycle
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        if not getattr(model, "built", False):
            raise ReluDoctorError(
                f"model: the Keras model {model.name!r} is not built, so its layers have no "
                "weights or shapes yet; give it an input shape (keras.Input(...) first, or "
                "model.build(input_shape)) before fit."
            )
        if self.doctor is not None:
            # Where the last fit raised (an error, Ctrl-C), Keras called no on_train_end: end
            # that fit as on_train_end does (its partial window logged, its run directory
            # closed, so this fit can go on in it). After an on_train_end, nothing is left to do.
            flush_and_detach(self.doctor, self._detach)
        self._detach()
        self._stopped = False
        self._failed = set()
        self._unseen = None  # (searched again in this fit's first recorded training pass)
        self.sites = {
            s.path: s
            for s in find_sites(model, lambda p: matches(p, self.include, self.exclude))
        }
        self._no_sites = not self.sites
        if self._no_sites:  # (one callback list over several models: a tanh LSTM too)
            # (nothing of a previous fit's Doctor reaches this fit's logs: its health keys
            # would feed EarlyStopping on another model)
            self._stopped, self._val_doc, self._fresh = True, None, None
            warnings.warn(
                f"relu_doctor: no layer of {model.name!r} runs a ReLU-family activation that "
                "relu_doctor can watch"
                f"{' after include/exclude' if (self.include or self.exclude) else ''}; "
                "relu_doctor watches Dense/Conv layers with activation='relu' (relu6, "
                "leaky_relu, elu, selu, gelu, silu) and ReLU/LeakyReLU/ELU/PReLU/Activation "
                "layers, in nested models and custom layers too; an activation called as a "
                "function in a layer's call() (keras.ops.relu(x)) is not seen: make it a "
                "keras.layers.ReLU() or the layer's activation='relu'. The relu_doctor "
                "callback steps aside for this fit; training goes on.",
                ReluDoctorWarning,
                stacklevel=user_stacklevel(),
            )
            return
        # What the remedies refuse, before anything is hooked or written: a refused fit
        # leaves the model and its run directory as they were.
        opt = getattr(model, "optimizer", None)
        if self._lr_opts is not None:
            if opt is None:
                raise ReluDoctorError("lr_rescue: the model has no optimizer; compile it first.")
            refuse_several(opt, "lr_rescue")
        if self._clip_opts is not None:
            refuse_clipping(opt)
        earlier = (self.doctor, self.remedies)  # what a fit that fails below keeps
        if self._fitted is None or self._fitted() is not model:  # a new run
            self.doctor, self.remedies, self._fresh = None, {}, None
            self.warner = FindingWarner(self.warner.level, self.warner.emit)
        self._fitted = weakref.ref(model)
        state = self.doctor.state_dict() if self.doctor is not None else None
        if self.run_dir is not None:
            run_dir = Path(self.run_dir)
        elif self.doctor is not None and self.doctor.run_dir is not None:
            run_dir = self.doctor.run_dir  # a second fit continues the first's directory
        else:
            run_dir = fresh_dir(Path("relu_doctor_logs", model.name))
        doc = Doctor(
            model,
            log_every_n_steps=self.log_every_n_steps,
            every_n_steps=self.every_n_steps,
            overhead_budget=self.overhead_budget,
            gradients=self.gradients,
            config=replace(self.config, clipped_by=_clipped_by(model)),
            run_dir=run_dir,
            resume=self.resume or state is not None,
            functional=False,  # the layers are hooked here; F.relu inside them is theirs
            eval_stream="validation" if self.monitor_validation else False,
            grad_scaler=LossScale.of(opt),
        )
        if state is not None:  # a second fit continues the first
            doc.load_state_dict(state)
        frozen = FrozenLayers(model, self.sites)  # (its sites are Keras layers)
        for d in (doc, doc.eval):
            if d is not None:
                d.frozen_feed = lambda sites: frozen([s.module_path for s in sites])
        self.doctor = doc
        self._val_doc = doc.eval
        if doc.eval is not None:  # fit's validation runs only (on_test_begin to on_test_end)
            doc.eval.probe.paused = True
        doc.add_listener(self._on_record)
        try:
            doc.attach()
            # The sites are Keras layer paths, not torch module paths: given after attach,
            # which checks its patterns against the module paths, before the first site.
            for d in (doc, doc.eval):
                if d is not None:
                    d.probe.unit_dims.update(
                        {s.pattern: s.unit_dim for s in self.sites.values()})
                    d.probe.unit_rules.update(
                        {s.pattern: s.unit_rule for s in self.sites.values()})
                    d.probe.unit_norms.update(
                        {s.pattern: s.norm for s in self.sites.values() if s.norm})
                    d.probe.unit_mixed.update(
                        {s.pattern: s.mixed for s in self.sites.values() if s.mixed})
            self._hook(model)
            self._bind_remedies(model, doc)
        except BaseException:  # no hook left on the model, the run directory closed; a
            try:  # next fit goes on from the last one that ran (its Doctor's state)
                self._detach()
            finally:
                doc.close()
                self.doctor, self.remedies = earlier
            raise
        self._accumulate = int(getattr(updating(opt), "gradient_accumulation_steps", None) or 1)
        self._batches = 0
        self._loss_at = None
        # Its learning rate, read for logging steps only; a MultiOptimizer has none (its
        # sub-optimizers each have theirs): no rate recorded, training untouched.
        self._opt = opt if opt is not None and not several(opt) else None
        self._lr_used = None
        if self._opt is not None:
            doc.add_metric_source(self._lr_metric)

    def _hook(self, model: Any) -> None:
        probes = [d.probe for d in (self.doctor, self._val_doc) if d is not None]

        def begin(module: Any, args: Any, kwargs: Any) -> None:
            self._calls.clear()
            # A training pass: with gradients, called with training=True (Keras' train step)
            # or, where the call says nothing (a call() without a training argument, a custom
            # train_step's self(x)), inside a train batch of fit. Not the torch module's mode:
            # a predict() from a callback leaves it in eval until the next epoch.
            said = kwargs.get("training")
            # (inside this callback's train batch only: after a fit that raised, with the
            # hooks still on, a fit without the callback ran training=True passes, and a
            # Keras trial's next log held 30 of them)
            training = torch.is_grad_enabled() and self._in_batch and said is not False
            if said is False and self._in_batch and torch.is_grad_enabled():
                self._inference_in_batch += 1  # (a call() whose training defaults to False)
            self._training_passes += training
            for p in probes:
                p.begin_pass(training)
            if (self._unseen is None and training and probes[0].recording
                    and not torch.compiler.is_compiling()):  # (jit_compile=True: no mode)
                # (one recorded training pass: its ReLU-family functions that no site holds)
                self._unseen = UnseenCalls(model, self.sites)
                self._unseen.start()

        def end(module: Any, args: Any, output: Any) -> None:
            if sys.exc_info()[0] is not None:  # (always_call: the pass raised, so its fit
                self._in_batch = False  # ends unless its train_step catches it: no batch)
            for p in probes:
                p.end_pass()
            unseen = self._unseen
            if unseen is not None and unseen.searching:
                found = unseen.stop()
                if found:
                    say_unseen(model, found)

        self._handles.append(model.register_forward_pre_hook(begin, with_kwargs=True))
        self._handles.append(model.register_forward_hook(end, always_call=True))
        # One hook per layer and probe, in that probe's hook set: parked with its probe's
        # own hooks on a step that collects nothing (the validation stream's, never parked,
        # stay for the evaluation passes that run between steps).
        for p in probes:
            for site in self.sites.values():
                for layer in site.hooked:
                    handle = layer.register_forward_hook(self._make_hook(site, p))
                    self._site_handles.append((p, p.hooks.add(handle)))

    def _make_hook(self, site: KerasSite, probe: Any) -> Any:
        key = (id(probe), id(site.layer))

        def hook(layer: Any, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.device.type == "meta":
                return  # Keras' symbolic shape inference
            if not probe.recording:
                return
            if output.dim() <= 1:  # one value per sample (a batch's scalars): no units
                self._warn_scalar_site(site)
                return
            fam = site.family()
            if fam is None:
                return
            idx = self._calls.get(key, 0)
            self._calls[key] = idx + 1
            if site.path in self._failed:
                return
            try:
                probe.record(output, path=site.path, call_index=idx, family=fam,
                             module=site.layer)  # (its cap, for a capped ReLU layer)
            except Exception as e:  # never into the user's forward: warn once, step aside
                self._failed.add(site.path)
                warnings.warn(
                    f"relu_doctor: stopped watching Keras layer {site.path!r} "
                    f"({type(e).__name__}: {e}); training goes on.",
                    ReluDoctorWarning,
                    stacklevel=2,
                )

        return hook

    @property
    def plan(self) -> TreatmentPlan | None:
        """The :class:`~relu_doctor.remedies.TreatmentPlan` (with ``treatment``, once
        ``fit`` began)."""
        plan = self.remedies.get("treatment_plan")
        return plan if isinstance(plan, TreatmentPlan) else None

    def _bind_remedies(self, model: Any, doc: Doctor) -> None:
        earlier = self.remedies
        self.remedies = {}
        opt = getattr(model, "optimizer", None)
        if self._plan_opts is not None:
            plan, self._clipper = keras_plan(model, self.sites, opt, self._plan_opts)
            self.remedies["treatment_plan"] = plan.bind(doc)
        if self._swap_opts is not None:
            self.remedies["leaky_relu_swap"] = KerasActivationSwap(
                self.sites, **self._swap_opts
            ).bind(doc)
        if self._lr_opts is not None:
            self.remedies["lr_rescue"] = KerasLRRescue(opt, **self._lr_opts).bind(doc)
        if self._clip_opts is not None:
            clip = AutoClip(**self._clip_opts)
            self._clipper = KerasAutoClip(model, opt, clip).attach()
            self.remedies["autoclip"] = clip.bind(doc)
        for name, remedy in self.remedies.items():  # a second fit (a fit per epoch in a loop)
            old = earlier.get(name)  # goes on where the last one stopped, held record included
            if old is not None and type(old) is type(remedy):
                remedy.carry_from(old)
        self.warner.on = remedies_on(self.remedies)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def _last_step(self, batch: int) -> bool:
        """Whether the optimizer step that ``batch`` ends is the fit's last: its last epoch,
        with fewer batches left than an optimizer step takes (unknown where Keras does not
        know the steps per epoch: then the end of training logs what is left)."""
        epochs, steps = (self.params or {}).get("epochs"), (self.params or {}).get("steps")
        if not epochs or not steps or self._epoch != epochs - 1:
            return False
        return bool(steps - 1 - batch < self._accumulate)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._in_batch = True
        doc = self.doctor
        if doc is not None and not self._stopped:
            self._loss_at = _tracked_loss(self.model)
        if doc is None or self._stopped or (self._batches + 1) % self._accumulate:
            return  # (a batch that steps no optimizer)
        if self._last_step(batch):
            doc.expect_last_step()  # logged as a logging step is (its learning rate below)
        if self._opt is not None and doc._next_is_log_step():
            self._lr_used = self._read_lr()  # the rate this step uses, before it moves on

    def _read_lr(self) -> float | None:
        """The optimizer's learning rate now; where it cannot be read (an optimizer of the
        user's whose rate raises), None from then on, said once: training goes on."""
        if self._opt is None:
            return None
        try:
            return lr_value(self._opt)
        except Exception as e:
            self._opt = None
            warnings.warn(
                f"relu_doctor: the learning rate of the Keras optimizer cannot be read "
                f"({type(e).__name__}: {e}); it is not recorded. Training goes on.",
                ReluDoctorWarning,
                stacklevel=2,
            )
            return None

    def _lr_metric(self) -> dict[str, float]:
        """The learning rate of the logging step: read as it began (a schedule's value at
        its iteration), else now."""
        used, self._lr_used = self._lr_used, None
        lr = used if used is not None else self._read_lr()
        return {} if lr is None else {"lr": lr}

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._in_batch = False
        if self.doctor is None or self._stopped:
            return
        self._batches += 1
        if logs:  # the training curve: what Keras reports for the batch (loss, metrics)
            self.doctor.log_metrics({k: v for k, v in logs.items() if _is_number(v)})
        self._take_loss()
        if self._batches % self._accumulate == 0:  # one step per optimizer step
            if self._inference_in_batch and not self._training_passes:
                warnings.warn(
                    "relu_doctor: fit's train steps call the model with training=False (a "
                    "call() whose training argument defaults to False, called as self(x) in "
                    "a custom train_step: Keras then runs it as an inference pass, dropout "
                    "off), and relu_doctor counts training passes only. Call "
                    "self(x, training=True) in train_step. The relu_doctor callback steps "
                    "aside; training goes on.",
                    ReluDoctorWarning,
                    stacklevel=2,
                )
                self._step_aside()
                return
            safe_step(self.doctor, self._step_aside, last=self._last_step(batch))
            plan = self.plan
            if plan is not None and plan.should_stop:
                self.model.stop_training = True  # the plan's stop event holds the evidence

    def _take_loss(self) -> None:
        """Add the batch's loss to the window's (:attr:`Doctor.window_loss`, which the
        remedies' loss guard reads): what the batch added to Keras' loss tracker, read at
        its begin and end. Keras reports the tracker's running mean since the epoch began,
        whose window mean diluted a late jolt (a 10x jump at batch 28 of 40 read 1.86x);
        differencing those means went wrong where ``logs["loss"]`` is something else (a
        custom ``train_step``'s own loss; an ``evaluate`` mid-epoch, which resets the
        tracker: a review's 2.8x made up, and negative losses). A ``train_step`` that
        leaves the tracker alone adds nothing here: the guard then reads the window mean
        of ``logs["loss"]``."""
        at, self._loss_at = self._loss_at, None
        now = _tracked_loss(self.model) if at is not None else None
        if at is None or now is None or self.doctor is None or not now[1] > at[1]:
            return
        self.doctor.window_loss.add((now[0] - at[0]) / (now[1] - at[1]))

    def _warn_scalar_site(self, site: KerasSite) -> None:
        if site.path in self._said_scalar:
            return
        self._said_scalar.add(site.path)
        warnings.warn(
            f"relu_doctor: the Keras layer {site.path!r} runs on one value per sample (a 1-D "
            "output): its entries are a batch's samples, not units, so it is not watched. "
            "Training goes on; the other layers are watched as usual.",
            ReluDoctorWarning,
            stacklevel=user_stacklevel(),
        )

    def _step_aside(self) -> None:
        self._detach()
        self._stopped = True

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._val_doc is not None:
            self._val_doc.probe.paused = False
            self._val_passes = self._val_doc.probe.passes

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        val = self._val_doc
        if (val is not None and not self._warned_jit_val and val.probe.passes == self._val_passes
                and getattr(self.model, "jit_compile", False) is True):
            self._warned_jit_val = True  # (a compiled test step calls no hook as it runs)
            warnings.warn(
                "relu_doctor: the validation passes of this fit ran in a compiled step "
                "(jit_compile=True), where the validation stream records nothing; "
                "monitor_validation=True needs model.compile(..., jit_compile=False). The "
                "training stream is recorded as usual.",
                ReluDoctorWarning,
                stacklevel=2,
            )
        doc = self.doctor
        if doc is not None and doc.eval is not None and doc.probe.attached:
            rec = doc.log_eval()  # one evaluation-stream window per validation run
            if rec is not None:
                self.warner(rec, "validation")
        if self._val_doc is not None:  # (after the log: an empty window is said)
            self._val_doc.probe.paused = True  # a predict() or evaluate() of a user's is not

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # Only an interval logged during this epoch: the last one's numbers again would
        # make EarlyStopping's patience count one measurement as several epochs'.
        fresh, self._fresh = self._fresh, None
        if logs is not None and fresh is not None:
            logs.update(health_scalars(fresh))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        doc = self.doctor
        if doc is None or self._no_sites:  # (a fit it stepped aside from at its start)
            return
        flush_and_detach(doc, self._detach)
        if self.report and doc.run_dir is not None:
            from relu_doctor.reports import write_report

            try:  # (training ended: a report that cannot be made is said, not raised)
                write_report(doc.run_dir, doc.run_dir / "report.html")
            except Exception as e:
                warnings.warn(
                    f"relu_doctor: the report of {str(doc.run_dir)!r} could not be written "
                    f"({type(e).__name__}: {e}); its records are kept: `relu-doctor report "
                    f"{shlex.quote(str(doc.run_dir))} -o FILE.html` makes it where you choose.",
                    ReluDoctorWarning,
                    stacklevel=user_stacklevel(),
                )

    def _detach(self) -> None:
        if self._unseen is not None and self._unseen.searching:  # (a pass that never ended)
            self._unseen.stop()
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        site_handles, self._site_handles = self._site_handles, []
        for p, h in site_handles:
            p.hooks.remove([h])  # parked or not
        if self._clipper is not None:
            self._clipper.detach()
            self._clipper = None
        if self.plan is not None:
            self.plan.detach()
        if self.doctor is not None:
            self.doctor.detach()

    # ------------------------------------------------------------------ output
    def _on_record(self, record: IntervalRecord) -> None:
        self._fresh = record
        self.warner(record)


def _tracked_loss(model: Any) -> tuple[float, float] | None:
    """Keras' loss tracker of ``model`` (the ``Mean`` its ``train_step`` adds each batch's
    loss to, weighted by the batch's size), as (sum, count) read on the host; None where
    it has none. (Keras reads its logs back at every batch: the device is idle by then.)"""
    tracker = getattr(model, "_loss_tracker", None)
    try:
        total, count = tracker.total, tracker.count  # type: ignore[union-attr]
        return float(getattr(total, "value", total)), float(getattr(count, "value", count))
    except Exception:  # (another Keras, a custom model without one: no loss taken)
        return None


def _clipped_by(model: Any) -> str | None:
    """What clips the gradients of ``model``'s optimizer already (``clipnorm``...), as the
    gradient findings' advice says it."""
    optimizer = getattr(model, "optimizer", None)
    attr = clips_already(optimizer) if optimizer is not None else None
    return None if attr is None else (
        f"the optimizer's {attr}={getattr(updating(optimizer), attr):g}")
