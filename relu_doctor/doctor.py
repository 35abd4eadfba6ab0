"""The standalone API: :func:`watch` a model in any PyTorch loop, :func:`scan` a dataset.

:class:`Doctor` wires a :class:`~relu_doctor.probes.Probe` (hooks), the on-device
accumulators, the diagnosis and the run record together. Per step it only marks the step
boundary; at each logging interval it reads every accumulator back in one transfer (the one
host synchronisation), optionally sums them across processes, diagnoses, records, writes the
run directory and tells its listeners (the Lightning callback, remedies).
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from relu_doctor.diagnosis import DiagnosisConfig, Finding, diagnose, site_metrics
from relu_doctor.errors import ReluDoctorError
from relu_doctor.history import Run, RunWriter
from relu_doctor.probes import OptimizerTap, Probe, Site
from relu_doctor.stats import ROW, reduce_sum

__all__ = ["Doctor", "LogRecord", "ScanResult", "scan", "watch"]

Listener = Callable[["LogRecord"], None]


@dataclass
class LogRecord:
    """What one logging interval saw (host-side data only).

    Attributes:
        step: the step count at which it was logged.
        sites: one dict per site: ``site``, ``family``, ``order`` and the metrics of
            :func:`~relu_doctor.diagnosis.site_metrics`.
        units: one row per (site, unit).
        layers: one row per parameterised layer: ``grad_norm``, ``update_ratio``.
        findings: the diagnosis, most severe first.
        new_findings: findings that were not present at the previous log.
    """

    step: int
    sites: list[dict[str, Any]]
    units: pd.DataFrame
    layers: pd.DataFrame
    findings: list[Finding]
    new_findings: list[Finding] = field(default_factory=list)

    def site(self, name: str) -> dict[str, Any]:
        for row in self.sites:
            if row["site"] == name:
                return row
        raise ReluDoctorError(
            f"site: no site named {name!r} in this record; known: {[r['site'] for r in self.sites]}."
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReluDoctorError(f"{name}: expected a positive integer (>= 1), got {value!r}.")
    return value


def _versions() -> dict[str, str]:
    from relu_doctor import __version__

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
        every_n_steps: collect statistics on every n-th step only (1 = every step).
        tau: dormant threshold on the ReDo score, in (0, 1).
        include: glob patterns of module paths to watch (default: every activation).
        exclude: glob patterns of module paths to leave out.
        unit_dims: ``{pattern: dim}`` overriding which dim holds the units.
        gradients: collect gradient statistics too.
        optimizer: optimizer(s) whose step hooks give per-layer gradient norms and
            update-to-weight ratios.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is divided out of the gradient
            statistics (fp16 AMP); not needed for bf16.
        run_dir: write a run directory here as training goes.
        config: diagnosis thresholds (``tau`` above wins over ``config.tau``).
        all_reduce: sums a flat tensor across processes (DDP); None for one process.
        world_size: number of processes whose gradients are averaged (DDP). Each process's
            dL/d(output) is divided by it, so gradient statistics are those of the objective
            actually optimised (the mean of the processes' losses), as one process seeing all
            the data would record them.
        is_writer: whether this process writes files (rank zero).
        functional: also capture functional activations called inside the model's modules
            (``F.relu``, ``torch.relu_``, ``x.relu()``, ``F.gelu`` ... in a ``forward``;
            sites ``<module path>:relu#k``). None (the default): on, and a model without any
            ReLU-family module is still an error at attach; True: on, and the model may use
            functional activations only; False: modules only. It costs about 0.1 ms per
            collecting step on the benchmark models (well under 1%).
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
        every_n_steps: int = 1,
        tau: float = 0.1,
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
    ) -> None:
        self.log_every_n_steps = _positive_int("log_every_n_steps", log_every_n_steps)
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        base = config or DiagnosisConfig()
        self.config = DiagnosisConfig(**{**base.__dict__, "tau": tau}) if tau != base.tau else base
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise ReluDoctorError(
                f"grad_scaler: expected a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        self.grad_scaler = grad_scaler
        self.world_size = _positive_int("world_size", world_size)
        self.probe = Probe(
            model,
            include=include,
            exclude=exclude,
            unit_dims=unit_dims,
            gradients=gradients,
            grad_scale=(
                self._current_scale if (grad_scaler is not None or self.world_size > 1) else None
            ),
            require_modules=functional is not True,
        )
        self.model = model
        self.functional = functional is not False
        opts: list[torch.optim.Optimizer] = []
        if optimizer is not None:
            opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]  # type: ignore[list-item]
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
        self.global_step = 0
        self.window_steps = 0
        self._records: list[LogRecord] = []
        self._events: list[dict[str, Any]] = []
        self._began: dict[tuple[str, str], int] = {}
        self._grad_norm_history: list[float] = []
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
        self.probe.attach()
        try:
            if self.tap is not None:
                self.tap.attach()
            if self.functional:
                from relu_doctor.functional import FunctionalCapture

                self._capture = FunctionalCapture(self.probe).attach()
            if self.is_writer and self.run_dir is not None and self._writer is None:
                self._writer = RunWriter(self.run_dir)
                self._write_meta()
        except BaseException:
            self.detach()
            raise
        self.probe.collecting = self._collecting()
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent); the model is left exactly as it was."""
        if self._capture is not None:
            self._capture.detach()
            self._capture = None
        if self.tap is not None:
            self.tap.detach()
        self.probe.detach()

    def __enter__(self) -> Doctor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ per step
    def _collecting(self) -> bool:
        return self.global_step % self.every_n_steps == 0

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

    def step(self) -> LogRecord | None:
        """Mark the end of one training step (one optimizer step).

        Returns the :class:`LogRecord` when this step closed a logging interval, else None.
        No host synchronisation happens unless it logs.
        """
        if self.probe.collecting:
            self.window_steps += 1
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

    def add_event_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(event)`` for each event passed to :meth:`record_event`."""
        self._event_listeners.append(fn)

    # ------------------------------------------------------------------ reading
    def _mark_meta_dirty(self) -> None:
        self._meta_dirty = True

    def _read(self, close: bool) -> LogRecord | None:
        sites = self.probe.sites()
        if not sites:
            return None
        windows = [s.stats.window for s in sites]
        layer_sq, layer_steps, ratio = (
            self.tap.read_and_reset() if (close and self.tap is not None) else (None, 0, None)
        )
        extra = [] if layer_sq is None else [layer_sq]
        world_t: torch.Tensor | None = None
        if self.all_reduce is not None:
            ones = torch.ones(1, dtype=torch.float64, device=windows[0].device)
            reduced = reduce_sum(windows + extra + [ones], self.all_reduce)
            windows, extra = reduced[: len(sites)], reduced[len(sites) : -1]
            world_t = reduced[-1]
        # One device-to-host transfer for everything.
        flat = torch.cat(
            [w.reshape(-1) for w in windows]
            + [s.stats.lifetime.reshape(-1) for s in sites]
            + [e.reshape(-1).to(torch.float64) for e in extra]
            + ([ratio.reshape(-1)] if ratio is not None else [])
        ).cpu()
        if close:
            for s, w in zip(sites, windows, strict=True):
                s.stats.lifetime.add_(w)
                s.stats.window.zero_()
        off = 0
        host_windows, host_life = [], []
        for w in windows:
            host_windows.append(flat[off : off + w.numel()].reshape(w.shape))
            off += w.numel()
        for s in sites:
            n = s.stats.lifetime.numel()
            host_life.append(flat[off : off + n].reshape(s.stats.lifetime.shape))
            off += n
        layer_rows: list[dict[str, Any]] = []
        if extra:
            n_layers = extra[0].numel()
            sq = flat[off : off + n_layers]
            off += n_layers
            steps = max(layer_steps, 1)
            world = 1 if world_t is None else round(float(world_t))
            rat = flat[off : off + n_layers] if ratio is not None else None
            for i, name in enumerate(self.tap.layers):  # type: ignore[union-attr]
                layer_rows.append(
                    {
                        "step": self.global_step,
                        "layer": name,
                        "grad_norm": math.sqrt(float(sq[i]) / (steps * world)),
                        "update_ratio": float(rat[i]) if rat is not None else float("nan"),
                    }
                )
            total = math.sqrt(sum(r["grad_norm"] ** 2 for r in layer_rows))
            if close:
                self._grad_norm_history.append(total)
        rows: list[dict[str, Any]] = []
        unit_frames: list[pd.DataFrame] = []
        units: dict[str, dict[str, torch.Tensor]] = {}
        for s, w, life in zip(sites, host_windows, host_life, strict=True):
            life_total = life + w  # lifetime was read before this window was folded in
            row, u = site_metrics(w, life_total, self.config.tau)
            row = {
                "step": self.global_step,
                "site": s.name,
                "family": s.family.name,
                "leaky": s.family.leaky,
                "cap": s.cap,
                "order": s.order,
                "window_steps": self.window_steps,
                **row,
            }
            rows.append(row)
            units[s.name] = u
            life_dead = (life_total[ROW["elements"]] > 0) & (life_total[ROW["active"]] == 0)
            unit_frames.append(
                pd.DataFrame(
                    {
                        "step": self.global_step,
                        "site": s.name,
                        "unit": range(s.units),
                        "activation_rate": u["activation_rate"].numpy(),
                        "mean_abs": u["mean_abs"].numpy(),
                        "dormant_score": u["dormant_score"].numpy(),
                        "saturation_rate": u["saturation_rate"].numpy(),
                        "grad_rms": u["grad_rms"].numpy(),
                        "grad_zero_rate": u["grad_zero_rate"].numpy(),
                        "dead": u["dead"].numpy(),
                        "dormant": u["dormant"].numpy(),
                        "lifetime_dead": life_dead.numpy(),
                    }
                )
            )
        findings = diagnose(
            rows, units, self.config, step=self.global_step,
            param_grad_norms=self._grad_norm_history,
        )
        findings, new = self._track(findings, commit=close)
        return LogRecord(
            step=self.global_step,
            sites=rows,
            units=pd.concat(unit_frames, ignore_index=True),
            layers=pd.DataFrame(layer_rows),
            findings=findings,
            new_findings=new,
        )

    def _track(self, findings: list[Finding], commit: bool) -> tuple[list[Finding], list[Finding]]:
        began = dict(self._began)
        now: dict[tuple[str, str], int] = {}
        out, new = [], []
        for f in findings:
            key = (f.kind, f.site)
            start = began.get(key, f.step)
            now[key] = start
            g = Finding(f.kind, f.site, f.severity, f.message, f.evidence, f.remedy, f.step, start)
            out.append(g)
            if key not in began:
                new.append(g)
        if commit:
            self._began = now
        return out, new

    def log(self) -> LogRecord | None:
        """Close the current window now: read, diagnose, record, write, notify listeners."""
        record = self._read(close=True)
        self.window_steps = 0
        if record is None:
            return None
        self._records.append(record)
        events = [{"type": "finding", **f.to_dict()} for f in record.findings]
        self._events.extend(events)
        if self._writer is not None:
            if self._meta_dirty:
                self._write_meta()
            self._writer.append_table("history", record.step, pd.DataFrame(record.sites))
            self._writer.append_table("units", record.step, record.units)
            self._writer.append_table("layers", record.step, record.layers)
            self._writer.append_events(events)
        for fn in self._listeners:
            fn(record)
        return record

    def record_event(self, event: Mapping[str, Any]) -> None:
        """Record an event (an intervention) in memory and in the run directory."""
        ev = {"step": self.global_step, **event}
        self._events.append(ev)
        if self._writer is not None:
            self._writer.append_events([ev])
        for fn in self._event_listeners:
            fn(ev)

    def _meta(self) -> dict[str, Any]:
        return {
            "versions": _versions(),
            "model": type(self.model).__name__,
            "device": str(next(iter(self.model.parameters()), torch.empty(0)).device),
            "sites": [s.describe() for s in self.probe.sites()],
            "config": {
                "log_every_n_steps": self.log_every_n_steps,
                "every_n_steps": self.every_n_steps,
                **self.config.__dict__,
            },
        }

    def _write_meta(self) -> None:
        if self._writer is not None:
            self._writer.write_meta(self._meta())
            self._meta_dirty = False

    def current(self) -> LogRecord | None:
        """The current window's record without closing it, or the last logged one when the
        current window is empty. Reads device tensors (a host sync): call it off the hot path."""
        sites = self.probe.sites()
        # A window counts as non-empty when it saw finite elements or non-finite steps (a
        # site whose every output was NaN has elements == 0 yet must be reported).
        seen_rows = [ROW["elements"], ROW["nonfinite"], ROW["grad_nonfinite"]]
        if sites and any(bool(s.stats.window[seen_rows].sum() > 0) for s in sites):
            return self._read(close=False)
        return self._records[-1] if self._records else None

    def findings(self) -> list[Finding]:
        """What is wrong now, most severe first (see :meth:`current`)."""
        rec = self.current()
        return [] if rec is None else rec.findings

    def to_pandas(self) -> pd.DataFrame:
        """One row per site: the site-level metrics of the current window (see :meth:`current`)."""
        rec = self.current()
        if rec is None:
            return pd.DataFrame(columns=["step", "site", "family"])
        return pd.DataFrame(rec.sites)

    def units(self, site: str) -> pd.DataFrame:
        """One row per unit of ``site``: activation rate, mean |h|, dormant score, dead...

        The frame's ``attrs`` hold the unit dim and the rule that chose it.
        """
        s = self.probe.site(site)
        rec = self.current()
        assert rec is not None
        df = rec.units[rec.units["site"] == site].reset_index(drop=True)
        df.attrs.update({"unit_dim": s.unit_dim, "unit_rule": s.unit_rule, "family": s.family.name})
        return df

    def history(self) -> pd.DataFrame:
        """Every logged (step, site) row so far."""
        if not self._records:
            return pd.DataFrame()
        return pd.DataFrame([r for rec in self._records for r in rec.sites])

    @property
    def records(self) -> list[LogRecord]:
        return list(self._records)

    @property
    def sites(self) -> list[Site]:
        return self.probe.sites()

    def to_run(self) -> Run:
        """The run record in memory (the current window included when nothing was logged)."""
        records = list(self._records)
        events = list(self._events)
        if not records:
            cur = self.current()
            if cur is not None:
                records = [cur]
                events += [{"type": "finding", **f.to_dict()} for f in cur.findings]
        return Run(
            meta={"format_version": 1, **self._meta()},
            history=pd.DataFrame([r for rec in records for r in rec.sites]),
            units=pd.concat([r.units for r in records], ignore_index=True) if records else pd.DataFrame(),
            layers=pd.concat([r.layers for r in records], ignore_index=True) if records else pd.DataFrame(),
            events=events,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write everything recorded so far as a run directory at ``path``."""
        run = self.to_run()
        writer = RunWriter(path)
        writer.write_meta({k: v for k, v in run.meta.items() if k != "format_version"})
        for step, part in run.history.groupby("step") if not run.history.empty else []:
            writer.append_table("history", int(step), part)
        for step, part in run.units.groupby("step") if not run.units.empty else []:
            writer.append_table("units", int(step), part)
        for step, part in run.layers.groupby("step") if not run.layers.empty else []:
            writer.append_table("layers", int(step), part)
        ev_path = Path(path) / "events.jsonl"
        if ev_path.exists():
            ev_path.unlink()
        writer.append_events(run.events)
        return Path(path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counts and windows of every site, step counters and finding onsets."""
        return {
            "global_step": self.global_step,
            "window_steps": self.window_steps,
            "sites": self.probe.site_state(),
            "began": [[k[0], k[1], v] for k, v in self._began.items()],
            "grad_norm_history": list(self._grad_norm_history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Sites not yet seen are restored on first call."""
        self.global_step = int(state["global_step"])
        self.window_steps = int(state["window_steps"])
        self._began = {(k, s): int(v) for k, s, v in state.get("began", [])}
        self._grad_norm_history = [float(x) for x in state.get("grad_norm_history", [])]
        self.probe.load_site_state(state.get("sites", {}))
        self.probe.collecting = self._collecting()

    def __repr__(self) -> str:
        return (
            f"Doctor(sites={len(self.probe.sites())}, step={self.global_step}, "
            f"attached={self.probe.attached})"
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
    return Doctor(model, **kwargs).attach()


# ---------------------------------------------------------------------- scan


@dataclass
class ScanResult:
    """Which units never fire on a dataset.

    Attributes:
        sites: one row per site (``site``, ``family``, ``units``, ``dead``,
            ``dead_fraction``, ``sparsity``, ``batches``, ``samples``).
        units: one row per (site, unit): ``activation_rate``, ``mean_abs``, ``dead``.
        dead_units: dead unit indices by site.
    """

    sites: pd.DataFrame
    units: pd.DataFrame
    dead_units: dict[str, list[int]]

    def __str__(self) -> str:
        lines = []
        for row in self.sites.itertuples():
            lines.append(
                f"{row.site:30s} {row.family:10s} {row.dead:5d}/{row.units:<5d} dead "
                f"({row.dead_fraction:.1%}), sparsity {row.sparsity:.1%}"
            )
        return "\n".join(lines)


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ReluDoctorError(
        f"dataloader: cannot feed a batch of type {type(batch).__name__} to the model; yield "
        "tensors, (input, target) tuples or keyword dicts, or pass forward=lambda model, "
        "batch: ...."
    )


def scan(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> ScanResult:
    """One pass over a dataset in eval mode, without gradients: which units never fire.

    The model's training flags (every submodule's), parameters and buffers are left as they
    were: eval mode means BatchNorm running statistics are not updated.

    Args:
        model: the model.
        dataloader: an iterable of batches (tensors, ``(input, target)`` tuples or dicts).
        max_batches: stop after this many batches.
        forward: ``forward(model, batch)`` when batches need custom handling.
        progress: print progress to stderr.
        **kwargs: ``include``, ``exclude``, ``unit_dims``, ``functional`` as for :func:`watch`.

    Returns:
        A :class:`ScanResult`.

    Example:
        >>> import torch, torch.nn as nn, relu_doctor
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> res = relu_doctor.scan(net, [torch.randn(32, 4) for _ in range(3)])
        >>> list(res.sites.columns)[:3]
        ['site', 'family', 'units']
    """
    if max_batches is not None:
        _positive_int("max_batches", max_batches)
    allowed = {"include", "exclude", "unit_dims", "functional"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ReluDoctorError(
            f"scan() got unexpected arguments {sorted(unknown)}; allowed: {sorted(allowed)}."
        )
    fwd = forward or _default_forward
    modes = {m: m.training for m in model.modules()}
    device = _first_device(model)
    doc = Doctor(model, gradients=False, log_every_n_steps=1, **kwargs)
    batches = samples = 0
    try:
        model.eval()
        with doc, torch.no_grad():
            for batch in dataloader:
                if max_batches is not None and batches >= max_batches:
                    break
                b = _to_device(batch, device)
                fwd(model, b)
                batches += 1
                first = b if isinstance(b, torch.Tensor) else (b[0] if isinstance(b, (list, tuple)) and b else None)
                samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0
                if progress and batches % 10 == 0:
                    print(f"relu-doctor scan: {batches} batches", file=sys.stderr)
            rec = doc.current()
    finally:
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise ReluDoctorError("dataloader: yielded no batch; scan needs at least one.")
    if rec is None:
        raise ReluDoctorError(
            "model: no ReLU-family activation ran during the scan (is the activation used "
            "functionally? pass functional=True)."
        )
    site_rows, dead = [], {}
    for row in rec.sites:
        u = rec.units[rec.units["site"] == row["site"]]
        dead[row["site"]] = [int(i) for i in u.loc[u["dead"], "unit"]]
        site_rows.append(
            {
                "site": row["site"],
                "family": row["family"],
                "units": row["units"],
                "dead": row["dead"],
                "dead_fraction": row["dead_fraction"],
                "sparsity": row["sparsity"],
                "batches": batches,
                "samples": samples,
            }
        )
    units = rec.units[["site", "unit", "activation_rate", "mean_abs", "dead"]].reset_index(drop=True)
    return ScanResult(pd.DataFrame(site_rows), units, dead)

