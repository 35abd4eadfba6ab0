"""Findings computed from statistics: dead, dormant, saturated, too sparse, vanishing or
exploding gradients, non-finite values. Each finding carries the numbers behind it and the
suggested remedy, in the vocabulary of the material relu_doctor grew from.

Pure functions over the metrics of :mod:`relu_doctor.metrics` (computed once, read here);
no model, no hooks, no sums re-derived.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from relu_doctor._silence import ALPHA
from relu_doctor._validate import number_in, positive_finite
from relu_doctor.advice import REMEDY_NAMES, unit_remedies
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import FAMILIES
from relu_doctor.metrics import SiteUnits
from relu_doctor.sites import NO_GRADIENT

__all__ = [
    "REMEDY_NAMES",
    "SEVERITIES",
    "DiagnosisConfig",
    "Finding",
    "check_tau",
    "check_warn",
    "diagnose",
    "diagnosis_config",
    "fed_frozen",
    "run_health",
    "severity_rank",
]

#: "Never active since monitoring began" on fewer collected steps than this, in a sampled
#: run's first windows, is information: a unit firing on 1% of inputs is silent on a batch
#: of 64 half the time (a trial's autoencoder read 80% of its latents never active at its
#: first log, on one collected step).
MIN_LIFETIME_STEPS = 8
#: A parameter-gradient spike read on fewer collected steps, and not in the window before,
#: is a warning, not critical (see :func:`diagnose`'s ``grad_norm_steps``).
MIN_SPIKE_STEPS = 8

SEVERITIES = ("info", "warning", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def check_warn(warn: object) -> str | None:
    """A ``warn=`` argument: the lowest finding severity raised as a warning, or None."""
    if warn is not None and warn not in SEVERITIES:
        raise ReluDoctorError(
            f"warn: expected one of {list(SEVERITIES)} or None (no warnings), got {warn!r}."
        )
    return None if warn is None else str(warn)


def severity_rank(severity: str) -> int:
    """The order of severities (info 0 < warning 1 < critical 2); -1 for an unknown one."""
    return _RANK.get(severity, -1)


#: Within a severity, findings about the whole model's training come first (they explain
#: the others), then the units that carry nothing, then what merely thins the signal.
_KIND_ORDER = ("nonfinite", "loss_scale_overflow", "exploding_gradient", "vanishing_gradient",
               "activation_collapse", "dead",
               "lifetime_dead", "saturated", "dormant", "too_sparse", "activation_growth")
#: the share a finding rests on, the larger first within its kind
_SHARES = ("dead_fraction", "lifetime_dead_fraction", "saturated_fraction",
           "dormant_fraction", "sparsity")


def finding_order(severity: str, kind: str, site: str,
                  evidence: Mapping[str, Any]) -> tuple[Any, ...]:
    """The sort key of a finding, most severe first: by severity, then kind (model-wide
    first), then the larger share of units (``dead_fraction``...), then the site's name in
    natural order (``3`` before ``11``).

    Example:
        >>> a = finding_order("warning", "dead", "11", {"dead_fraction": 0.6})
        >>> b = finding_order("warning", "dead", "3", {"dead_fraction": 0.9})
        >>> b < a
        True
    """
    share = next((float(evidence[k]) for k in _SHARES
                  if isinstance(evidence.get(k), int | float) and evidence[k] == evidence[k]), 0.0)
    rank = _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)
    return (-severity_rank(severity), rank, -share, _natural(site))


@functools.lru_cache(maxsize=4096)  # (a log sorts hundreds of findings on the same sites)
def _natural(site: str) -> tuple[tuple[int, int, str], ...]:
    """``site``'s name in natural order: its runs of digits compared as numbers."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", site) if t)


@dataclass(frozen=True)
class DiagnosisConfig:
    """Thresholds of the diagnosis. Defaults follow the README's Definitions and the ReDo paper.

    Attributes:
        tau: dormant threshold on the ReDo score, in (0, 1).
        dead_warning: fraction of a site's units dead over the window that makes a warning
            (any dead unit at all is reported as info).
        dead_critical: fraction that makes it critical.
        sparsity_max: site sparsity at or above which the layer is "too sparse".
        saturation_warning: fraction of a capped site's elements at the cap for a warning.
        vanishing_ratio: gradient RMS nearest the input over that nearest the output below
            which gradients are "vanishing".
        exploding_ratio: the same ratio above which they are "exploding".
        spike_factor: a parameter-gradient norm this many times the median of its history
            is an exploding-gradient spike.
        growth_factor: a site whose activation RMS is this many times its first logged RMS,
            or the shallowest site's RMS, has ReLU's missing upper bound showing
            (``activation_growth``).
        collapse_factor: a site whose activation RMS (not 0: every unit dead is the dead
            finding's) is this many times below the shallowest site's, as at their first
            logs (not a fall training made), has lost the signal from the start
            (``activation_collapse``, critical): its outputs are so near 0 that its dead and
            dormant counts are their signs' noise.
        loop: whose names the remedy texts give (:data:`REMEDY_NAMES`): ``"watch"``
            (``relu_doctor.remedies``), ``"lightning"``, ``"keras"`` or ``"hf"``; each
            integration sets its own.
        clipped_by: what clips the gradients already in the training loop
            (``"gradient_clip_val=1.0"``: each integration sets it from its loop's
            settings), said in the gradient findings' advice instead of advising clipping.
    """

    tau: float = 0.1
    dead_warning: float = 0.1
    dead_critical: float = 0.5
    sparsity_max: float = 0.95
    saturation_warning: float = 0.25
    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    spike_factor: float = 10.0
    growth_factor: float = 100.0
    collapse_factor: float = 1e6
    loop: str = "watch"
    clipped_by: str | None = None

    def __post_init__(self) -> None:
        check_tau("tau", self.tau)
        if self.clipped_by is not None and not isinstance(self.clipped_by, str):
            raise ReluDoctorError(
                f"clipped_by: expected a str or None, got {self.clipped_by!r}.")
        if self.loop not in REMEDY_NAMES:
            raise ReluDoctorError(
                f"loop: expected one of {list(REMEDY_NAMES)}, got {self.loop!r}."
            )
        for name in ("dead_warning", "dead_critical", "sparsity_max", "saturation_warning"):
            number_in(name, getattr(self, name), 0.0, 1.0)
        if self.dead_warning > self.dead_critical:
            raise ReluDoctorError(
                f"dead_warning ({self.dead_warning}) must not exceed dead_critical "
                f"({self.dead_critical})."
            )
        for name in ("vanishing_ratio", "exploding_ratio", "spike_factor", "growth_factor",
                     "collapse_factor"):
            positive_finite(name, getattr(self, name))


def check_tau(name: str, value: object) -> float:
    """The dormant threshold: a number strictly between 0 and 1."""
    return number_in(
        name, value, 0.0, 1.0, high_open=True, hint=" (the ReDo paper uses 0.1 or 0.025)"
    )


def diagnosis_config(tau: object, config: DiagnosisConfig | None) -> DiagnosisConfig:
    """The one way tau is set: ``config`` (default thresholds when None), with ``tau`` as a
    shortcut for its ``tau``; both given with different values is an error."""
    if config is not None and not isinstance(config, DiagnosisConfig):
        raise ReluDoctorError(
            f"config: expected a relu_doctor.DiagnosisConfig, got {type(config).__name__}."
        )
    if tau is None:
        return config or DiagnosisConfig()
    t = check_tau("tau", tau)
    if config is not None and config.tau != t:
        raise ReluDoctorError(
            f"tau: {t} conflicts with config.tau = {config.tau}; set it in one place "
            "(DiagnosisConfig(tau=...) or tau=...)."
        )
    return replace(config or DiagnosisConfig(), tau=t)



@dataclass(frozen=True)
class Finding:
    """One diagnosed problem at one site (or ``"model"`` for model-wide findings).

    Attributes:
        kind: ``dead``, ``lifetime_dead``, ``dormant``, ``saturated``, ``too_sparse``,
            ``activation_growth``, ``vanishing_gradient``, ``exploding_gradient``,
            ``nonfinite`` or ``loss_scale_overflow``.
        site: the site name.
        severity: ``info``, ``warning`` or ``critical``.
        message: one sentence with the key number.
        evidence: the numbers behind it (fractions, counts, unit indices).
        remedy: the suggested remedy.
        step: the step at which this diagnosis was made.
        began: the first step at which this finding was seen, continuously since.
    """

    kind: str
    site: str
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedy: str = ""
    step: int = 0
    began: int = 0

    def to_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """The fields as a dict; its evidence a copy (its lists and dicts copied too), so
        that changing the dict changes no finding. Not ``dataclasses.asdict``, whose deep
        copy of every unit list cost a log of hundreds of findings tens of milliseconds.

        ``copy=False``: the evidence is the finding's own, for writing it out (to JSON, to
        a table) and not to be changed; its copy was a third of the time a log of hundreds
        of findings spent on them."""
        d = {name: getattr(self, name) for name in _FINDING_FIELDS}
        if copy:
            d["evidence"] = {k: v.copy() if isinstance(v, (list, dict)) else v
                             for k, v in self.evidence.items()}
        return d

    def since(self, began: int) -> Finding:
        """This finding with ``began`` set: ``dataclasses.replace(self, began=began)``
        without its checks of every field (a log of ~700 findings spent ~1.5 ms in them)."""
        return Finding(self.kind, self.site, self.severity, self.message, self.evidence,
                       self.remedy, self.step, began)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.site}: {self.message} Remedy: {self.remedy}"


_FINDING_FIELDS = tuple(f.name for f in fields(Finding))


def _units_list(units: Mapping[str, torch.Tensor], name: str, limit: int = 64) -> list[int]:
    """The first ``limit`` units of a site where per-unit metric ``name`` is nonzero."""
    if isinstance(units, SiteUnits):
        return units.nonzero(name, limit)
    return [int(i) for i in torch.nonzero(units[name]).flatten()[:limit].tolist()]


def _severity(frac: float, warn: float, crit: float) -> str:
    if frac >= crit:
        return "critical"
    if frac >= warn:
        return "warning"
    return "info"


def _sampled(row: Mapping[str, Any], *, lifetime: tuple[int, int] | None = None,
             what: str = "dead", passes: tuple[int, int] | None = None, call: int = 0) -> str:
    """The window's sampling, where it collected fewer steps than it ran, or the site ran
    in some of its recorded passes only (``passes``: those and all of them; ``call``: the
    site's call index, a later call of its activation in a pass where not 0) ("" otherwise):
    on fewer batches, more units look dead, and a dormant count can read low (a rarely
    firing unit reads silent or above its mean). ``lifetime``: (steps collected, steps
    run) since monitoring began, said instead."""
    if lifetime is not None:
        total, since = lifetime
        if since <= 0 or total >= since:
            return ""
        return (f" (on the steps collected, not every step: {total} of the {since} steps "
                "since monitoring began; a unit that fires rarely can be missed)")
    got, ran = row.get("steps_collected"), row.get("steps_run")
    if passes is not None:
        # (a later call: a loop over a varying number of time steps makes them too)
        why = (f"call #{call} of an activation called a varying number of times per pass, as "
               "by a loop of varying length or a branch taken sometimes" if call else
               "a branch taken sometimes")
        return (f"; this site ran in {passes[0]} of the window's {passes[1]} recorded passes "
                f"through its module ({why}), and "
                + ("a unit is more likely to look dead on fewer batches" if what == "dead"
                   else "on fewer batches a unit's mean is less certain"))
    if got is None or ran is None or got >= ran:
        return ""
    if what == "dead":  # (judged unit by unit on its own rate: see relu_doctor._silence)
        unsure = int(row.get("inconclusive") or 0)
        return (f"; statistics from {got} of the window's {ran} steps: a silent unit is dead "
                f"where a live one with its past would be so long silent with a chance under "
                f"{ALPHA:.0%}" + (f" ({unsure} more were silent too briefly to tell)"
                                  if unsure else ""))
    unsure = int(row.get("inconclusive") or 0)
    return (f"; statistics from {got} of the window's {ran} steps, on which a unit's mean is "
            "less certain: a rarely firing unit reads silent (inconclusive, not counted) or "
            "above its mean, so the count can read low"
            + (f" ({unsure} silent units not counted)" if unsure else ""))


def _and_clip(names: Mapping[str, str | None], config: DiagnosisConfig) -> str:
    """What the gradient findings' advice adds to lowering the learning rate: to clip the
    gradients, or, where the loop clips them already, that it does (a trial was advised to
    clip beside the Trainer's own ``gradient_clip_val``)."""
    if config.clipped_by:
        return f" (the gradients are clipped already: {config.clipped_by})"
    return f" and clip the gradients ({names['clip']})"


def diagnose(
    sites: Sequence[Mapping[str, Any]],
    units: Mapping[str, Mapping[str, torch.Tensor]],
    config: DiagnosisConfig,
    *,
    step: int = 0,
    param_grad_norms: Sequence[float] = (),
    grad_norm_steps: int | None = None,
    first_rms: Mapping[str, float] | None = None,
    declined: Mapping[str, Collection[str]] | None = None,
    lifetime_steps: tuple[int, int] | None = None,
    scaler_skipped: int = 0,
    site_passes: Mapping[str, tuple[int, int]] | None = None,
    unrecyclable: Mapping[str, str] | None = None,
    recycling: Mapping[str, str] | None = None,
    swapping: Mapping[str, str] | None = None,
    call_index: Mapping[str, int] | None = None,
    lifetime_restarted: bool = False,
    parts: Mapping[str, tuple[str, int]] | None = None,
    growth_base: Mapping[str, float] | None = None,
    norms: Mapping[str, str] | None = None,
    positions: Mapping[str, int] | None = None,
    normalised: Collection[str] = (),
) -> list[Finding]:
    """Findings for one window.

    Args:
        sites: site rows (:func:`relu_doctor.metrics.site_metrics`) each with ``site``,
            ``family``, ``leaky``, ``cap`` and ``order`` keys added.
        units: per-unit metrics (:func:`relu_doctor.metrics.unit_metrics`) by site name.
        config: thresholds.
        step: the step the diagnosis is made at.
        param_grad_norms: history of the total parameter-gradient norm, oldest first.
        grad_norm_steps: the collected steps the latest norm rests on (None: unknown): a
            spike read on fewer than :data:`MIN_SPIKE_STEPS` that did not read so in the
            window before is a warning, not critical.
        first_rms: each site's activation RMS at its first log, this one's where it is its
            first (growth over time, and whether a signal gone with depth was so from the
            start); 0 where it was all dead then.
        declined: by site, the remedies that left it alone (``declined`` events): their
            remedy texts advise them there no more, and say so.
        lifetime_steps: (steps collected, steps run) since monitoring began, this window's
            included: what the lifetime findings say they rest on (None: unknown, as after a
            checkpoint that did not hold them; the window's sampling is said instead).
        scaler_skipped: the window's steps whose update a loss scaler (fp16's
            ``GradScaler``, Keras' ``LossScaleOptimizer``) skipped, its scale lowered: their
            gradients overflowed. Where it skipped some of the steps run, not most, and no
            output was non-finite, the sites whose non-finite values are gradients give one
            ``loss_scale_overflow`` info finding, not critical ``nonfinite`` ones.
        unrecyclable: by site, why ReDo cannot recycle its units, found by reading the
            forward pass (its input a residual sum): their texts advise it there not, and
            say why, and their dead and dormant findings' evidence holds it
            (``not_recyclable``), before any recycling was tried.
        recycling: by site, the recycling remedy bound to act there (``dormant_reset``,
            ``continual_backprop``, or ``treatment_plan`` for a plan's recycle step): their
            texts say so instead of advising one.
        swapping: by site, the bound LeakyReLU swap that acts there (``leaky_relu_swap``,
            or ``treatment_plan`` for a plan's swap step): their texts say it swaps them past
            its threshold, instead of advising one.
        site_passes: by site, (recorded passes of the window that ran it, those that began
            at a module holding it), for the sites that ran in some only (a branch taken
            sometimes, a later call in a loop of varying length): their dead and
            dormant findings say it, and their evidence holds both.
        call_index: by site, its call index where not 0 (a later call of an activation
            called several times in a pass: its module, or a functional op in its module's
            forward), which ``site_passes`` says it is.
        lifetime_restarted: the lifetime counts began after training did (a run resumed
            without a checkpoint holding them): units dead in all of them may have fired
            before, so they are not said to have never fired.
        growth_base: each site's activation RMS at its first log with most of its units
            alive (None: ``first_rms``): growth over time is measured from it.
        norms: by site, the norm its input passed last since its producing layer, in words
            (``Site.norm``): the advice for its dead units names it, not the layer's bias.
        normalised: the sites whose input passed a norm since its producing layer (a
            BatchNorm's, a LayerNorm's, a GroupNorm's: ``Site.norm`` or ``Site.mixed``),
            whose scale is that norm's: growth over depth is not read up to them.
        parts: by site, (the flow it is in, its part's rank in that flow), where parts of
            the model were stepped apart (see :meth:`Probe.parts
            <relu_doctor.probes.Probe.parts>`): the gradient's fall or growth from output
            side to input side is measured within each flow, its sites in the order their
            parts feed each other, then the order they first ran (a GAN's discriminator,
            whose passes may run first, is fed by its generator: no input side of it).
        positions: by site, the positions of a sample each unit has (a convolution's H*W, a
            sequence's tokens; 1 where absent): the gradient's fall or growth is measured
            per unit and sample (RMS times the root of the positions), which an average over
            positions (global pooling before a classifier's Dense layer) does not make fall
            with the image's size, as it does the RMS per element.

    Returns:
        Findings, most severe first.
    """
    out: list[Finding] = []
    names = REMEDY_NAMES[config.loop]
    swapping = swapping or {}
    # A loss scaler skips the update of a step whose gradients are not finite, lowering its
    # scale: the non-finite gradients of a window where it skipped some steps, not most, are
    # its calibration (with a scaler, a non-finite activation gradient makes the parameter
    # gradients non-finite and the step skipped), said once, as info. Not where an output
    # was non-finite: loss scaling changes no forward value, so the skips had another cause.
    # (One skip is never "most": a window of one step, logged at every step, would make
    # each calibration skip critical.)
    ran = max((int(r.get("steps_run") or 0) for r in sites), default=0)
    explained = (scaler_skipped > 0 and (scaler_skipped == 1 or 2 * scaler_skipped <= ran)
                 and not any(r["nonfinite"] for r in sites))
    overflowed: list[tuple[str, int]] = []
    # the sites of one activation module called several times in a pass (path#0, path#1...):
    # a swap replaces the module, so it changes all of its calls
    calls: dict[str, list[str]] = {}
    for row in sites:
        if not isinstance(row.get("op"), str) and (m := re.fullmatch(r"(.+)#\d+", str(row["site"]))):
            calls.setdefault(m.group(1), []).append(str(row["site"]))
    for row in sites:
        name = str(row["site"])
        u = units[name]
        fam = str(row["family"])
        passes = (site_passes or {}).get(name)
        call = (call_index or {}).get(name, 0)
        leaky = bool(row.get("leaky"))
        seen = int(row["units_seen"])
        # Before the `seen` check: a site whose every output was NaN/Inf saw no finite
        # element, and that is exactly when this finding matters most.
        if explained and not row["nonfinite"] and row["grad_nonfinite"]:
            overflowed.append((name, int(row["grad_nonfinite"])))
        elif row["nonfinite"] or row["grad_nonfinite"]:
            out.append(
                Finding(
                    "nonfinite", name, "critical",
                    f"NaN/Inf seen: {row['nonfinite']} unit-steps in activations, "
                    f"{row['grad_nonfinite']} in gradients (or gradients past about "
                    "1e19, whose squares overflow float32).",
                    {"nonfinite": row["nonfinite"], "grad_nonfinite": row["grad_nonfinite"],
                     "units": _units_list(u, "nonfinite")},
                    f"Lower the learning rate{_and_clip(names, config)}; check the "
                    "inputs and the loss for NaN; with fp16, prefer bf16 or keep a GradScaler.",
                    step,
                )
            )
        if not seen:
            continue
        # The remedy texts depend on what the site is and what is bound or was declined
        # there, not on the window's numbers: made once, taken again (advice.unit_remedies)
        module = name.rpartition("#")[0]
        # Dead units none of which fired since monitoring began (at its first log, every
        # dead unit: dead on its first step too) are what the initialisation or a bias made,
        # not training: their advice leads with the layer feeding them
        born = (bool(row["dead"]) and not lifetime_restarted
                and not _count(u, "dead", unless="lifetime_dead"))
        # (dead units scoring above tau, which no recycler takes: none where dead units
        # output 0, taken whatever their score; a sampled window's silent ReLU units were
        # counted so, and told of negative outputs they do not have: a review)
        zero = (registered := FAMILIES.get(fam)) is not None and registered.nonnegative
        dead_above = _above_tau(u, "dead") if row["dead"] and not zero else (0, 0)
        life_above = _above_tau(u, "lifetime_dead") if row["lifetime_dead"] and not zero else (0, 0)
        remedies = unit_remedies(
            config.loop, fam, registered, leaky, row.get("cap"),
            row.get("op") if isinstance(row.get("op"), str) else None,  # a functional call's
            frozenset((declined or {}).get(name, ())), (unrecyclable or {}).get(name),
            (recycling or {}).get(name), module,
            tuple(n for n in calls.get(module, ()) if n != name), swapping.get(name), born,
            dead_above, life_above,
            (norms or {}).get(name, ""))
        # A leaky family's units stuck negative still pass a gradient (GELU's 0.01-0.1, a
        # LeakyReLU's slope) and can come back: a warning at most, where a ReLU's dead units
        # pass none (two trials read a ConvNeXt's and a Wav2Vec2's stuck GELUs as critical)
        crit = math.inf if leaky else config.dead_critical
        scored = leaky and int(row["dead"]) < MOSTLY_STUCK * seen  # (see the dead grade)
        if row["dead"]:
            frac = float(row["dead_fraction"])
            what = "stuck in the negative regime" if leaky else "dead (no activation)"
            # ... and graded on those scoring at most tau: one scoring above, beside units
            # that fire, passes on a share of its layer's signal (a U-Net trial's healthy
            # GELU feed-forward, a quarter of its units at about GELU(-1), made a warning at
            # every log). Where most are stuck (MOSTLY_STUCK), the score, relative to the
            # layer's mean, is mostly theirs and says nothing (every unit at SiLU(-20) scores
            # 1; an HF trial's GPT-2 MLP, 127 of 128 units held at about GELU(-1), scored 1.0
            # and read info). Lifetime dead alike.
            above = stuck_working(row)
            graded = frac - above / seen
            working = _scored_above(above)
            out.append(
                Finding(
                    "dead", name,
                    _severity(graded, config.dead_warning, crit),
                    f"{row['dead']} of {seen} units ({frac:.1%}) {what} over the window "
                    f"({fam}){_sampled(row, passes=passes, call=call)}{working}.",
                    {"dead": row["dead"], "units": seen, "dead_fraction": frac,
                     "dead_units": _units_list(u, "dead"), "family": fam, "leaky": leaky,
                     "never_fired": born,
                     # (a sampled window's silent units too briefly silent to call dead)
                     **({"inconclusive": int(row["inconclusive"])}
                        if row.get("inconclusive") else {}),
                     # (dead units scoring above tau, of them: the report's advice gives the
                     # recycler tau= for them, as the remedy here does)
                     **({"above_tau": list(dead_above)} if dead_above[0] else {})},
                    remedies.dead, step,
                )
            )
        if row["lifetime_dead"]:
            frac = float(row["lifetime_dead_fraction"])
            life_working = _scored_above(life_above[0] if scored else 0)
            out.append(
                Finding(
                    "lifetime_dead", name,
                    # (on fewer than 8 steps of a sampled run's first windows: not graded)
                    "info" if lifetime_steps is not None
                    and lifetime_steps[0] < min(lifetime_steps[1], MIN_LIFETIME_STEPS) else
                    _severity(frac - (life_above[0] / int(row["units"]) if scored else 0.0),
                              config.dead_warning, crit),
                    f"{row['lifetime_dead']} of {row['units']} units ({frac:.1%}) never active "
                    f"since monitoring began{_sampled(row, lifetime=lifetime_steps)}"
                    f"{life_working}.",
                    {"lifetime_dead": row["lifetime_dead"], "lifetime_dead_fraction": frac},
                    remedies.lifetime_dead,
                    step,
                )
            )
        n_dormant = int(row["dormant"])
        if n_dormant:
            frac = n_dormant / seen
            out.append(
                Finding(
                    "dormant", name,
                    _severity(frac, config.dead_warning, config.dead_critical),
                    f"{n_dormant} of {seen} units ({frac:.1%}) dormant (ReDo score <= "
                    f"{config.tau}) but not dead"
                    f"{_sampled(row, what='dead or dormant', passes=passes, call=call)}.",
                    {"dormant": n_dormant, "dormant_fraction": frac, "tau": config.tau,
                     "dormant_units": _units_list(u, "dormant")},
                    remedies.dormant,
                    step,
                )
            )
        cap = row.get("cap")
        if cap is not None and row["elements"]:
            sat = float(row["saturated_fraction"])
            full = int(row["fully_saturated"])
            if full or sat >= config.saturation_warning:
                out.append(
                    Finding(
                        "saturated", name, "warning" if full else "info",
                        f"{sat:.1%} of outputs at the cap {cap:g}; {full} units saturated on "
                        "every input (as dead as a dead ReLU).",
                        {"saturated_fraction": sat, "fully_saturated": full, "cap": cap,
                         "saturated_units": _units_list(u, "fully_saturated")},
                        "Lower the learning rate or normalise the input of this activation "
                        "(BatchNorm before it); plain ReLU removes the cap.",
                        step,
                    )
                )
        sp = float(row["sparsity"])
        if sp >= config.sparsity_max:
            out.append(
                Finding(
                    "too_sparse", name, "warning",
                    f"sparsity {sp:.1%}: almost no output is active.",
                    {"sparsity": sp, "threshold": config.sparsity_max},
                    remedies.too_sparse,
                    step,
                )
            )
    if overflowed:
        out.append(
            Finding(
                "loss_scale_overflow", "model", "info",
                f"the loss scaler skipped {scaler_skipped} of the {ran} steps run, "
                f"whose gradients overflowed (NaN/Inf at {len(overflowed)} site"
                f"{'s' * (len(overflowed) != 1)}): fp16 loss scaling lowering its scale. No "
                "update was made from them, and they are left out of the gradient statistics.",
                {"scaler_skipped": scaler_skipped, "steps_run": ran,
                 "grad_nonfinite": dict(overflowed)},
                "Nothing to do while it is rare; where most steps are skipped (then a critical "
                "NaN / Inf finding), lower the learning rate or prefer bf16.",
                step,
            )
        )
    out.extend(_gradient_findings(sites, config, step, param_grad_norms, parts or {},
                                  grad_norm_steps, positions or {}))
    out.extend(_growth_findings(sites, config, step, first_rms or {},
                                (first_rms or {}) if growth_base is None else growth_base,
                                normalised))
    rows = {str(r["site"]): r for r in sites}
    out = [_on_frozen(f, layer) if f.kind in _UNIT_KINDS
           and isinstance(layer := rows.get(f.site, {}).get("frozen"), str) else f
           for f in out]
    for f in out:  # the sampling each site's finding rests on, in its evidence too
        of = rows.get(f.site)
        if of is not None and of.get("steps_run") is not None:
            f.evidence.setdefault("steps_collected", of.get("steps_collected"))
            f.evidence.setdefault("steps_run", of.get("steps_run"))
        if f.kind in _UNIT_KINDS and f.site in (unrecyclable or {}):
            f.evidence["not_recyclable"] = (unrecyclable or {})[f.site]
        if f.kind in _UNIT_KINDS and f.site in (norms or {}):  # (the report's advice names it)
            f.evidence["norm"] = (norms or {})[f.site]
        if f.site in (site_passes or {}):  # (the passes of the window that ran the site)
            f.evidence["site_passes"], f.evidence["passes"] = (site_passes or {})[f.site]
    out.sort(key=lambda f: finding_order(f.severity, f.kind, f.site, f.evidence))
    return out


def _gradient_findings(
    sites: Sequence[Mapping[str, Any]],
    config: DiagnosisConfig,
    step: int,
    param_grad_norms: Sequence[float],
    parts: Mapping[str, tuple[str, int]],
    grad_norm_steps: int | None = None,
    positions: Mapping[str, int] | None = None,
) -> list[Finding]:
    out: list[Finding] = []
    names = REMEDY_NAMES[config.loop]
    positions = positions or {}

    def part(r: Mapping[str, Any]) -> tuple[str, int]:  # (its flow, its part's rank there)
        return parts.get(str(r["site"]), ("", 0))

    def place(r: Mapping[str, Any]) -> tuple[int, int]:  # input side first
        return part(r)[1], int(r["order"])

    flows: dict[str, list[tuple[tuple[int, int], str, float]]] = {}
    for r in sites:
        if math.isfinite(float(r["grad_rms"])):
            flows.setdefault(part(r)[0], []).append((place(r), str(r["site"]), float(r["grad_rms"])))
    for flow in flows.values():
        flow.sort()
    # (of models stepped apart, one whose gradients are all zero while another's are not)
    silent = [p for p, fl in flows.items() if all(v == 0 for _, _, v in fl)]
    if silent:
        flow = flows[silent[0]] if len(silent) < len(flows) else sorted(
            f for fl in flows.values() for f in fl)
        where = f"any activation of {silent[0]!r}" if len(silent) < len(flows) else (
            "any activation")
        out.append(
            Finding(
                "vanishing_gradient", "model", "critical",
                f"no gradient reached {where} over the window: gradient RMS is 0 at "
                f"all {len(flow)} site(s) with gradient statistics, so nothing before them "
                "learns.",
                {"sites": len(flow), "input_side": flow[0][1], "output_side": flow[-1][1],
                 "input_grad_rms": 0.0, "output_grad_rms": 0.0,
                 **({"part": silent[0]} if len(silent) < len(flows) else {})},
                "Check the loss and the output layer: an output saturated so that the loss "
                "has no slope (probabilities clipped at 0 or 1, as Keras' crossentropy "
                "clips them; a softmax or sigmoid given huge logits), or a loss computed from "
                "detached tensors. A learning rate high enough to blow the outputs up is a "
                f"common cause: lower it ({names['lr']}).",
                step,
            )
        )
    # Each flow's input side against its output side (by place), per element and per unit
    # and sample (the RMS times the root of a sample's positions: a convolution's H*W). A
    # Keras trial's healthy CNN read a fall of 2.36e3x per element from its Dense site to its
    # first conv at 64x64, 9.66e3x at 128x128: the global average pooling between them
    # divides each position's gradient by their count; per unit and sample, 37x and 75x. A
    # generator's read the mirror image (a review): 68x per element from its 128x128 output
    # to its first Linear, 8.7e3x per sample. So a finding needs both to pass: the positions
    # can explain a fall or a growth away, never make one. Of several flows, the one whose
    # gradient falls the most, and the one whose gradient grows the most.
    ends = []
    for name, fl in flows.items():
        if len(fl) < 2 or fl[-1][2] <= 0:
            continue
        raw = fl[0][2] / fl[-1][2]
        at = {s: max(1, positions.get(s, 1)) for s in (fl[0][1], fl[-1][1])}
        sample = raw * math.sqrt(at[fl[0][1]] / at[fl[-1][1]])
        ends.append((max(raw, sample), min(raw, sample), raw, sample, at, fl[0], fl[-1], name))
    falls = min(ends, key=lambda e: e[0], default=None)
    grows = max(ends, key=lambda e: e[1], default=None)
    said = [(falls[0], *falls[2:])] if (
        falls and falls[0] < config.vanishing_ratio and not silent) else []
    said += [(grows[1], *grows[2:])] if grows and grows[1] > config.exploding_ratio else []
    for ratio, raw, sample, at, first, last, name in said:
        ev: dict[str, Any] = {"input_side": first[1], "input_grad_rms": first[2],
                              "output_side": last[1], "output_grad_rms": last[2],
                              "ratio": ratio}
        if len(flows) > 1:
            ev["part"] = name
        def by(r: float) -> str:  # (r > 0)
            return f"{1 / r if r < 1 else r:.3g}x"

        verb = "falls" if ratio < 1 else "grows"
        change, where = (f"{verb} {by(ratio)}" if ratio > 0 else ""), ""
        if at[first[1]] != at[last[1]]:
            ev.update(positions=at, element_ratio=raw, sample_ratio=sample)
            if ratio > 0:
                change = f"{verb} {by(raw)} per element and {by(sample)} per unit and sample"
            where = (f" ({first[1]} has {at[first[1]]} positions a sample, {last[1]} "
                     f"{at[last[1]]})")
        if ratio < config.vanishing_ratio:
            out.append(
                Finding(
                    "vanishing_gradient", "model", "warning",
                    (f"gradient RMS {change} from {last[1]} to {first[1]}{where}."
                     if ratio > 0 else
                     f"gradient RMS falls to zero from {last[1]} to {first[1]}: no "
                     f"gradient reaches {first[1]}."),
                    ev,
                    _dead_first([r for r in sites if part(r)[0] == name], config, first[0],
                                last[0], place)
                    + "ReLU keeps a constant gradient for active units, so vanishing points "
                    "at dead units or depth: add residual connections or BatchNorm, use He "
                    "initialisation, or SELU for self-normalising deep networks.",
                    step,
                )
            )
        elif ratio > config.exploding_ratio:
            out.append(
                Finding(
                    "exploding_gradient", "model", "critical",
                    f"gradient RMS {change} from {last[1]} to {first[1]}{where}.",
                    ev,
                    f"Lower the learning rate with a schedule ({names['lr']}, step or "
                    f"exponential decay){_and_clip(names, config)}; watch loss and "
                    "gradient magnitudes.",
                    step,
                )
            )
    hist = [h for h in param_grad_norms if math.isfinite(h)]
    if len(hist) >= 4:
        median = _median(hist[:-1])
        latest = hist[-1]
        if median > 0 and latest > config.spike_factor * median:
            # One step's norm (a sampled window's, a run's short last window) is a transient
            # as often as not: a DQN's right after its target network's sync read 12x in a
            # trial, 6x over the same window's every step. Critical where it rests on
            # several steps or the window before read so too.
            few = grad_norm_steps is not None and grad_norm_steps < MIN_SPIKE_STEPS
            again = len(hist) >= 5 and hist[-2] > config.spike_factor * _median(hist[:-2])
            firm = not few or again
            out.append(
                Finding(
                    "exploding_gradient", "model", "critical" if firm else "warning",
                    f"parameter-gradient norm {latest:.3g} is {latest / median:.3g}x its "
                    "median so far" + ("." if firm else
                                       f", on {_steps(grad_norm_steps)} collected: one "
                                       "window's transient (a target network's sync, a "
                                       "batch of outliers) reads so too."),
                    {"grad_norm": latest, "median": median, "factor": latest / median,
                     **({"steps": grad_norm_steps} if grad_norm_steps is not None else {})},
                    f"Lower the learning rate ({names['lr']}, step or exponential decay)"
                    f"{_and_clip(names, config)}; consider early stopping if the loss "
                    "diverges.",
                    step,
                )
            )
    return out


def acted_on(f: Finding) -> bool:
    """Whether the remedies act on ``f``: all but a gradient spike read once on few
    collected steps (a warning, :data:`MIN_SPIKE_STEPS`: a DQN's transient right after
    its target sync would have cut its learning rate)."""
    return f.kind != "exploding_gradient" or f.severity == "critical"


def _median(values: Sequence[float]) -> float:
    """The upper median of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _steps(n: int | None) -> str:
    return "one step" if n == 1 else f"{n} steps"


#: the findings about a site's units, which what feeds them decides
_UNIT_KINDS = ("dead", "lifetime_dead", "dormant", "too_sparse")


def _on_frozen(f: Finding, layer: str) -> Finding:
    """``f`` at a site whose feeding ``layer`` and the block holding it do not train (a
    frozen backbone): no remedy of training reaches those units while they stay frozen, so
    it is said as information, with the one thing that can change them. ``layer``
    :data:`~relu_doctor.sites.NO_GRADIENT`: no gradient reached the site's calls at all."""
    if layer == NO_GRADIENT:
        return replace(
            f, severity="info",
            message=f"{f.message.rstrip('.')}; no gradient reached it (computed under "
            "torch.no_grad(), or from weights and inputs of which none trains: a frozen "
            "teacher, a target network).",
            evidence={**f.evidence, "no_gradient": True},
            remedy="Nothing to do while it is computed so: training cannot change these units "
            "(a lower learning rate, a swap or recycling cannot reach them). If they should "
            "learn, compute it with gradients (outside torch.no_grad(), its weights with "
            "requires_grad=True, their optimizer updating them); leave them if this part is "
            "meant to stay as it is.",
        )
    return replace(
        f, severity="info",
        message=f"{f.message.rstrip('.')}; the layer feeding it, {layer!r}, does not train "
        "(requires_grad=False).",
        evidence={**f.evidence, "frozen_layer": layer},
        remedy="Nothing to do while it stays frozen: its units change only with the weights "
        "you froze (a lower learning rate, a swap or recycling cannot reach them). Unfreeze "
        "it (at a low learning rate) if these units should learn; leave them if the frozen "
        "features serve, or where this part follows the trained one (a target network, an "
        "EMA copy).",
    )


def _dead_first(sites: Sequence[Mapping[str, Any]], config: DiagnosisConfig,
                starved: tuple[int, int], output: tuple[int, int],
                place: Callable[[Mapping[str, Any]], tuple[int, int]]) -> str:
    """Where a site between the ``starved`` one (by ``place``: its part's rank in the flow
    between parts, then order; the input side's: excluded) and the ``output`` side
    (included) is mostly dead, the first thing a vanishing gradient's
    remedy names: no gradient flows back through dead units (residual connections and
    BatchNorm the model may already have do not bring it back). The most dead of them is
    named (a trial's 56% dead last site, which passed gradient on, was named before the
    fully dead one behind it that stopped it), frozen ones too (they stop it as well: a
    review); where they tie, the one nearest the starved site, the likelier on its path
    where the order holds parallel branches (a review: a fully dead site of another tower
    was named)."""
    dead = [(float(r["dead_fraction"]), tuple(-k for k in place(r)), str(r["site"]),
             bool(r.get("frozen")))
            for r in sites
            if starved < place(r) <= output
            and float(r.get("dead_fraction", math.nan)) >= config.dead_critical
            and not r.get("leaky")]  # (a leaky unit passes its slope's gradient back)
    if not dead:
        return ""
    frac, _, site, frozen = max(dead)
    where = f"{site} (frozen)" if frozen else site
    if frac >= 1.0:
        return (f"{where} has every unit dead, so no gradient flows back through its units: "
                "treat them first (see its finding). ")
    return (f"{where} has {frac:.0%} of its units dead, and no gradient flows back through "
            "dead units: treat them first (see its finding). ")


def _growth_remedy(names: Mapping[str, str | None]) -> str:
    return (
        "ReLU has no upper bound: normalise before the activation (BatchNorm or LayerNorm), use "
        f"a capped variant such as ReLU6, or lower the learning rate ({names['lr']}, step or "
        "exponential decay)."
    )


def _count(units: Mapping[str, torch.Tensor], flag: str, unless: str | None = None) -> int:
    """How many units are flagged ``flag`` (and not ``unless``)."""
    if isinstance(units, SiteUnits):  # (a log of hundreds of sites: no tensor op per site)
        return units.count(flag, unless=unless)
    hit = units[flag].bool()
    return int((hit & ~units[unless].bool()).sum() if unless is not None else hit.sum())


#: A leaky site's stuck units scoring above tau are left out of its dead grade, and out of
#: the remedies' dead readings, only where fewer than this share of its units are stuck:
#: where more are, the layer's mean |h| the score is taken against is mostly theirs.
MOSTLY_STUCK = 0.5


def stuck_working(row: Mapping[str, Any]) -> int:
    """How many of a site's dead units (its ``row``) work: a leaky family's stuck negative
    units scoring above tau (``dead_above_tau``: their outputs a sizable share of the
    layer's mean |h|, and a gradient passed), where fewer than :data:`MOSTLY_STUCK` of its
    units are stuck. What the dead grade, :func:`run_health` and the remedies' dead readings
    leave out of the units lost. 0 for a row without the count (a run written before it).

    Example:
        >>> stuck_working({"leaky": True, "dead": 3, "units_seen": 16, "dead_above_tau": 2})
        2
        >>> stuck_working({"leaky": True, "dead": 8, "units_seen": 16, "dead_above_tau": 2})
        0
    """
    try:
        dead, seen = int(row.get("dead") or 0), int(row.get("units_seen") or 0)
        return (int(row.get("dead_above_tau") or 0)
                if row.get("leaky") and dead < MOSTLY_STUCK * seen else 0)
    except (TypeError, ValueError):  # (a damaged row: nothing excused)
        return 0


def _scored_above(above: int) -> str:
    """What a leaky site's dead finding says of its ``above`` stuck units scoring above tau,
    which its grade leaves out ("" for none)."""
    return (f"; {above} of them score{'s' * (above == 1)} above tau (their outputs, negative, "
            "a sizable share of the layer's mean |h|, and a gradient passed: not graded)"
            if above else "")


def _above_tau(units: Mapping[str, torch.Tensor], flag: str) -> tuple[int, int]:
    """``(above, flagged)``: how many units flagged ``flag`` score above tau (a leaky
    family's units stuck negative: their negative outputs count in the ReDo score), which a
    recycler choosing by score alone passes over, and how many are flagged."""
    if flag not in units or "below_tau" not in units:
        return 0, 0
    above = _count(units, flag, unless="below_tau")
    return above, _count(units, flag) if above else 0


def _growth_findings(
    sites: Sequence[Mapping[str, Any]],
    config: DiagnosisConfig,
    step: int,
    first_rms: Mapping[str, float],
    growth_base: Mapping[str, float],
    normalised: Collection[str] = (),
) -> list[Finding]:
    """ReLU's missing upper bound: activation RMS grown ``growth_factor`` times over time (a
    site against its growth base: its first log with most units alive) or across depth (the
    deepest site whose input passed no norm since its layer, ``normalised``, against the
    shallowest: a norm sets the scale after it, so the RMS there is no growth through the
    layers before, and its remedy, "normalise before the activation", is taken already; an
    HF trial's SegFormer read 228x at initialisation from its small-initialised MixFFN
    GELUs to its decode head's BatchNorm -> ReLU)."""
    out: list[Finding] = []
    rms = {
        str(r["site"]): (int(r["order"]), float(r["rms"]))
        for r in sites
        if r.get("cap") is None and math.isfinite(float(r.get("rms", math.nan)))
    }
    for name, (_, now) in rms.items():
        first = growth_base.get(name)
        if first is not None and first > 0 and now >= config.growth_factor * first:
            out.append(
                Finding(
                    "activation_growth", name, "warning",
                    f"activation RMS grew {now / first:.3g}x since the first log"
                    f"{'' if first == first_rms.get(name) else ' with most of its units alive'}"
                    f" ({first:.3g} -> {now:.3g}).",
                    {"rms": now, "first_rms": first, "factor": now / first, "over": "time"},
                    _growth_remedy(REMEDY_NAMES[config.loop]), step,
                )
            )
    by_depth = sorted(rms.values())
    unnormed = [k for k in rms if k not in normalised]
    if len(by_depth) >= 2:
        name = max(unnormed, key=lambda k: rms[k][0], default="")
        shallow, deep = by_depth[0][1], rms[name][1] if name else 0.0
        if name and shallow > 0 and deep >= config.growth_factor * shallow:
            out.append(
                Finding(
                    "activation_growth", name, "warning",
                    f"activation RMS grows {deep / shallow:.3g}x from the shallowest site to "
                    f"this one ({shallow:.3g} -> {deep:.3g}).",
                    {"rms": deep, "shallow_rms": shallow, "factor": deep / shallow,
                     "over": "depth"},
                    _growth_remedy(REMEDY_NAMES[config.loop]), step,
                )
            )
        # the other way: the signal gone with depth (weights or a scale initialised far too
        # small, a gate that closed the path), at the deeper site where it is least. Not an
        # RMS of 0 (every unit dead: the dead finding's), nor a fall that training made (the
        # site's and the shallowest's first logs did not show it, or are not known yet: a
        # site's first log, or one all dead then): the initialisation's.
        order0, shallow = by_depth[0]
        deeper = [k for k in rms if rms[k][0] > order0 and rms[k][1] > 0]
        name0 = min(deeper, key=lambda k: rms[k][1]) if deeper else ""
        low = rms[name0][1] if deeper else math.nan
        first_low = first_rms.get(name0, 0.0)  # (0: all dead then, or not known)
        first_shallow = first_rms.get(min(rms, key=lambda k: rms[k][0]), 0.0)
        from_start = first_low > 0 and first_low * config.collapse_factor <= first_shallow
        if shallow > 0 and low * config.collapse_factor <= shallow and from_start:
            out.append(
                Finding(
                    "activation_collapse", name0, "critical",
                    f"activation RMS falls {shallow / low:.3g}x from "
                    f"the shallowest site to this one ({shallow:.3g} -> {low:.3g}): the signal "
                    "is gone there, and the dead and dormant units of such sites are the "
                    "signs of values near 0.",
                    {"rms": low, "shallow_rms": shallow, "factor": shallow / low,
                     "over": "depth"},
                    "Check the initialisation before the learning rate or recycling: "
                    "relu_doctor.check_init(model, batch) reports each layer's scale against "
                    "He initialisation (which keeps a ReLU network's scale over depth); look "
                    "for a weight, layer scale or gate initialised near 0, or a normalisation "
                    "missing.",
                    step,
                )
            )
    return out


def fed_frozen(frozen: object) -> bool:
    """Whether a site row's ``frozen`` names a frozen layer feeding it, not merely that no
    gradient reached it in the window (:data:`~relu_doctor.sites.NO_GRADIENT`: a task head
    some windows skip is no frozen part).

    Example:
        >>> [fed_frozen(v) for v in ("backbone.0", NO_GRADIENT, None, float("nan"))]
        [True, False, False, False]
    """
    return isinstance(frozen, str) and bool(frozen) and frozen != NO_GRADIENT


def trained_rows(sites: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The site rows a remedy's model-wide before/after and the report's key numbers are of:
    the sites training moves, not those fed by a frozen part (``frozen``: a distillation's
    teacher run in the student's forward, whose dead units diluted a student's change to a
    quarter of itself, a trial's); every site where all are frozen (a frozen model watched
    on its own: its numbers are all there is). Not :func:`run_health`'s, whose numbers are
    a time series that must compare across a freeze or an unfreezing.

    Example:
        >>> [r["site"] for r in trained_rows([{"site": "t", "frozen": "t.fc"}, {"site": "s"}])]
        ['s']
    """
    moving = [r for r in sites if not r.get("frozen")]
    return moving if moving else list(sites)


def run_health(sites: Sequence[Mapping[str, Any]], findings: Sequence[Finding]) -> dict[str, float]:
    """Run-level numbers for early stopping and checkpointing (higher ``health`` is better):
    unit-weighted ``dead_fraction``, ``dormant_fraction`` (active but below tau: dead units
    are not dormant) and ``lifetime_dead_fraction`` over every site, frozen ones included,
    and ``health`` = the share of units alive (not dead in the window, or stuck negative and
    working: :func:`stuck_working`, as the dead grade reads them; a U-Net trial's healthy
    GELU feed-forward read 0.75), 0 when a non-finite value was seen. Every site, so that
    the numbers compare from one log to the next across a freeze or an unfreezing: counted
    over the sites that train, a backbone
    unfrozen mid-run joined them with its dead units, health fell with no unit changed,
    and EarlyStopping and ModelCheckpoint on it kept the frozen phase's model (a trial).
    A frozen teacher's units are a constant there; watch the student alone
    (``include=``) for its own.

    Example:
        >>> run_health([{"units": 4, "units_seen": 4, "dead": 1, "dormant": 2,
        ...              "lifetime_dead": 0}], [])["health"]
        0.75
    """
    broken = any(f.kind == "nonfinite" for f in findings)
    seen = sum(int(r.get("units_seen") or 0) for r in sites)
    units = sum(int(r.get("units") or 0) for r in sites)
    if not seen:
        nan = math.nan
        return {"dead_fraction": nan, "dormant_fraction": nan, "lifetime_dead_fraction": nan,
                "health": 0.0 if broken else nan}
    dead = sum(int(r.get("dead") or 0) for r in sites)
    out = {
        "dead_fraction": dead / seen,
        "dormant_fraction": sum(int(r.get("dormant") or 0) for r in sites) / seen,
        "lifetime_dead_fraction": sum(int(r.get("lifetime_dead") or 0) for r in sites)
        / max(units, 1),
        "health": 0.0 if broken else 1.0 - (dead - sum(map(stuck_working, sites))) / seen,
    }
    return out
