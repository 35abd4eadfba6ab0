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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from relu_doctor.diagnosis import Finding
from relu_doctor.errors import ReluDoctorError
from relu_doctor.families import family_of
from relu_doctor.sites import module_label

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
            ``born_dead`` (units never active on the batch) and ``born_dead_units``.
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


def _unit_dim(out: torch.Tensor) -> int:
    return 1 if out.dim() >= 4 else out.dim() - 1


def _gain(layer: nn.Module | None) -> float | None:
    """``fan_in * Var(w) / 2``: He et al.'s factor on E[h^2] of one ReLU layer."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    fan_in = w[0].numel()
    return float(fan_in * w.detach().double().var(unbiased=False) / 2.0)


@torch.no_grad()
def check_init(model: nn.Module, batch: Any, *, shrink: float = 0.1) -> InitReport:
    """Run ``model`` once on ``batch`` (in eval-free, no-grad mode; the model's train/eval
    mode is kept) and compare its activations with He et al.'s prediction.

    Args:
        model: the model (ReLU-family modules are measured; functional calls are not).
        batch: its input: a tensor, or a tuple/list of positional inputs, or a dict of
            keyword inputs.
        shrink: a deepest-to-first ratio of ``E[h^2]`` below this (or above its inverse)
            is a finding.

    Returns:
        An :class:`InitReport`.
    """
    if not isinstance(model, nn.Module):
        raise ReluDoctorError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if batch is None:
        raise ReluDoctorError("batch: expected the model's input (a tensor, tuple or dict), got None.")
    if not (isinstance(shrink, float | int) and 0 < shrink < 1):
        raise ReluDoctorError(f"shrink: expected a number in (0, 1), got {shrink!r}.")
    rows: list[dict[str, Any]] = []
    handles = []
    producer: nn.Module | None = None
    owner: dict[int, nn.Module | None] = {}
    for path, m in model.named_modules():
        if isinstance(m, _PRODUCERS):
            producer = m
        elif family_of(m) is not None:
            owner[id(m)] = producer

            def hook(mod: nn.Module, args: Any, out: Any, path: str = path) -> None:
                if not isinstance(out, torch.Tensor) or not out.numel():
                    return
                d = _unit_dim(out)
                flat = out.detach().movedim(d, 0).reshape(out.shape[d], -1).double()
                active = (flat > 0).any(1)
                rows.append({
                    "site": module_label(path) if path else "<model>",
                    "family": family_of(mod).name,  # type: ignore[union-attr]
                    "units": int(flat.shape[0]),
                    "second_moment": float(flat.pow(2).mean()),
                    "born_dead": int((~active).sum()),
                    "born_dead_units": [int(i) for i in torch.nonzero(~active).flatten()[:64]],
                    "_gain": _gain(owner.get(id(mod))),
                })

            handles.append(m.register_forward_hook(hook))
    try:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, tuple | list):
            model(*batch)
        else:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return _report(rows, shrink)


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
        if r["born_dead"]:
            frac = r["born_dead"] / r["units"]
            report.findings.append(
                Finding(
                    "born_dead", r["site"], "warning" if frac >= 0.1 else "info",
                    f"{r['born_dead']} of {r['units']} units ({frac:.1%}) never active on the "
                    "first batch (born dead).",
                    {"born_dead": r["born_dead"], "units": r["units"],
                     "born_dead_units": r["born_dead_units"]},
                    "Check the initialisation and bias of the layer that feeds it (a negative "
                    "bias kills units); use He initialisation; LeakyReLU (alpha 0.01 to 0.3) "
                    "keeps a gradient for them; BatchNorm before the activation centres it.",
                )
            )
    last = report.sites[-1]
    ratio = last["he_ratio"]
    if len(report.sites) >= 2 and (ratio < shrink or ratio > 1 / shrink):
        kind = "init_shrinks" if ratio < shrink else "init_grows"
        report.findings.append(
            Finding(
                kind, last["site"], "warning",
                f"the activation second moment {_change(ratio)} from "
                f"{report.sites[0]['site']} to this site over depth; He initialisation keeps "
                "it constant.",
                {"he_ratio": ratio, "predicted_ratio": last["predicted_ratio"],
                 "depth": len(report.sites)},
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
