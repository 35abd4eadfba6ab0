"""The clinic: does the default treatment plan cure the ReLU pathologies it is built for?

Five pathologies on the embedded synthetic task (:mod:`relu_doctor.demo`'s teacher labels),
each trained three ways for every seed:

* ``untreated``: relu_doctor only watches;
* ``treated``: the default :class:`~relu_doctor.remedies.TreatmentPlan` acts;
* ``healthy``: the same model in a sane setting (the reference the treatment aims at);

plus the healthy setting with the treatment on (``do no harm``). It prints, per pathology
and way, the final test loss, test accuracy and dead-unit fraction (mean and spread over
seeds) and the share of the untreated-to-healthy accuracy gap the treatment closed.

    .venv/bin/python -m benchmarks.treatment            # the table (a few minutes, 2 cores)
    .venv/bin/python -m benchmarks.treatment --quick    # a smaller, faster check

Pathologies (each with its healthy reference):

* ``adam_lr``: Adam at a learning rate 50x too high (0.05; healthy 1e-3);
* ``neg_bias``: every hidden bias initialised at -3 (healthy: default initialisation);
* ``deep20``: a 20-layer plain ReLU MLP with PyTorch's default initialisation (healthy:
  He initialisation, Kaiming-normal with zero biases);
* ``warmup``: a linear warm-up into a learning rate that kills units (0.05; healthy 1e-3);
* ``shifting``: the labels are permuted every ``period`` steps (a non-stationary task),
  Adam at 0.01 (healthy: the same training on a task that does not shift).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import relu_doctor
from relu_doctor.demo import DemoConfig, make_task
from relu_doctor.remedies import TreatmentPlan

PATHOLOGIES = ("adam_lr", "neg_bias", "deep20", "warmup", "shifting")
WAYS = ("untreated", "treated", "healthy")


@dataclass(frozen=True)
class Setting:
    """One training setting: the model's depth and initialisation, the optimizer's schedule,
    and whether the task shifts."""

    depth: int = 3
    lr: float = 1e-3
    warmup: int = 0
    bias: float | None = None  # hidden biases set to this at init
    he_init: bool = False
    period: int = 0  # labels permuted every `period` steps (0: never)
    fresh_at_shift: bool = False  # re-initialise the model at each shift (plasticity intact)


SICK: dict[str, Setting] = {
    "adam_lr": Setting(lr=0.05),
    "neg_bias": Setting(bias=-3.0),
    "deep20": Setting(depth=20),
    "warmup": Setting(lr=0.05, warmup=50),
    "shifting": Setting(lr=0.01, period=100),
}
HEALTHY: dict[str, Setting] = {
    "adam_lr": Setting(),
    "neg_bias": Setting(),
    "deep20": Setting(depth=20, he_init=True),
    "warmup": Setting(lr=1e-3, warmup=50),
    "shifting": Setting(lr=0.01),
}


@dataclass
class Outcome:
    """The end of one run: test loss and accuracy, dead fraction, interventions made."""

    loss: float
    accuracy: float
    dead: float
    interventions: int
    remedies: list[str] = field(default_factory=list)


def make_mlp(setting: Setting, *, dim: int, width: int, classes: int, seed: int) -> nn.Sequential:
    """A plain ReLU MLP of ``setting.depth`` hidden layers, initialised as the setting says."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = dim
    for _ in range(setting.depth):
        lin = nn.Linear(d, width)
        if setting.he_init:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        if setting.bias is not None:
            nn.init.constant_(lin.bias, setting.bias)
        layers += [lin, nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def _targets(y: torch.Tensor, k: int, classes: int, seed: int) -> torch.Tensor:
    """Labels of the ``k``-th task: a seeded permutation of the classes (k = 0: identity)."""
    if k == 0:
        return y
    perm = torch.randperm(classes, generator=torch.Generator().manual_seed(seed * 1000 + k))
    return perm[y]


def train_once(
    setting: Setting, *, treated: bool, seed: int, steps: int, width: int = 64,
    log_every: int = 10,
) -> Outcome:
    """Train one run of ``setting``; return its outcome on the held-out set of the final
    task."""
    cfg = DemoConfig(seed=seed, train_size=4096, test_size=1024)
    x, y, xt, yt = make_task(cfg)
    model = make_mlp(setting, dim=cfg.dim, width=width, classes=cfg.classes, seed=seed)

    def optimizer(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam(m.parameters(), lr=setting.lr)
        sched = None
        if setting.warmup:
            w = setting.warmup
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        return opt, sched

    opt, sched = optimizer(model)
    batches = torch.Generator().manual_seed(2000 + seed)
    task = 0
    with relu_doctor.watch(model, log_every_n_steps=log_every, optimizer=opt) as doc:
        plan = (
            TreatmentPlan(model, optimizer=opt, schedulers=[sched] if sched else [], seed=seed)
            .bind(doc)
            if treated
            else None
        )
        for step in range(steps):
            if setting.period and step and step % setting.period == 0:
                task += 1
                if setting.fresh_at_shift:
                    fresh = make_mlp(setting, dim=cfg.dim, width=width, classes=cfg.classes,
                                     seed=seed * 7919 + task)
                    model.load_state_dict(fresh.state_dict())
                    opt.state.clear()
            yy = _targets(y, task, cfg.classes, seed)
            idx = torch.randint(0, x.shape[0], (128,), generator=batches)
            loss = F.cross_entropy(model(x[idx]), yy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if sched is not None:
                sched.step()
            doc.step()
        if plan is not None:
            plan.detach()
        records = doc.records
        last = records[-1] if records else None
        ivs = [e for e in doc.to_run().interventions()]
    yt_k = _targets(yt, task, cfg.classes, seed)
    model.eval()
    with torch.no_grad():
        out = model(xt)
        test_loss = float(F.cross_entropy(out, yt_k))
        acc = float((out.argmax(1) == yt_k).float().mean())
    dead = math.nan
    if last is not None:
        seen = sum(int(r["units_seen"]) for r in last.site_rows)
        dead = sum(int(r["dead"]) for r in last.site_rows) / seen if seen else math.nan
    return Outcome(test_loss, acc, dead, len(ivs), sorted({str(e["remedy"]) for e in ivs}))


@dataclass
class Cell:
    """The outcomes of one (pathology, way) over the seeds."""

    outcomes: list[Outcome]

    def stat(self, key: str) -> tuple[float, float]:
        vals = [float(getattr(o, key)) for o in self.outcomes]
        mean = statistics.fmean(vals)
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return mean, spread


def gap_closed(untreated: float, treated: float, healthy: float) -> float:
    """The share of the untreated-to-healthy gap that treatment closed (NaN without a gap).

    Example:
        >>> gap_closed(0.5, 0.7, 0.9)
        0.5
    """
    gap = healthy - untreated
    return (treated - untreated) / gap if abs(gap) > 1e-9 else math.nan


def run_clinic(
    pathologies: Sequence[str] = PATHOLOGIES,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    width: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Cell]]:
    """Every pathology x way x seed, plus ``healthy_treated`` (the healthy setting of
    ``adam_lr`` with the treatment on). Returns ``{pathology: {way: Cell}}``."""
    table: dict[str, dict[str, Cell]] = {}
    plan: list[tuple[str, str, Setting, bool]] = []
    for p in pathologies:
        plan += [(p, "untreated", SICK[p], False), (p, "treated", SICK[p], True),
                 (p, "healthy", HEALTHY[p], False)]
    plan += [("healthy", "untreated", HEALTHY["adam_lr"], False),
             ("healthy", "treated", HEALTHY["adam_lr"], True)]
    for p, way, setting, treated in plan:
        if p == "healthy" and way == "untreated" and "adam_lr" in table:
            table["healthy"] = {"untreated": table["adam_lr"]["healthy"]}
            continue
        t0 = time.perf_counter()
        outs = [train_once(setting, treated=treated, seed=s, steps=steps, width=width)
                for s in seeds]
        table.setdefault(p, {})[way] = Cell(outs)
        if progress is not None:
            progress(f"{p:>9} {way:>9}: {time.perf_counter() - t0:.1f}s")
    return table


def format_table(table: dict[str, dict[str, Cell]]) -> str:
    """The clinic's table as Markdown."""
    lines = [
        "| pathology | way | test loss | accuracy | dead fraction | gap closed (acc) | remedies used |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, ways in table.items():
        acc = {w: c.stat("accuracy")[0] for w, c in ways.items()}
        for way, cell in ways.items():
            (lm, ls), (am, as_), (dm, ds) = (cell.stat("loss"), cell.stat("accuracy"),
                                             cell.stat("dead"))
            closed = ""
            if way == "treated" and "healthy" in ways and "untreated" in ways:
                closed = f"{gap_closed(acc['untreated'], am, acc['healthy']):.0%}"
            elif p == "healthy" and way == "treated":
                closed = f"{100 * (am - acc['untreated']):+.1f} pt vs untreated"
            used = sorted({r for o in cell.outcomes for r in o.remedies})
            lines.append(
                f"| {p} | {way} | {lm:.3f} ± {ls:.3f} | {am:.1%} ± {as_:.1%} | "
                f"{dm:.1%} ± {ds:.1%} | {closed} | {', '.join(used)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, one pathology check")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, choices=PATHOLOGIES)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (120 if args.quick else 300)
    t0 = time.perf_counter()
    table = run_clinic(args.only or PATHOLOGIES, seeds=range(args.seeds), steps=steps,
                       progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(table))
    print(f"\n{args.seeds} seeds, {steps} steps per run, {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
