"""What the Keras and Hugging Face adapters share: importing the framework with a clear
message, findings as warnings once per (stream, kind, site), and the model-wide numbers
handed to the framework's own logs.

Framework-free: nothing here imports keras or transformers.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn as nn

from relu_doctor._validate import flag as flag
from relu_doctor._validate import path_or_none
from relu_doctor.diagnosis import SEVERITIES, Finding
from relu_doctor.diagnosis import check_warn as check_warn
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.history import IntervalRecord
from relu_doctor.reports import tensorboard as tb
from relu_doctor.reports.tensorboard import check_metrics as check_metrics
from relu_doctor.rundir import fresh_dir as fresh_dir

__all__ = [
    "FindingWarner",
    "check_metrics",
    "check_run_dir",
    "check_warn",
    "flag",
    "flush_and_detach",
    "fresh_dir",
    "health_scalars",
    "keras_import_error",
    "missing",
    "plan_options",
    "record_scalars",
    "remedies_on",
    "remedy_options",
    "safe_step",
    "summary_scalars",
]


def check_run_dir(value: object) -> str | os.PathLike[str] | None:
    """A ``run_dir`` argument: a path or None."""
    out: str | os.PathLike[str] | None = path_or_none("run_dir", value)
    return out


def safe_step(
    doctor: Doctor, step_aside: Callable[[], None], *, last: bool = False
) -> IntervalRecord | None:
    """``doctor.step(last=last)``; an error there (nothing to watch, a failing remedy) is one
    :class:`~relu_doctor.errors.ReluDoctorWarning` and ``step_aside()``: the user's training
    goes on without relu_doctor."""
    try:
        return doctor.step(last=last)
    except Exception as e:
        warnings.warn(
            f"relu_doctor: {e} The relu_doctor callback steps aside; training goes on.",
            ReluDoctorWarning,
            stacklevel=3,
        )
        step_aside()
        return None


def flush_and_detach(doctor: Doctor, detach: Callable[[], None]) -> None:
    """At the end of training: log the last, partial window (if it holds any step; a
    ``final`` record, which remedies hold, changing nothing), then ``detach()`` and close the run
    directory (its lock released, so a next run can resume it) whatever happens."""
    try:
        doctor.log_final(stacklevel=3)  # warns, never raises: the end of training is the user's
    finally:
        detach()
        doctor.close()


def missing(package: str, error: ImportError, *, what: str, install: str) -> ReluDoctorError:
    """The error for an adapter whose framework ``package`` cannot be imported: it names the
    package and how to install it."""
    return ReluDoctorError(
        f"{what} needs the {package!r} package, which is not installed ({error}); "
        f"install it with `pip install {install}`."
    )


def keras_import_error(error: ImportError) -> Exception:
    """Why ``import keras`` failed: keras missing, or keras there and its backend not (a
    ``KERAS_BACKEND`` or ``keras.json`` naming tensorflow or jax, not installed)."""
    import importlib.util

    if error.name in (None, "keras") or importlib.util.find_spec("keras") is None:
        return missing("keras", error, what="relu_doctor.integrations.keras",
                       install="'keras>=3'")
    backend = os.environ.get("KERAS_BACKEND")
    where = (f"KERAS_BACKEND={backend}" if backend else
             "KERAS_BACKEND is unset, so keras.json in $KERAS_HOME or ~/.keras names it")
    return ReluDoctorError(
        f"relu_doctor.integrations.keras: keras is installed, but importing it failed on its "
        f"backend ({error}; {where}). relu_doctor watches Keras 3 on the torch backend: set "
        "the environment variable KERAS_BACKEND=torch before importing keras."
    )


def remedy_options(
    name: str,
    value: object,
    remedy: Callable[..., Any],
    *,
    supplied: Sequence[str] = (),
    stand_in: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """A remedy switch: False/None (off), True (defaults) or a dict of keyword arguments of
    ``remedy`` (the class the adapter makes), checked now, not when training starts. Its keys
    against ``remedy``'s signature: neither an argument the adapter gives from the training
    framework (``remedy``'s required ones and ``supplied``) nor one it does not take. Its
    values by making ``remedy(**stand_in, **value)`` and dropping it, ``stand_in`` holding the
    required arguments (an ``nn.Identity()`` for a model), as the Lightning callbacks do."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ReluDoctorError(
            f"{name}: expected True, False or a dict of {remedy.__name__}'s keyword arguments, "
            f"got {value!r}."
        )
    params = list(inspect.signature(remedy).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(value)  # takes any keyword: nothing to check here
    framework = [p.name for p in params
                 if p.default is p.empty or p.kind is p.POSITIONAL_ONLY or p.name in supplied]
    allowed = [p.name for p in params
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in framework]
    for key in value:
        if key in framework:
            raise ReluDoctorError(
                f"{name}: leave {key!r} out of the dict: {framework} come from the training "
                f"framework. {remedy.__name__}'s other arguments: {allowed}."
            )
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            raise ReluDoctorError(
                f"{name}: {key!r} is not an argument of {remedy.__name__}; it takes {allowed}."
                + (f" Did you mean {near[0]!r}?" if near else "")
            )
    opts = dict(value)
    try:
        remedy(**(stand_in or {}), **opts)  # the remedy checks every value, now
    except (ReluDoctorError, TypeError) as e:
        raise ReluDoctorError(f"{name}: {e}") from None
    return opts


class FindingWarner:
    """Raises each finding once per (stream, kind, site) as a
    :class:`~relu_doctor.errors.ReluDoctorWarning` carrying the remedy.

    Args:
        level: lowest severity warned about, or None for none.
        emit: how to warn (default ``warnings.warn``; a multi-process trainer passes a
            rank-zero version).
        on: the remedies this run has on, by the name their remedy texts give them
            (``"leaky_relu_swap=True"``, ``"LeakyReluSwap"``), each with what tells whether
            it acts at a site (:meth:`~relu_doctor.remedies.Remedy.acts_at`; None: at every
            site), or ``{"plan": None}`` for the treatment plan: a remedy text that names one
            says it is on, not to switch it on.
    """

    def __init__(self, level: str | None, emit: Callable[[str], Any] | None = None,
                 on: Mapping[str, Callable[[str], bool] | None] | None = None) -> None:
        self.level = level
        self.emit = emit or (lambda text: warnings.warn(text, ReluDoctorWarning, stacklevel=3))
        self.on = dict(on or {})
        self._warned: set[tuple[str, str, str]] = set()

    def __call__(self, record: IntervalRecord, stream: str = "") -> None:
        if self.level is None:
            return
        floor = SEVERITIES.index(self.level)
        for f in record.findings:
            key = (stream, f.kind, f.site)
            if key in self._warned or SEVERITIES.index(f.severity) < floor:
                continue
            self._warned.add(key)
            self.emit(warning_text(f, stream) + (
                f" (Found in the {stream} passes: the remedies act on what training shows, "
                "not on these.)" if stream and self.on else self._already(f)))

    def state_dict(self) -> list[list[str]]:
        """The findings already warned about, as ``[stream, kind, site]``: a checkpoint keeps
        them, so that a run resumed in a new process does not warn about them again."""
        return sorted(list(key) for key in self._warned)

    def load_state_dict(self, warned: Sequence[Sequence[str]]) -> None:
        """Take back :meth:`state_dict`'s list (added to those warned about already)."""
        self._warned |= {(str(a), str(b), str(c)) for a, b, c in warned}

    def _already(self, f: Finding) -> str:
        """What the run already has on of what ``f``'s remedy advises."""
        if "plan" in self.on:  # (where the text names the plan's step, it says so itself)
            return ("" if "treatment plan bound here" in f.remedy.lower() else
                    " (The treatment plan is on: it decides which remedy acts, and when.)")
        named = [n for n in self.on if n in f.remedy]
        acting = [n.removesuffix("=True") for n in named
                  if (at := self.on[n]) is None or at(f.site)]
        left_out = [n.removesuffix("=True") for n in named if n.removesuffix("=True") not in acting]
        text = ""
        if acting:
            one = len(acting) == 1
            text += (f" ({', '.join(acting)} {'is' if one else 'are'} on in this run: "
                     f"{'it acts' if one else 'they act'} by {'its' if one else 'their'} own "
                     f"rule, and {'says' if one else 'say'} when {'it does' if one else 'they do'}.)")
        if left_out:
            one = len(left_out) == 1
            text += (f" ({', '.join(left_out)} {'is' if one else 'are'} on in this run, but "
                     f"{'does' if one else 'do'} not act at {f.site}: {'its' if one else 'their'}"
                     f" include/exclude, or the kind of site {'it treats' if one else 'they treat'}"
                     ", leave it out.)")
        return text


def warning_text(f: Finding, stream: str = "") -> str:
    """One finding in one line, with its remedy."""
    where = f"{stream} " if stream else ""
    return (
        f"relu_doctor: {where}{f.kind} at {f.site} (step {f.step}, {f.severity}): "
        f"{f.message} Remedy: {f.remedy}"
    )


def remedies_on(remedies: Mapping[str, Any]) -> dict[str, Callable[[str], bool] | None]:
    """What a :class:`FindingWarner` is told is on (its ``on``) of a loop's remedies, by
    their switches' names (``{"leaky_relu_swap": swapper}`` gives
    ``{"leaky_relu_swap=True": swapper.acts_at}``); ``{"plan": None}`` with the treatment
    plan."""
    if "treatment_plan" in remedies:
        return {"plan": None}
    return {f"{name}=True": r.acts_at for name, r in remedies.items()}


def summary_scalars(record: IntervalRecord, prefix: str = tb.PREFIX) -> dict[str, float]:
    """Model-wide numbers of one record, unit-weighted over every site
    (:func:`~relu_doctor.diagnosis.run_health`): ``<prefix>/dead_fraction``,
    ``<prefix>/dormant_fraction``, ``<prefix>/lifetime_dead_fraction`` (finite ones only)."""
    health = record.health
    return {f"{prefix}/{k}": float(v) for k, v in health.items()
            if k != "health" and math.isfinite(v)}


def health_scalars(record: IntervalRecord, prefix: str = tb.PREFIX) -> dict[str, float]:
    """The run-level numbers of one record for the framework's early stopping and
    checkpointing (``<prefix>/health``, higher is better; ``<prefix>/dead_fraction``...):
    :func:`~relu_doctor.diagnosis.run_health`, as the Lightning monitor puts them in
    ``trainer.callback_metrics`` (finite ones only)."""
    health = record.health
    return {f"{prefix}/{k}": float(v) for k, v in health.items() if math.isfinite(v)}


def plan_options(value: object, *, others: Mapping[str, object]) -> dict[str, Any] | None:
    """A ``treatment`` switch: False/None (off), True (the default plan) or a dict of
    :class:`~relu_doctor.remedies.TreatmentPlan` keyword arguments (``steps``, ``cooldown``,
    ``stop_when_hopeless``...), checked now. Refused beside a single-remedy switch of
    ``others`` that is on: the plan is the one decider."""
    from relu_doctor.remedies.plan import TreatmentPlan

    opts = remedy_options("treatment", value, TreatmentPlan, supplied=("optimizer", "schedulers"),
                          stand_in={"model": nn.Identity()})
    if opts is None:
        return None
    on = [name for name, v in others.items() if v is not None and v is not False]
    if on:
        raise ReluDoctorError(
            f"treatment: the plan decides every remedy, but {on} are switched on as well (they "
            "would act on the same symptom at once); switch them off, or configure them as "
            "plan steps (treatment={'steps': [PlanStep(...), ...]})."
        )
    return opts


def record_scalars(
    record: IntervalRecord, metrics: Sequence[str], prefix: str = tb.PREFIX
) -> dict[str, float]:
    """Every scalar of one record under TensorBoard's tags: the model-wide numbers, each
    site's ``metrics`` and the per-layer gradient norms (the tags the Lightning monitor and
    the run directory's event files use)."""
    return {
        **summary_scalars(record, prefix),
        **tb.scalars(record.site_rows, record.layer_table, metrics=metrics, prefix=prefix),
    }
