"""Overhead per training step, paired: the configurations step in turn, one step each.

:mod:`benchmarks.overhead` times blocks of steps per configuration; on a noisy machine its
ratios move by 5-10% between runs. Here every configuration (its own copy of one benchmark
model, :func:`benchmarks.overhead.model_specs`, same seed and batches) takes one step in
turn, in a shuffled order each round, and each step is divided by the plain step of the same
round: the machine's slow drifts cancel, and an A/A control (a second plain copy) shows what
is left.

Three ratios per configuration:

* the median of the per-round ratios, with a bootstrap 95% interval: a configuration's cost
  at each step (for collection at every step);
* the mean of the per-round ratios, the top and bottom 5% left out: the cost averaged over
  steps, robust to a stray slow step but blind to a cost paid on fewer than 5% of the steps;
* the total, all of a configuration's step time over all of plain's: what the run costs, a
  configuration that collects only some steps (the default budget) included; the A/A
  control's total shows how much stray slow steps move it.

A configuration that samples also gets its steps split by phase (collecting, right after a
collecting step, the others), to compare with the budget's own estimate.

Each relu_doctor copy gets a clock of its own that runs only during its own steps
(:class:`OwnTime`): its overhead budget measures a step of its model, not the round of all
copies, as it would in a run that trains one model.

Run::

    .venv/bin/python -m benchmarks.paired                          # the MLP, 300 rounds
    .venv/bin/python -m benchmarks.paired --model resnet --rounds 200
    .venv/bin/python -m benchmarks.paired --model cnn_cl --configs default every every16
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from benchmarks.overhead import ControlRunner, DoctorRunner, Runner, _make_data, model_specs

CONFIGS = {
    "default": {"every_n": None},
    "every": {"every_n": 1},
    "every16": {"every_n": 16},
    "every_act": {"every_n": 1, "layers": False},
    # watched, collecting nothing after its first step: what the steps between collecting
    # ones cost (the budget's estimate counts only its own Python there)
    "idle": {"every_n": 10**9},
}
WARMUP = 20


class OwnTime:
    """A clock that runs only between :meth:`begin` and :meth:`end`: the seconds of one
    configuration's own steps, for its Doctor's host clock (``HostClock.now``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.perf_counter()

    def end(self) -> float:
        """Stop; returns the seconds since :meth:`begin`."""
        assert self._since is not None
        took = time.perf_counter() - self._since
        self.total += took
        self._since = None
        return took

    def now(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.total + running


def own_clock(runner: Runner) -> OwnTime:
    """An :class:`OwnTime` for ``runner``, given to its Doctor's host clock when it has one
    (an adaptive rate on the CPU)."""
    own = OwnTime()
    doc = getattr(runner, "doc", None)
    clock = doc.sampler.clock if doc is not None else None
    if clock is not None and hasattr(clock, "now"):
        clock.now = own.now
    return own


def _boot(ratios: list[float], rng: random.Random) -> tuple[float, float]:
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(200))
    return meds[5], meds[194]


def _trimmed_mean(ratios: list[float]) -> float:
    r = sorted(ratios)
    cut = len(r) // 20
    return statistics.fmean(r[cut:len(r) - cut])


def paired(
    model: str, configs: Sequence[str], rounds: int, threads: int, *, quick: bool = False
) -> list[str]:
    """Run the rounds; returns the table's lines (``quick``: the tiny models, for tests)."""
    torch.set_num_threads(threads)
    spec = model_specs(quick)[model]
    cpu = torch.device("cpu")
    data = _make_data(spec, cpu)
    runners: dict[str, Runner] = {"plain": Runner(spec, data, cpu),
                                  "A/A control": ControlRunner(spec, data, cpu)}
    for name in configs:
        runners[name] = DoctorRunner(spec, data, cpu, **CONFIGS[name])  # type: ignore[arg-type]
    for r in runners.values():
        r.attach()
    clocks = {name: own_clock(r) for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    collected: dict[str, list[bool]] = {name: [] for name in runners}
    order = list(runners)
    try:
        for i in range(rounds + WARMUP):
            random.Random(i).shuffle(order)
            for name in order:
                doc = getattr(runners[name], "doc", None)
                collects = doc is not None and doc.probe.collecting
                clocks[name].begin()
                runners[name].train_step()
                took = clocks[name].end()
                if i >= WARMUP:
                    times[name].append(took)
                    collected[name].append(collects)
            if i == WARMUP - 1:
                # What the first steps made to last (sites, the forward reading) is promoted
                # through the garbage collector's generations until it sets off one full
                # collection (about 0.2 s on the ResNet-50-like model, some 40 steps in):
                # once per run, so it is made here, untimed, for every copy alike.
                gc.collect()
    finally:
        for r in runners.values():
            r.close()
    rng = random.Random(0)
    plain = times["plain"]
    lines = [f"{spec.title}: {rounds} rounds, {threads} threads, plain step "
             f"{1e3 * statistics.median(plain):.2f} ms (median)",
             f"{'configuration':28s} {'median ratio [95%]':>24s} {'mean ratio':>11s} "
             f"{'total':>7s}  rate"]
    for name, r in runners.items():
        ratios = [a / b for a, b in zip(times[name], plain, strict=True)]
        lo, hi = _boot(ratios, rng)
        rate = ""
        doc = getattr(r, "doc", None)
        if doc is not None:
            est = doc.sampler.overhead()
            rate = f"every {doc.sampler.every}" + (
                f" (its estimate: {est:.1%}, {_split(doc.sampler)})"
                if est is not None and doc.sampler.adaptive else ""
            )
        total = sum(times[name]) / sum(plain)
        lines.append(f"{name:28s} {statistics.median(ratios):8.3f}x [{lo:.3f}-{hi:.3f}] "
                     f"{_trimmed_mean(ratios):10.3f}x {total:6.3f}x  {rate}")
    for name in runners:
        if 0 < sum(collected[name]) < len(collected[name]):
            lines.append(_phases(name, times[name], plain, collected[name]))
    return lines


def _split(sampler: object) -> str:
    """The budget's estimate in its two parts: collecting, and the work at every step."""
    hook, plain = sampler._estimates()  # type: ignore[attr-defined]
    every_step = (sampler._log_s() or 0.0) / plain  # type: ignore[attr-defined]
    collecting = hook / (sampler.every * plain)  # type: ignore[attr-defined]
    return f"collecting {collecting:.1%}, every step {every_step:.1%}"


def _phases(name: str, times: list[float], plain: list[float], collected: list[bool]) -> str:
    """Where a sampling configuration's cost falls: the median ratio to plain of its
    collecting steps, of the steps right after one, and of the others, and what each adds
    over the run (its steps' time beyond plain, as a share of all plain time)."""
    phase = ["collecting" if c else "after" if i and collected[i - 1] else "others"
             for i, c in enumerate(collected)]
    parts = []
    for which in ("collecting", "after", "others"):
        idx = [i for i, p in enumerate(phase) if p == which]
        if not idx:
            continue
        ratio = statistics.median(times[i] / plain[i] for i in idx)
        adds = sum(times[i] - plain[i] for i in idx) / sum(plain)
        parts.append(f"{which} {len(idx)} steps {ratio:.3f}x (adds {adds:+.1%})")
    return f"  {name}: " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Columns: the median of the per-round ratios to plain with a bootstrap 95% "
        "interval (the cost at each step), their mean with the top and bottom 5% left "
        "out, and the total (all of a configuration's step time over all of plain's: the cost "
        "over the run, what the default budget's sampling costs); for relu_doctor rows, the "
        "rate in use at the end and the budget's own estimate of its overhead. A sampling "
        "configuration's line below the table splits its steps into collecting ones, the "
        "steps right after one, and the others.",
    )
    p.add_argument("--model", default="mlp", choices=sorted(model_specs()),
                   help="a benchmark model of benchmarks/overhead.py (default mlp)")
    p.add_argument("--configs", nargs="+", default=["default", "every"], choices=sorted(CONFIGS),
                   help="relu_doctor configurations beside plain and the A/A control, which "
                   "always run: default (overhead_budget=0.03), every (every step), every16 "
                   "(every 16th step), every_act (every step, no optimizer tap), idle (watched, "
                   "collecting no step after the first); default: default every")
    p.add_argument("--rounds", type=int, default=300,
                   help="timed rounds, 10 or more, after 20 untimed (default 300)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads, 1 or more (default 2)")
    args = p.parse_args(argv)
    if args.rounds < 10:
        p.error(f"--rounds: expected at least 10, got {args.rounds}")
    if args.threads < 1:
        p.error(f"--threads: expected at least 1, got {args.threads}")
    args.configs = list(dict.fromkeys(args.configs))  # each once, in the order given
    for line in paired(args.model, args.configs, args.rounds, args.threads):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
