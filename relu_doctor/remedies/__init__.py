"""Remedies: framework-free treatments of ReLU pathologies, one per module.

Each is usable from a plain PyTorch loop and wrapped by one thin Lightning callback in
:mod:`relu_doctor.callbacks`:

* :mod:`~relu_doctor.remedies.swap` -- replace a dying site's ReLU by LeakyReLU or PReLU
  (:func:`swap_activation`, :func:`restore_activation`, :class:`ActivationSwapper`);
* :mod:`~relu_doctor.remedies.clipping` -- adaptive gradient clipping (:class:`AutoClip`,
  :class:`AGC`);
* :mod:`~relu_doctor.remedies.lr` -- learning-rate rescue that the schedulers keep
  (:func:`scale_lr`, :class:`LRRescuer`);
* :mod:`~relu_doctor.remedies.recycle` -- ReDo recycling of dormant units
  (:func:`recycle_units`, :class:`DormantRecycler`), on the producer and consumer layers that
  :mod:`~relu_doctor.remedies.unit_links` finds (:func:`find_unit_links`);
* :mod:`~relu_doctor.remedies.continual_backprop` -- Continual Backprop (Dohare et al. 2024):
  recycle the lowest-utility mature units at a steady rate (:class:`ContinualBackprop`);
* :mod:`~relu_doctor.remedies.plan` -- the treatment plan that coordinates them: gentlest
  first, one change per site per cooldown, each judged on its target (:class:`TreatmentPlan`);
* :mod:`~relu_doctor.remedies.base` -- the protocol they share (:class:`Remedy`: decide from
  an interval record, act, record a typed intervention and, one interval later, its result).

Sites are identified by :class:`~relu_doctor.sites.SiteKey` values, never by parsing names.
To merge interventions with their results read from a run directory, use
``relu_doctor.load_run(dir).interventions()``.
"""

from __future__ import annotations

from relu_doctor.remedies.base import Remedy, model_snapshot, site_snapshot
from relu_doctor.remedies.clipping import AGC, AutoClip
from relu_doctor.remedies.continual_backprop import ContinualBackprop
from relu_doctor.remedies.lr import LRRescuer, scale_lr
from relu_doctor.remedies.plan import DEFAULT_STEPS, PlanStep, TreatmentPlan
from relu_doctor.remedies.recycle import DormantRecycler, recycle_units
from relu_doctor.remedies.swap import (
    ActivationSwapper,
    SwapRecord,
    restore_activation,
    swap_activation,
)
from relu_doctor.remedies.unit_links import Consumer, UnitLinks, find_unit_links

__all__ = [
    "AGC",
    "DEFAULT_STEPS",
    "ActivationSwapper",
    "AutoClip",
    "Consumer",
    "ContinualBackprop",
    "DormantRecycler",
    "LRRescuer",
    "PlanStep",
    "Remedy",
    "SwapRecord",
    "TreatmentPlan",
    "UnitLinks",
    "find_unit_links",
    "model_snapshot",
    "recycle_units",
    "restore_activation",
    "scale_lr",
    "site_snapshot",
    "swap_activation",
]
