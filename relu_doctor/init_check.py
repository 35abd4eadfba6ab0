"""Check a model's initialisation on one batch, before training: does the activation's second
moment hold across depth as He et al. (2015) predict, and which units are dead on the first
batch ("born dead")?

He et al.'s recursion for a ReLU network: a layer with ``fan_in`` inputs and weight variance
``Var(w)`` maps the previous activation's second moment ``E[h^2]`` to a pre-activation
second moment ``fan_in * Var(w) * E[h^2]`` (plus the bias's square), and ReLU halves it. He
initialisation (``Var(w) = 2 / fan_in``) keeps ``E[h^2]`` constant over depth; PyTorch's
default (``Var(w) = 1 / (3 fan_in)``) shrinks it six-fold per layer. :func:`check_init`
measures ``E[h^2]`` at every ReLU-family module, sets it beside that prediction and says, in
the tutorials' vocabulary, what to change.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    >>> report = check_init(net, torch.randn(64, 8))
    >>> [s["site"] for s in report.sites]
    ['1', '3']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from relu_doctor._state import kept_state
from relu_doctor._validate import watch_options
from relu_doctor.diagnosis import Finding
from relu_doctor.doctor import Doctor
from relu_doctor.errors import ReluDoctorError
from relu_doctor.probes import private_passes
from relu_doctor.sites import frozen_feed

__all__ = ["InitReport", "check_init"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class InitReport:
    """What :func:`check_init` found.

    Attributes:
        sites: one dict per activation module in forward order: ``site``, ``family``,
            ``units``, ``second_moment`` (measured ``E[h^2]`` of its output),
            ``he_ratio`` (that over the first site's: 1.0 all the way down under He
            initialisation), ``predicted_ratio`` (He et al.'s recursion with the producing
            layer's actual weight variance, None where no producer was found),
            ``born_dead`` (units never active on the batch), ``born_dead_units`` and
            ``frozen`` (what feeds it is frozen, by the Doctor's rule, ``frozen_feed``: a
            pretrained part, whose born-dead units are said as information; the depth
            finding is of the sites after the last frozen one).
        findings: ``born_dead``, ``init_shrinks``/``init_grows`` findings with remedies.
    """

    sites: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No warning or worse."""
        return not any(f.severity != "info" for f in self.findings)

    def __str__(self) -> str:
        head = "init check: " + ("ok" if self.ok else f"{len(self.findings)} problem(s)")
        return "\n".join([head, *(f"  {f}" for f in self.findings)])


def _gain(layer: nn.Module | None) -> float | None:
    """``fan_in * Var(w) / 2``: He et al.'s factor on E[h^2] of one ReLU layer."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    fan_in = w[0].numel()
    return float(fan_in * w.detach().double().var(unbiased=False) / 2.0)


def check_init(
    model: nn.Module, batch: Any, *, shrink: float = 0.1, **kwargs: Any
) -> InitReport:
    """Run ``model`` once on ``batch`` (without gradients, in the model's own train/eval
    mode, which is kept) and compare its activations with He et al.'s prediction. The
    model's buffers (BatchNorm's running statistics) and the random number generators are
    as they were afterwards, and a ``watch`` on the model does not record the pass.

    The pass is watched as :func:`~relu_doctor.watch` watches training: the same sites
    (modules and functional calls alike, by the same names), unit rule and counts, so its
    findings name the sites a Doctor's records name.

    Args:
        model: the model.
        batch: its input: a tensor, or a tuple/list of positional inputs, or a dict of
            keyword inputs.
        shrink: a deepest-to-first ratio of ``E[h^2]`` below this (or above its inverse)
            is a finding.
        **kwargs: ``include``, ``exclude``, ``unit_dims``, ``functional`` as for
            :func:`~relu_doctor.watch`.

    Returns:
        An :class:`InitReport`.
    """
    if not isinstance(model, nn.Module):
        raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if batch is None:
        raise ReluDoctorError("batch: expected the model's input (a tensor, tuple or dict), got None.")
    if not (isinstance(shrink, float | int) and 0 < shrink < 1):
        raise ReluDoctorError(f"shrink: expected a number in (0, 1), got {shrink!r}.")
    kwargs = watch_options("check_init", kwargs)
    # stream="all": the pass is recorded whatever the model's mode; no sampling, no files.
    doc = Doctor(
        model, gradients=False, log_every_n_steps=1, stream="all", every_n_steps=1,
        overhead_budget=None, **kwargs,
    )
    # The pass is ours: no other watcher on the model records it, and the model's buffers
    # (BatchNorm's running statistics) and the RNGs (dropout) are as they were after it.
    with doc, private_passes(doc.probe), kept_state(model), torch.no_grad():
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, tuple | list):
            model(*batch)
        else:
            model(batch)
        record = doc.current()
    if record is None:
        return InitReport()
    producers = _module_producers(model)
    paths = {m: p for p, m in model.named_modules()}
    rows: list[dict[str, Any]] = []
    layers: list[nn.Module | None] = []
    for row in record.site_rows:
        key = record.key(row["site"])
        # Its producer: the layer the pass was followed to (functional calls too); a module
        # the pass could not be followed from: the last Linear/Conv before it in definition
        # order; else unknown.
        site = doc.probe.site_by_key(key)
        found = site.producer if site is not None else None
        layer = (model.get_submodule(found) if found is not None
                 else producers.get(key.module_path) if key.op is None else None)
        layers.append(layer)
        units = record.unit_table[record.unit_table["site"] == row["site"]]
        dead = units.loc[units["dead"].astype(bool), "unit"]
        rms = float(row["rms"])
        rows.append({
            "site": row["site"],
            "family": row["family"],
            "units": int(row["units"]),
            "second_moment": rms * rms if math.isfinite(rms) else math.nan,
            "born_dead": len(dead),
            "born_dead_units": [int(i) for i in dead.iloc[:64]],
            # what feeds it is frozen, by the Doctor's rule (sites.frozen_feed: a frozen
            # pretrained backbone, whose units are its pretraining's, not an
            # initialisation's: a fine-tuning trial was told to use He initialisation
            # there; not a frozen base layer beside a trainable adapter, a review)
            "frozen": frozen_feed(model, found if found is not None
                                  else paths.get(layer) if layer is not None else None),
        })
    # The site producers' weights, read with the model's state kept, as the pass was: a
    # parametrized weight is computed when read (spectral_norm's power iteration updates its
    # buffers in training mode: a trial's check_init moved a spectral-normed model's outputs)
    with kept_state(model), torch.no_grad():
        for row, layer in zip(rows, layers, strict=True):
            row["_gain"] = _gain(layer)
    return _report(rows, shrink)


def _module_producers(model: nn.Module) -> dict[str, nn.Module | None]:
    """Each module path -> the last Linear/Conv module before it in definition order."""
    producer: nn.Module | None = None
    out: dict[str, nn.Module | None] = {}
    for path, m in model.named_modules():
        if isinstance(m, _PRODUCERS):
            producer = m
        else:
            out[path] = producer
    return out


def _report(rows: list[dict[str, Any]], shrink: float) -> InitReport:
    report = InitReport()
    if not rows:
        return report
    first = rows[0]["second_moment"]
    predicted: float | None = 1.0
    for i, r in enumerate(rows):
        gain = r.pop("_gain")
        if i:
            predicted = None if predicted is None or gain is None else predicted * gain
        r["he_ratio"] = r["second_moment"] / first if first > 0 else float("nan")
        r["predicted_ratio"] = predicted
        report.sites.append(r)
        if r["born_dead"] and r["frozen"]:
            frac = r["born_dead"] / r["units"]
            report.findings.append(
                Finding(
                    "born_dead", r["site"], "info",
                    f"{r['born_dead']} of {r['units']} units ({frac:.1%}) never active on the "
                    "first batch; its layer does not train (requires_grad=False: frozen, "
                    "pretrained?), so these are its weights' as given, not an "
                    "initialisation's.",
                    {"born_dead": r["born_dead"], "units": r["units"],
                     "born_dead_units": r["born_dead_units"], "frozen": True},
                    "Nothing to do at initialisation; while the layer stays frozen these units "
                    "stay as they are. Unfreezing it lets training move them.",
                )
            )
        elif r["born_dead"]:
            frac = r["born_dead"] / r["units"]
            report.findings.append(
                Finding(
                    "born_dead", r["site"], "warning" if frac >= 0.1 else "info",
                    f"{r['born_dead']} of {r['units']} units ({frac:.1%}) never active on the "
                    "first batch (born dead).",
                    {"born_dead": r["born_dead"], "units": r["units"],
                     "born_dead_units": r["born_dead_units"]},
                    (f"Its layer's weights already have He initialisation's variance "
                     f"(fan_in * Var(w) / 2 = {gain:.2f}): check that layer's bias (a negative "
                     "bias kills units) and the scale and centring of its input"
                     if gain is not None and 0.8 <= gain <= 1.25 else
                     "Check the initialisation and bias of the layer that feeds it (a negative "
                     "bias kills units); use He initialisation")
                    + "; LeakyReLU (negative slope 0.01 to 0.3) keeps a gradient for them; "
                    "BatchNorm before the activation centres it.",
                )
            )
    # over the depth after the last frozen site (a frozen part's moments are its
    # pretraining's: a review found one frozen stem hid the shrink of the 12 layers after it)
    after = max((i + 1 for i, r in enumerate(report.sites) if r["frozen"]), default=0)
    chain = report.sites[after:]
    last = report.sites[-1]
    base = chain[0]["second_moment"] if chain else math.nan
    ratio = last["second_moment"] / base if chain and base > 0 else math.nan
    if len(chain) >= 2 and (ratio < shrink or ratio > 1 / shrink):
        kind = "init_shrinks" if ratio < shrink else "init_grows"
        report.findings.append(
            Finding(
                kind, last["site"], "warning",
                f"the activation second moment {_change(ratio)} from "
                f"{chain[0]['site']} to this site over depth; He initialisation keeps "
                "it constant.",
                {"he_ratio": ratio, "predicted_ratio": last["predicted_ratio"],
                 "depth": len(chain)},
                "Use He initialisation (nn.init.kaiming_normal_(w, nonlinearity='relu'), "
                "zero biases), or normalisation (BatchNorm/LayerNorm) before the activations; "
                "for deep networks add residual connections.",
            )
        )
    return report


def _change(ratio: float) -> str:
    """How the second moment changed, by ``ratio`` (0 where the last site is all zero)."""
    if ratio == 0:
        return "falls to zero"
    return f"{'shrinks' if ratio < 1 else 'grows'} {max(ratio, 1 / ratio):.3g}x"
