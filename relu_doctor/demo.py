"""The embedded demo: ReLU units dying under a too-high learning rate, untreated and treated.

The task needs no download: inputs are Gaussian, labels come from a fixed random "teacher"
network (8 classes), and the student is a 4-layer ReLU MLP trained with Adam at a learning
rate 50 times too high. Within a few hundred steps most units of its deeper layers
stop firing for good. The same seed is trained twice:

* **untreated**: relu_doctor only watches, diagnoses and records;
* **treated**: the default :class:`~relu_doctor.remedies.TreatmentPlan` acts on the diagnosis
  as it comes, one change at a time and gentlest first: AutoClip gradient clipping, then a
  lower learning rate, then ReDo recycling of dead units, then a LeakyReLU swap; each change
  is judged one interval later on the metric that called for it.

:func:`compare_seeds` trains both runs over several seeds and prints the final accuracy and
dead units as mean and spread (``python -m relu_doctor.demo --seeds 3``).

Each run writes a run directory (its TensorBoard event files in it, so ``tensorboard --logdir
OUT`` names the runs ``untreated`` and ``treated``) and an HTML report; :func:`run_demo`
returns where everything is and the numbers to compare.

Example:
    >>> from relu_doctor.demo import run_demo
    >>> result = run_demo("relu_doctor_demo", quick=True)     # doctest: +SKIP
    >>> result.runs["untreated"].report                        # doctest: +SKIP
    PosixPath('relu_doctor_demo/untreated/report.html')
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F

from relu_doctor.doctor import watch
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.history import IntervalRecord
from relu_doctor.recording import ANNOUNCED

__all__ = [
    "DemoConfig",
    "DemoResult",
    "RunResult",
    "compare_seeds",
    "make_model",
    "make_task",
    "run_demo",
    "train",
]

MARKER = ".relu_doctor_demo"
RUN_NAMES = ("untreated", "treated")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyper-parameters of the demo.

    Attributes:
        steps: optimizer steps per run.
        log_every: steps per logging interval.
        lr: Adam's learning rate (too high on purpose; about 1e-3 trains this task cleanly).
        width: hidden units per layer.
        depth: hidden layers (each Linear -> ReLU).
        batch: batch size.
        dim: input dimension.
        classes: number of classes.
        train_size: training samples.
        test_size: held-out samples for accuracy.
        seed: seed of the data, the initialisation and the batches (same for both runs).
    """

    steps: int = 600
    log_every: int = 20
    lr: float = 0.05
    width: int = 128
    depth: int = 3
    batch: int = 128
    dim: int = 32
    classes: int = 8
    train_size: int = 8192
    test_size: int = 2048
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smaller, faster variant (tests, a first look)."""
        base = {"steps": 200, "log_every": 10, "width": 96, "train_size": 4096, "test_size": 1024}
        return cls(**{**base, **overrides})


@dataclass
class RunResult:
    """One demo run: where it wrote, and its final numbers."""

    name: str
    run_dir: Path
    report: Path
    tensorboard: Path
    dead_units: int = 0
    units: int = 0
    lifetime_dead: int = 0
    accuracy: float = float("nan")
    loss: float = float("nan")
    interventions: int = 0
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class DemoResult:
    """Both runs of the demo."""

    out: Path
    config: DemoConfig
    runs: dict[str, RunResult]
    seconds: float


# ---------------------------------------------------------------------- task and model


def make_task(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random teacher network: ``(x, y, x_test, y_test)``."""
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    hidden = 64
    w1 = torch.randn(cfg.dim, hidden, generator=g) / math.sqrt(cfg.dim)
    b1 = 0.5 * torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, cfg.classes, generator=g) / math.sqrt(hidden)
    x = torch.randn(cfg.train_size + cfg.test_size, cfg.dim, generator=g)
    y = (torch.tanh(x @ w1 + b1) @ w2).argmax(1)
    n = cfg.train_size
    return x[:n], y[:n], x[n:], y[n:]


def make_model(cfg: DemoConfig) -> nn.Sequential:
    """The student: ``fc1 -> relu1 -> ... -> fc{depth} -> relu{depth} -> head``."""
    torch.manual_seed(cfg.seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    d = cfg.dim
    for i in range(1, cfg.depth + 1):
        layers[f"fc{i}"] = nn.Linear(d, cfg.width)
        layers[f"relu{i}"] = nn.ReLU()
        d = cfg.width
    layers["head"] = nn.Linear(d, cfg.classes)
    return nn.Sequential(layers)


# ---------------------------------------------------------------------- training


def _treatments(model: nn.Module, opt: torch.optim.Optimizer, doc: Any) -> list[Any]:
    """Bind the default treatment plan (relu_doctor.remedies.TreatmentPlan) to one run."""
    from relu_doctor.remedies import TreatmentPlan

    return [TreatmentPlan(model, optimizer=opt).bind(doc)]


def _totals(record: IntervalRecord, key: str) -> int:
    return sum(int(r[key]) for r in record.site_rows)


def train(
    name: str,
    run_dir: Path,
    cfg: DemoConfig,
    *,
    treated: bool,
    progress: Callable[[str], None] | None = None,
    report: bool = True,
) -> RunResult:
    """Train the demo student once, watched by relu_doctor; write its run directory,
    TensorBoard logs (in ``run_dir`` itself: TensorBoard names the run after it) and, with
    ``report``, its HTML report (``run_dir/report.html``)."""
    from relu_doctor.reports import tensorboard as tb
    from relu_doctor.reports.html import write_report
    from relu_doctor.reports.interventions import intervention_view, timeline

    t0 = time.perf_counter()
    x, y, xt, yt = make_task(cfg)
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = torch.Generator().manual_seed(2000 + cfg.seed)
    tb_dir = tb.run_log_dir(run_dir)
    result = RunResult(name, run_dir, run_dir / "report.html", tb_dir)
    every = max(cfg.log_every, cfg.steps // 5)
    next_print = every
    loss = torch.zeros(())
    last: IntervalRecord | None = None
    # Every step, not the default overhead budget: the demo's model is so small that its
    # statistics cost more than 3% of a step, and a budget's rate follows the machine's
    # timing, so the treated run's decisions would differ from one run to the next.
    with warnings.catch_warnings(), watch(model, log_every_n_steps=cfg.log_every, optimizer=opt,
                                          run_dir=run_dir, overhead_budget=None) as doc:
        # the treated run's changes are the demo's point: its table counts them, and the
        # report lists each, so their one-line announcements are left out of the console
        warnings.filterwarnings("ignore", message=ANNOUNCED, category=ReluDoctorWarning)
        # watch(run_dir=...) writes the site scalars, histograms and findings to tb_dir; the
        # demo adds its test accuracy there.
        writer = tb.open_writer(tb_dir)
        remedies = _treatments(model, opt, doc) if treated else []
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=batches)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            opt.step()
            # the report's training curve; at the last step remedies change nothing
            record = doc.step(loss=loss.detach(), last=step == cfg.steps)
            if record is not None:
                last = record
                acc = _accuracy(model, xt, yt)
                dead, units = _totals(record, "dead"), _totals(record, "units")
                result.loss_curve.append((step, float(loss.detach())))
                writer.add_scalar("demo/loss", result.loss_curve[-1][1], step)
                writer.add_scalar("demo/test_accuracy", acc, step)
                writer.add_scalar("demo/lr", opt.param_groups[0]["lr"], step)
                if progress is not None and (step >= next_print or step == cfg.steps):
                    next_print += every
                    progress(
                        f"[{name:>9}] step {step:>4}/{cfg.steps}  loss {float(loss.detach()):.3f}  "
                        f"test acc {acc:.1%}  dead units {dead}/{units} ({dead / units:.0%})"
                    )
        last = doc.log_final() or last  # the last, partial window (no remedy acts on it)
        for r in remedies:
            if hasattr(r, "detach"):
                r.detach()
        run = doc.to_run()
    tb.write_events(writer, run.interventions())
    writer.flush()
    getattr(writer, "close", lambda: None)()
    if last is None:
        raise ReluDoctorError(
            f"steps: expected at least {cfg.log_every} (one logging interval), got {cfg.steps}."
        )
    result.accuracy = _accuracy(model, xt, yt)
    result.loss = float(loss.detach())
    result.dead_units = _totals(last, "dead")
    result.units = _totals(last, "units")
    result.lifetime_dead = _totals(last, "lifetime_dead")
    result.findings = [str(f) for f in last.findings if f.severity != "info"]
    # as the report counts them: a clipper's reports of its windows are one
    result.interventions = len(timeline([intervention_view(e) for e in run.interventions()]))
    if report:
        write_report(run_dir, result.report)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was)


# ---------------------------------------------------------------------- the whole demo


def prepare_out(out: str | os.PathLike[str]) -> Path:
    """Create ``out``, or clear a previous demo's output there. A non-empty directory that
    the demo did not make is refused (nothing is deleted)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ReluDoctorError(f"--out: {str(path)!r} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise ReluDoctorError(
            f"--out: {str(path)!r} is not empty and was not made by the demo; pass a new or "
            "empty directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    for n in RUN_NAMES:
        if (path / n).is_dir():
            shutil.rmtree(path / n)
    (path / MARKER).write_text("made by `relu-doctor demo`; it may clear this directory\n")
    return path


def run_demo(
    out: str | os.PathLike[str] = "relu_doctor_demo",
    *,
    steps: int | None = None,
    quick: bool = False,
    seed: int = 0,
    lr: float | None = None,
    stream: TextIO | Literal[False] | None = None,
) -> DemoResult:
    """Train the demo untreated and treated; write run directories, TensorBoard logs and
    HTML reports under ``out``.

    Args:
        out: output directory (created; a previous demo output there is replaced).
        steps: optimizer steps per run (default 600, or 200 with ``quick``).
        quick: smaller data and model, fewer steps.
        seed: seed shared by both runs.
        lr: Adam's learning rate (default 0.05: too high on purpose).
        stream: where progress lines go: a text stream, None for stderr, ``False`` for
            nowhere.
    """
    overrides: dict[str, Any] = {"seed": seed}
    if steps is not None:
        overrides["steps"] = steps
    if lr is not None:
        overrides["lr"] = lr
    cfg = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
    if cfg.steps < cfg.log_every:
        raise ReluDoctorError(f"--steps: expected at least {cfg.log_every} (one logging interval), got {cfg.steps}.")
    path = prepare_out(out)
    sink = sys.stderr if stream is None else stream
    progress = None if sink is False else functools.partial(print, file=sink, flush=True)
    t0 = time.perf_counter()
    runs = {
        name: train(name, path / name, cfg, treated=name == "treated", progress=progress)
        for name in RUN_NAMES
    }
    return DemoResult(path, cfg, runs, time.perf_counter() - t0)


def compare_seeds(
    out: str | os.PathLike[str],
    *,
    seeds: int = 3,
    quick: bool = True,
    stream: TextIO | Literal[False] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Train the demo untreated and treated for seeds ``0 .. seeds-1`` (run directories under
    ``out``, no HTML reports); print and return the final test accuracy and dead-unit
    fraction of each run, and its largest loss rise between two logging steps (a ratio):
    ``{"untreated"|"treated": {"accuracy": [...], "dead": [...], "loss_jump": [...]}}``."""
    path = prepare_out(out)
    sink = sys.stderr if stream is None else stream
    table: dict[str, dict[str, list[float]]] = {
        n: {"accuracy": [], "dead": [], "loss_jump": []} for n in RUN_NAMES
    }
    for seed in range(seeds):
        cfg = DemoConfig.quick(seed=seed) if quick else DemoConfig(seed=seed)
        for name in RUN_NAMES:
            run_dir = path / f"{name}-seed{seed}"
            if run_dir.is_dir():
                shutil.rmtree(run_dir)
            r = train(name, run_dir, cfg, treated=name == "treated", report=False)
            table[name]["accuracy"].append(r.accuracy)
            table[name]["dead"].append(r.dead_units / r.units if r.units else math.nan)
            curve = [v for _, v in r.loss_curve]
            table[name]["loss_jump"].append(
                max((b / a for a, b in itertools.pairwise(curve) if a > 0),
                    default=math.nan)
            )
    if sink is not False:
        for name, cols in table.items():
            acc, dead = cols["accuracy"], cols["dead"]
            print(
                f"{name:>9}: accuracy {statistics.fmean(acc):.1%} +- {_spread(acc):.1%}, "
                f"dead units {statistics.fmean(dead):.1%} +- {_spread(dead):.1%} "
                f"({seeds} seeds)",
                file=sink, flush=True,
            )
    return table


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":  # python -m relu_doctor.demo --seeds 3 [--full] [--out DIR]
    import argparse

    ap = argparse.ArgumentParser(description="The demo over several seeds: mean and spread.")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="the full-size demo (default: quick)")
    ap.add_argument("--out", default="relu_doctor_demo_seeds")
    ns = ap.parse_args()
    compare_seeds(ns.out, seeds=ns.seeds, quick=not ns.full, stream=sys.stdout)
