"""Brute-force reference statistics, computed independently of relu_doctor.

Activations are captured with plain forward pre-hooks and forward hooks that clone whole
tensors (the input before any inplace op, the output after); gradients through a
``Tensor.register_hook`` on the output, and dL/d(input) by re-running the activation on the
stored input under autograd. Statistics are then counted in float64 numpy with the
definitions of the README, written the slow obvious way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn


@dataclass
class Capture:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    grad_inputs: list[torch.Tensor | None] = field(default_factory=list)


class Recorder:
    """Records every call of the given activation modules, keyed ``(path, call_index)``."""

    def __init__(self, model: nn.Module, types: tuple[type, ...] | None = None) -> None:
        from relu_doctor.families import family_of

        self.model = model
        self.calls: dict[tuple[str, int], Capture] = defaultdict(Capture)
        self._count: dict[str, int] = defaultdict(int)
        self._handles = []
        for path, mod in model.named_modules():
            if (types and isinstance(mod, types)) or (not types and family_of(mod) is not None):
                self._handles.append(mod.register_forward_pre_hook(self._pre(path)))
                self._handles.append(mod.register_forward_hook(self._post(path, mod)))
        self._handles.append(model.register_forward_pre_hook(lambda m, a: self._count.clear()))

    def _pre(self, path):
        def pre(mod, args):
            self._pending = args[0].detach().clone()
        return pre

    def _post(self, path, mod):
        def post(m, args, out):
            idx = self._count[path]
            self._count[path] += 1
            cap = self.calls[(path, idx)]
            inp = self._pending
            cap.inputs.append(inp)
            cap.outputs.append(out.detach().clone())
            if out.requires_grad:
                def on_grad(g, cap=cap, inp=inp, m=m):
                    cap.grads.append(g.detach().clone())
                    x = inp.clone().requires_grad_(True)
                    with torch.enable_grad():
                        y = _replay(m, x)
                    (gi,) = torch.autograd.grad(y, x, g)
                    cap.grad_inputs.append(gi.detach().clone())
                out.register_hook(on_grad)
        return post

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _replay(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    if isinstance(m, nn.RReLU):  # deterministic replay impossible: use its eval slope
        raise NotImplementedError("RReLU gradients are random in training mode")
    # A shallow copy (parameters shared; only the gradient w.r.t. x is asked for), run by
    # .forward, not __call__: a copy keeps the module's hooks (this Recorder's and any
    # relu_doctor probe's), and running them here would record the replay as a new call and
    # recurse through the gradient hook without end. (A deepcopy would also copy, through
    # the hooks' bound methods, the whole probe and model on every replay.)
    clone = copy.copy(m)
    if hasattr(clone, "inplace"):
        clone.inplace = False
    return clone.forward(x)


def units_last(t: torch.Tensor, unit_dim: int) -> np.ndarray:
    a = t.detach().to(torch.float64).cpu().numpy()
    a = np.moveaxis(a, unit_dim, -1)
    return a.reshape(-1, a.shape[-1])


def forward_reference(outputs: list[torch.Tensor], unit_dim: int, cap: float | None = None) -> dict[str, np.ndarray]:
    """Per-unit sums over the given outputs, by the definitions (slow and obvious)."""
    rows = np.concatenate([units_last(o, unit_dim) for o in outputs], axis=0)
    return {
        "elements": np.full(rows.shape[1], rows.shape[0], dtype=np.float64),
        "active": (rows > 0).sum(0).astype(np.float64),
        "sum": rows.sum(0),
        "sum_abs": np.abs(rows).sum(0),
        "sum_sq": (rows**2).sum(0),
        "saturated": (rows >= cap).sum(0).astype(np.float64) if cap is not None else np.zeros(rows.shape[1]),
    }


def grad_reference(grads: list[torch.Tensor], grad_inputs: list[torch.Tensor], unit_dim: int) -> dict[str, np.ndarray]:
    g = np.concatenate([units_last(t, unit_dim) for t in grads], axis=0)
    gi = np.concatenate([units_last(t, unit_dim) for t in grad_inputs], axis=0)
    return {
        "grad_elements": np.full(g.shape[1], g.shape[0], dtype=np.float64),
        "grad_sq": (g**2).sum(0),
        "grad_zero": (gi == 0).sum(0).astype(np.float64),
    }


# ---------------------------------------------------------------------------------------
# Helpers added for the foundation test suite: turn a Recorder's captures into the
# expected per-site matrices and derived metrics (still numpy, still by the definitions).


class GradOutRecorder(Recorder):
    """A :class:`Recorder` that keeps dL/d(output) but never replays the activation.

    For RReLU, whose training-mode slopes are random and cannot be replayed: its slopes are
    strictly positive, so dL/d(input) is zero exactly where dL/d(output) or the input is.
    ``grad_inputs`` then holds ``g * (x != 0)``, which has the same zero pattern.
    """

    def _post(self, path, mod):
        def post(m, args, out):
            idx = self._count[path]
            self._count[path] += 1
            cap = self.calls[(path, idx)]
            inp = self._pending
            cap.inputs.append(inp)
            cap.outputs.append(out.detach().clone())
            if out.requires_grad:
                def on_grad(g, cap=cap, inp=inp):
                    cap.grads.append(g.detach().clone())
                    cap.grad_inputs.append(g.detach() * (inp != 0))
                out.register_hook(on_grad)
        return post


def site_names(recorder: Recorder) -> dict[tuple[str, int], str]:
    """The site name the README gives each recorded ``(path, call_index)``: the module path
    when a module runs once per forward, ``path#k`` when it runs several times."""
    calls_per_path: dict[str, int] = defaultdict(int)
    for path, idx in recorder.calls:
        calls_per_path[path] = max(calls_per_path[path], idx + 1)
    names = {}
    for path, idx in recorder.calls:
        label = path or "(root)"
        names[(path, idx)] = f"{label}#{idx}" if calls_per_path[path] > 1 else label
    return names


def expected_stats(
    capture: Capture,
    unit_dim: int,
    *,
    cap: float | None = None,
    steps: list[int] | None = None,
    gradients: bool = True,
) -> dict[str, np.ndarray]:
    """Every raw field of one site, summed over the chosen steps (all when ``steps`` is None).

    ``steps`` indexes the capture lists, so it assumes one forward (and one backward) per
    step, which is how the tests drive their models.
    """
    pick = (lambda xs: xs) if steps is None else (lambda xs: [xs[i] for i in steps])
    out = forward_reference(pick(capture.outputs), unit_dim, cap)
    if gradients and capture.grads:
        out.update(grad_reference(pick(capture.grads), pick(capture.grad_inputs), unit_dim))
        out["grad_in_elements"] = out["grad_elements"].copy()
    return out


def derived_metrics(stats: dict[str, np.ndarray], tau: float = 0.1) -> dict[str, np.ndarray | float]:
    """Per-unit and site-level derived metrics from :func:`expected_stats`, by the README's Definitions."""
    n = stats["elements"]
    mean_abs = stats["sum_abs"] / n
    score = mean_abs / mean_abs.mean() if mean_abs.mean() > 0 else np.zeros_like(mean_abs)
    out: dict[str, np.ndarray | float] = {
        "activation_rate": stats["active"] / n,
        "mean_abs": mean_abs,
        "dormant_score": score,
        "dead": stats["active"] == 0,
        "below_tau": score <= tau,
        "dormant": (score <= tau) & (stats["active"] > 0),
        "sparsity": 1.0 - stats["active"].sum() / n.sum(),
        "site_activation_rate": stats["active"].sum() / n.sum(),
        "site_mean_abs": stats["sum_abs"].sum() / n.sum(),
        "saturation_rate": stats["saturated"] / n,
        "site_saturated_fraction": stats["saturated"].sum() / n.sum(),
        "site_rms": float(np.sqrt(stats["sum_sq"].sum() / n.sum())),
    }
    if "grad_elements" in stats:
        out["grad_zero_rate"] = stats["grad_zero"] / stats["grad_in_elements"]
        out["grad_zero_fraction"] = stats["grad_zero"].sum() / stats["grad_in_elements"].sum()
        out["grad_rms"] = np.sqrt(stats["grad_sq"] / stats["grad_elements"])
        out["site_grad_rms"] = float(np.sqrt(stats["grad_sq"].sum() / stats["grad_elements"].sum()))
    return out


COUNT_FIELDS = ("elements", "active", "saturated", "grad_elements", "grad_in_elements", "grad_zero")


def assert_stats_match(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str, rtol: float = 1e-5
) -> None:
    """Counts must be equal exactly; float sums within ``rtol`` of their scale (relu_doctor
    sums each step in float32, the reference in float64). ``where`` names the comparison in
    the failure message."""
    for name, want in expected.items():
        got = np.asarray(actual[name], dtype=np.float64)
        if name in COUNT_FIELDS:
            np.testing.assert_array_equal(got, want, err_msg=f"{where}: {name}")
        else:
            # The scale of a signed sum is the sum of magnitudes (cancellation).
            scale = expected["sum_abs"] if name == "sum" else np.abs(want)
            bad = np.abs(got - want) > rtol * scale + 1e-12
            assert not bad.any(), (
                f"{where}: {name} differs at units {np.flatnonzero(bad)[:10].tolist()}: "
                f"got {got[bad][:5]}, reference {want[bad][:5]}"
            )


def expected_unit_dim(ndim: int) -> int:
    """the README's unit rule: features of (F,) and (N, F), the last dim of (N, L, F),
    channels (dim 1) of (N, C, ...)."""
    return {1: 0, 2: 1, 3: 2}.get(ndim, 1)


def expected_cap(module: nn.Module) -> float | None:
    """The upper saturation value of a capped activation (ReLU6 is a Hardtanh(0, 6))."""
    return float(module.max_val) if isinstance(module, nn.Hardtanh) else None


# ------------------------------------------------------------------ findings, replayed


def open_findings_by_step(run: Any) -> dict[int, set[tuple[str, str, str]]]:
    """The findings open after each logged step, as (severity, kind, site), replayed from
    the run's finding events (began, changed, ended) alone."""
    events = run.finding_events()
    open_: dict[tuple[str, str], str] = {}
    out = {}
    for step in sorted(int(s) for s in run.history["step"].unique()):
        for e in events:
            if e.step == step:
                key = (e.finding.kind, e.finding.site)
                if e.status == "ended":
                    open_.pop(key, None)
                else:
                    open_[key] = e.finding.severity
        out[step] = {(sev, kind, site) for (kind, site), sev in open_.items()}
    return out


def findings_table_rows(table: str) -> set[tuple[str, str, str]]:
    """(severity, kind label, site) of each row of a findings table."""
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {(r[0].lstrip("| "), r[1], r[2]) for r in rows}


def step_beside(
    pairs: list[tuple[nn.Module, torch.optim.Optimizer]], x: torch.Tensor, steps: int = 3
) -> None:
    """Train each ``(model, optimizer)`` of ``pairs`` in turn on ``x``, ``steps`` times
    (mean squared output as the loss): a watched copy beside a plain one, whose parameters
    must end equal where the monitor changed nothing."""
    for _ in range(steps):
        for model, opt in pairs:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()


class UpdateSpy:
    """Each step of ``opt``: per layer (the module owning the parameters, by name), the
    update ratio ``||W_after - W_before|| / ||W_after||`` over all its elements in float64,
    from step hooks of its own (registered before the monitor's, so they read the same
    parameters). ``ratios[-1]`` is the last step's."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.owner = {id(p): name.rsplit(".", 1)[0] if "." in name else ""
                      for name, p in model.named_parameters()}
        self.ratios: list[dict[str, float]] = []
        self._before: dict[int, torch.Tensor] = {}
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _params(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in opt.param_groups for p in g["params"] if id(p) in self.owner]

    def _pre(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        self._before = {id(p): p.detach().double().clone() for p in self._params(opt)}

    def _post(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        d: dict[str, float] = {}
        w: dict[str, float] = {}
        for p in self._params(opt):
            layer = self.owner[id(p)]
            now = p.detach().double()
            d[layer] = d.get(layer, 0.0) + float((now - self._before[id(p)]).square().sum())
            w[layer] = w.get(layer, 0.0) + float(now.square().sum())
        self.ratios.append({k: math.sqrt(d[k]) / math.sqrt(w[k]) for k in d})


class StepNorms:
    """An optimizer step pre-hook of the test's own: at each step, each layer's gradient norm
    (the parameters' squares summed by owning module, float64) and the first group's rate.

    Attributes:
        norms: one ``{layer path: norm}`` per step.
        rates: the learning rate each step used.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.owners = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
        self.norms: list[dict[str, float]] = []
        self.rates: list[float] = []
        self.handle = optimizer.register_step_pre_hook(self._pre)

    def _pre(self, opt: torch.optim.Optimizer, *_: object) -> None:
        sq: dict[str, float] = defaultdict(float)
        for g in opt.param_groups:
            for p in g["params"]:
                sq[self.owners[id(p)]] += float(p.grad.double().square().sum())
        self.norms.append({k: math.sqrt(v) for k, v in sq.items()})
        self.rates.append(opt.param_groups[0]["lr"])
