"""The overhead budget: which steps collect (relu_doctor.sampling) and what records state.

The suite pins the default budget to every step (tests/conftest.py); the tests here that are
about the default itself are marked ``real_overhead_budget``. Time is a fake clock wherever
an exact rate is asserted; the one test on the real clock asserts only what holds at any
speed (sampling happens, every window holds collected steps).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import relu_doctor
from relu_doctor import _kernels, sampling
from relu_doctor._kernels import Prepared
from relu_doctor.errors import ReluDoctorError, ReluDoctorWarning
from relu_doctor.reports import plots
from relu_doctor.reports.context import build_context
from relu_doctor.reports.html import render_report
from relu_doctor.reports.tensorboard import run_log_dir
from relu_doctor.reports.text import summary
from relu_doctor.sampling import DEFAULT_BUDGET, CudaClock, HostClock, Lap, Sampler
from relu_doctor.stats import ROW, SiteStats

real_budget = pytest.mark.real_overhead_budget
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeTime:
    """A fake host clock: ``now`` and the statistics' ``spent`` seconds, moved by hand."""

    def __init__(self) -> None:
        self.t = 0.0
        self.stats = 0.0

    def clock(self) -> HostClock:
        return HostClock(now=lambda: self.t, spent=lambda: self.stats)


def drive(s: Sampler, fake: FakeTime, steps: int, step_s: float, hook_s: float) -> list[bool]:
    """Run ``steps`` steps; a collecting step's statistics cost ``hook_s`` more."""
    pattern = []
    for i in range(steps):
        c = s.collect(i)
        pattern.append(c)
        fake.t += step_s + (hook_s if c else 0.0)
        fake.stats += hook_s if c else 0.0
        s.done(collected=c)
    return pattern


def drive_with_spill(
    s: Sampler, fake: FakeTime, steps: int, hook_s: float, spill_s: float
) -> list[bool]:
    """Run ``steps`` steps of 1 s; a collecting step costs ``hook_s`` more (in the statistics)
    and leaves ``spill_s`` more to the step after it (outside them)."""
    pattern: list[bool] = []
    for i in range(steps):
        c = s.collect(i)
        after = not c and bool(pattern) and pattern[-1]
        pattern.append(c)
        fake.t += 1.0 + (hook_s if c else 0.0) + (spill_s if after else 0.0)
        fake.stats += hook_s if c else 0.0
        s.done(collected=c)
    return pattern


def sampler(fake: FakeTime, *, max_every: int = 50, **kw) -> Sampler:
    kw = {"every_n_steps": None, "overhead_budget": 0.03, **kw}
    s = Sampler(max_every=max_every, clock=fake.clock(), **kw)
    s.start()
    return s


def gaps(pattern: list[bool]) -> list[int]:
    taken = [i for i, c in enumerate(pattern) if c]
    return [b - a for a, b in itertools.pairwise(taken)]


def assert_every_nth_off_the_logs(
    pattern: list[bool], n: int, log_every: int, first: int = 0
) -> None:
    """``pattern`` (from step ``first`` on) collects every ``n``-th step of a run logging
    every ``log_every`` steps (step ``i`` logs when ``(i + 1) % log_every == 0``): from every
    3rd step on, no logging step collects, and an interval is one step short only where that
    moved its end off a logging step."""
    taken = [first + i for i, c in enumerate(pattern) if c]
    assert len(taken) >= 2
    for a, b in itertools.pairwise(taken):
        early = n >= 3 and b - a == n - 1 and (b + 2) % log_every == 0
        assert b - a == n or early, (a, b, n)
    if n >= 3:
        assert not any((i + 1) % log_every == 0 for i in taken)


# ---------------------------------------------------------------- the Sampler alone
def test_fixed_rate_ignores_the_budget():
    fake = FakeTime()
    s = sampler(fake, every_n_steps=3)
    assert drive(s, fake, 9, 1.0, 10.0) == [True, False, False] * 3


def test_no_budget_collects_every_step():
    fake = FakeTime()
    assert all(drive(sampler(fake, overhead_budget=None), fake, 20, 1.0, 10.0))


def test_the_rate_follows_the_cost():
    fake = FakeTime()
    s = sampler(fake)
    # 10.5% of a 1 s step at every step: every 4th step keeps 3%
    pattern = drive(s, fake, 40, 1.0, 0.105)
    assert pattern[:2] == [True, True]  # the first step is not measured, the second is
    assert s.every == 4
    assert gaps(pattern[1:]) == [4] * (len(gaps(pattern[1:])))
    assert s.overhead() == pytest.approx(0.105 / 4)
    drive(s, fake, 40, 1.0, 0.001)  # cheaper statistics: back to every step
    assert s.every == 1


def test_a_collecting_step_due_at_a_logging_step_comes_one_step_early():
    """A logging step already pays for its log: under a budget, collecting every 3rd step or
    less often, a collecting step that falls on it moves to the step before (told by
    ``log_next``); the rate stays what the budget chose. Every other step is left as it is
    (the calibration of dense rates times steps further from collecting)."""
    armed: list[bool] = []

    class Clock(HostClock):  # the clock is told each step's decision (CUDA times it)
        def arm(self, collects: bool) -> None:
            armed.append(collects)

    for hook_s, n in ((0.085, 3), (0.25, 9), (0.055, 2)):  # (3, 9: prime to 10)
        fake = FakeTime()
        s = Sampler(every_n_steps=None, overhead_budget=0.03, max_every=10,
                    clock=Clock(now=lambda f=fake: f.t, spent=lambda f=fake: f.stats))
        s.start()
        pattern = []
        for i in range(200):
            c = s.collect(i, log_next=(i + 2) % 10 == 0)
            assert armed[-1] is c
            pattern.append(c)
            fake.t += 1.0 + (hook_s if c else 0.0)
            fake.stats += hook_s if c else 0.0
            s.done(collected=c)
        assert s.every == n
        tail = pattern[100:]
        if n == 2:  # left as it is: every other step (a cycle stretched now and then to
            # time a step further on), so that the logging steps of one phase collect
            assert set(gaps(tail)) == {2, 3}
            assert any(tail[i] for i in range(9, 100, 10))
        else:  # some interval did end on a logging step and was moved
            assert_every_nth_off_the_logs(tail, n, 10, first=100)
            assert n - 1 in gaps(tail)


def test_the_cost_left_to_the_step_after_a_collecting_one_counts():
    """Collecting can leave part of its cost to the next step (the ResNet-like model's next
    forward ran 4% slower): the sampler times that step apart from the steps further away and
    counts the difference as collecting's. 10% of a step in the collecting step and 6% in the
    next: every 6th step keeps 3% (every 4th step, had the 6% been missed)."""
    fake = FakeTime()
    s = sampler(fake)
    pattern = drive_with_spill(s, fake, 120, 0.1, 0.06)
    assert s.every == 6
    assert gaps(pattern)[-5:] == [6] * 5
    assert s.overhead() == pytest.approx(0.16 / 6)


def test_the_cost_left_to_the_next_step_counts_when_collecting_every_step_or_every_other():
    """Collecting every step or every other one, no cycle holds a step further on to time the
    step after a collecting one against: the sampler stretches a cycle now and then (two
    steps left out) to hold one. 3% of a step in the statistics and 3% left to the next step:
    every 2nd step keeps 3% (every step, at 6%, had the 3% left over been missed)."""
    fake = FakeTime()
    s = sampler(fake, max_every=100)
    pattern = drive_with_spill(s, fake, 300, 0.03, 0.03)
    assert s.every == 2
    assert s._estimates() == (pytest.approx(0.06), pytest.approx(1.0))
    tail = gaps(pattern[100:])
    assert set(tail) == {2, 3}  # every other step, a cycle of 3 steps once per _RECHECK
    assert 2 <= tail.count(3) <= 200 // sampling._RECHECK + 1


def test_what_collecting_costs_beyond_the_hooks_clock_counts_at_dense_rates():
    """The hooks' own clock misses part of what collecting costs (torch's hook machinery,
    colder caches for the model's own ops: a third on the ResNet-like benchmark model). At
    every 2nd step few cycles hold a step further on (one per _RECHECK steps), and their
    differences are as noisy as single steps are: here each of those few steps ran 8% slow.
    So the many collecting steps are also compared with the many steps right after them:
    4% in the statistics and 3% more around them in a collecting step is every 3rd step
    (every 2nd step, had the 3% been missed: the hooks' clock alone)."""
    fake = FakeTime()
    s = sampler(fake, max_every=100)
    pattern = []
    since = 0
    for i in range(60):
        c = s.collect(i)
        pattern.append(c)
        since = 0 if c else since + 1
        fake.t += 1.0 + (0.07 if c else 0.0) + (0.08 if since >= 2 else 0.0)
        fake.stats += 0.04 if c else 0.0
        s.done(collected=c)
    assert s.every == 3
    assert gaps(pattern)[-5:] == [3] * 5
    assert s.overhead() == pytest.approx(0.07 / 3)
    # The same statistics with nothing around them: every 2nd step, as before.
    fake, plain_pattern = FakeTime(), []
    s = sampler(fake, max_every=100)
    plain_pattern = drive(s, fake, 60, 1.0, 0.04)
    assert s.every == 2 and gaps(plain_pattern)[-5:] == [2] * 5


def test_a_drifting_machine_is_not_read_as_cost():
    """Steps getting faster (another job ending): the latest collecting steps are older than
    the latest plain ones, so comparing their medians reads the drift as collecting's cost.
    Differences taken within each cycle do not: 0.1 s on a step falling from 2.0 to 1.25 s,
    every 3rd step (10% of a step at 150 steps, 3.3% at every 3rd)."""
    fake = FakeTime()
    s = sampler(fake)
    for i in range(150):
        c = s.collect(i)
        fake.t += 2.0 - 0.005 * i + (0.1 if c else 0.0)
        fake.stats += 0.1 if c else 0.0
        s.done(collected=c)
    assert s.every == 3
    hook, plain = s._estimates()
    # within a cycle the drift is two steps of 5 ms: read as 15 ms of cost, not 0.5 s
    assert hook == pytest.approx(0.1, abs=0.02) and 1.25 <= plain <= 1.4  # recent plain steps


def test_at_least_once_per_logging_interval():
    fake = FakeTime()
    s = sampler(fake, max_every=5)
    pattern = drive(s, fake, 30, 1.0, 100.0)
    assert s.every == 5
    assert gaps(pattern)[-4:] == [5, 5, 5, 5]


def test_distributed_chooses_the_rate_at_logs_from_every_process():
    """Under DDP every process must collect the same steps: the rate changes only at a log,
    from the measurements averaged across processes (here a second process, simulated by
    the reduction, measured twice this one's cost)."""
    fake = FakeTime()
    s = sampler(fake, distributed=True)
    pattern = drive(s, fake, 10, 1.0, 0.06)
    assert all(pattern) and s.every == 1  # no decision between logs
    sent = []

    def reduce(tensors):
        sent.append(tensors[0].clone())
        other = torch.tensor([0.12, 1.0, 0.0, 1.0], dtype=torch.float64)
        return [tensors[0] + other]

    s.at_log(reduce)
    assert sent[0].tolist() == pytest.approx([0.06, 1.0, 0.0, 1.0])  # no log timed yet
    assert s.every == math.ceil((0.06 + 0.12) / 2 / 0.03)  # 3
    # the logging cost per step is averaged too: 1% of a step here and on the other
    # process leaves 2% for collecting, every ceil(0.09 / 0.02) = 5th step
    with s.log_lap():
        fake.t += 0.5
    with s.log_lap():  # the first log is left out: this one, 10 steps after it, counts
        fake.t += 0.1
    sent.clear()
    other_log = 0.01

    def reduce_logs(tensors):
        sent.append(tensors[0].clone())
        return [tensors[0] + torch.tensor([0.12, 1.0, other_log, 1.0], dtype=torch.float64)]

    drive(s, fake, 10, 1.0, 0.06)
    with s.log_lap():
        fake.t += 0.1
    s.at_log(reduce_logs)
    assert sent[0][2].item() == pytest.approx(0.01)  # 0.1 s over the 10 steps since the last
    assert s.every == 5


def test_over_the_budget_the_warning_names_what_spends_it_and_what_would_help():
    """Logging and the Doctor's work at every step are said apart, with advice that can
    work: log every so many steps where logs spend the budget; where the work at every step
    alone does (a model whose step is short), no rate can, and it says so. And collecting
    once per logging interval, the least it does, costing more than the budget is said too
    (it was silent)."""
    fake = FakeTime()
    every = [0.0]

    def with_every_step(steps: int, per_step: float, log_s: float) -> None:
        for _ in range(steps // 20):
            for i in range(20):
                c = s.collect(i)
                fake.t += 1.0 + per_step + (0.06 if c else 0.0)
                fake.stats += 0.06 if c else 0.0
                every[0] += per_step
                s.done(collected=c)
            with s.log_lap():
                fake.t += log_s

    s = Sampler(max_every=20, every_n_steps=None, overhead_budget=0.03,
                clock=HostClock(now=lambda: fake.t, spent=lambda: fake.stats,
                                every_step=lambda: every[0]))
    s.start()
    with pytest.warns(ReluDoctorWarning, match=r"logging costs 5\.0% of a training step "
                      r"\(one log takes 1 s every 20 steps; a step, 1 s\) and what the Doctor "
                      r"does at every step 0\.5% .* Log "
                      r"every 100 steps or more") as rec:
        with_every_step(200, 0.005, 1.0)  # logs: 1 s every 20 steps; 5 ms at every step
    assert len(rec) == 1
    # logs cheaper later: what a later warning advises is not fewer steps than this one's
    # (a run was told "log every 200" and then "every 500")
    with_every_step(400, 0.005, 0.05)
    assert "Log every 100 steps or more" in s._advice(1.0)
    fake, every[0] = FakeTime(), 0.0
    s = Sampler(max_every=20, every_n_steps=None, overhead_budget=0.03,
                clock=HostClock(now=lambda: fake.t, spent=lambda: fake.stats,
                                every_step=lambda: every[0]))
    s.start()
    with pytest.warns(ReluDoctorWarning, match=r"every step 3\.8% .* no sampling rate keeps "
                      r"it: pass a larger overhead_budget"):
        with_every_step(200, 0.04, 0.0)
    # logs cheap, but a collecting step so dear that once per interval is over the budget
    fake = FakeTime()
    s = sampler(fake, max_every=10)
    with pytest.warns(ReluDoctorWarning, match=r"a collecting step costs 1\.5x a plain one, and "
                      r"collecting once per 10 steps is the least it does; that costs about "
                      r"5\.00% of a step, and logging with the work at every step 0\.00%.*"
                      r"Log every 20 steps or more"):
        for _ in range(10):
            drive(s, fake, 10, 1.0, 0.5)
            with s.log_lap():
                pass
    assert s.every == 10


def test_what_logging_costs_comes_out_of_the_budget_first():
    """The host clock times each log and spreads it over the steps since the previous log:
    statistics at 6% of a step would collect every 2nd step; logs at 1% of a step (0.2 s
    every 20 steps of 1 s) leave 2%, so every 3rd. The first log (writers starting, tables
    made) is not counted. Logs that spend the whole budget leave one collecting step per
    logging interval."""
    fake = FakeTime()
    s = sampler(fake, max_every=20)

    def run(log_s: float, intervals: int) -> None:
        for _ in range(intervals):
            drive(s, fake, 20, 1.0, 0.06)
            with s.log_lap():
                fake.t += log_s

    run(5.0, 1)
    assert s.every == 2  # the first log: not counted
    run(0.2, 1)
    assert s.every == 3
    # a log's seconds are charged once: not also to the step whose lap they fall in (the
    # plain step is 1 s, not 1 s + a log now and then)
    assert s._estimates() == (pytest.approx(0.06), pytest.approx(1.0))
    assert s.overhead() == pytest.approx(0.06 / 3 + 0.01)
    with pytest.warns(ReluDoctorWarning, match=r"logging costs 5\.0% .* overhead_budget=0.03"):
        run(1.0, 5)  # 5% of a step: more than the budget, said once
    assert s.every == 20
    run(0.0, 5)  # logs got cheap again (the median of the latest 5)
    assert s.every == 2
    # logging at every 2nd step: no step's lap holds a log's seconds
    fake2 = FakeTime()
    s2 = sampler(fake2, max_every=2)
    with pytest.warns(ReluDoctorWarning, match=r"logging costs 150\.0%"):
        for _ in range(10):
            drive(s2, fake2, 2, 1.0, 0.06)
            with s2.log_lap():
                fake2.t += 3.0
    laps = [*s2._on_laps, *s2._after_laps]
    assert laps and max(laps) == pytest.approx(1.06)
    # a fixed rate, or no budget, times nothing
    for kw in ({"every_n_steps": 3}, {"overhead_budget": None}):
        fixed = sampler(fake, **kw)
        with fixed.log_lap():
            fake.t += 100.0
        assert not fixed._log_laps


def _every_step_run(per_step: float, steps: int, log_every: int | None) -> Sampler:
    """Statistics at 6% of a 1 s step, ``per_step`` of every step's own work on top (the
    stopwatch's ``every_step``), a log every ``log_every`` steps (None: no log)."""
    fake = FakeTime()
    watch = sampling.Stopwatch()
    s = Sampler(every_n_steps=None, overhead_budget=0.03, max_every=log_every or 1000,
                clock=HostClock(now=lambda: fake.t, spent=lambda: fake.stats,
                                every_step=watch.read_every_step))
    s.start()
    for i in range(steps):
        c = s.collect(i % (log_every or steps))
        fake.t += 1.0 + per_step + (0.06 if c else 0.0)
        fake.stats += 0.06 if c else 0.0
        watch.every_step += per_step
        s.done(collected=c)
        if log_every and (i + 1) % log_every == 0:
            with s.log_lap():
                pass
    return s


@pytest.mark.parametrize(("per_step", "n"), [(0.0, 2), (0.01, 3)])
def test_what_every_step_does_comes_out_of_the_budget_with_the_logs(per_step, n):
    """What the Doctor does at every step, collecting or not (its step(), the optimizer
    tap's hooks), cancels out of the comparison of collecting steps with the others: it is
    read from the stopwatch's ``every_step`` at each log and counted with the log. Statistics
    at 6% of a step collect every 2nd step; 1% of every step on top leaves 2%: every 3rd."""
    s = _every_step_run(per_step, 120, 20)
    assert s.every == n
    assert s._log_s() == pytest.approx(per_step, abs=1e-4)


@pytest.mark.parametrize(("per_step", "n"), [(0.0, 2), (0.01, 3)])
def test_what_every_step_does_counts_before_any_log_is_made(per_step, n):
    """A run that logs rarely (or has not logged yet) pays for the Doctor's work at every
    step all the same: before a log was counted it is read from the stopwatch over the steps
    since the last log (it was charged only from the second log on, so the 256-site
    benchmark MLP, never logging, went 0.3 points over its budget). Statistics at 6% of a
    step and 1% of every step: every 3rd step, with no log at all."""
    s = _every_step_run(per_step, 120, None)
    assert s.every == n
    assert s.overhead() == pytest.approx((0.06 / n + per_step) / (1.0 + per_step))


def test_the_doctors_step_and_its_optimizer_tap_count_as_every_steps_work(monkeypatch):
    """The wiring of the above: the seconds spent in ``Doctor.step`` and in the optimizer
    tap's hooks go to the stopwatch's ``every_step`` (here each made 2 ms slower)."""
    import time

    from relu_doctor.optimizer_tap import OptimizerTap
    from relu_doctor.probes import Probe

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with relu_doctor.watch(net, optimizer=opt, overhead_budget=0.03) as doc:
        assert isinstance(doc.sampler.clock, HostClock)
        assert doc.sampler.clock.every_step == doc.stopwatch.read_every_step  # what it reads
        for slow, part in ((Probe, "close_pass"), (OptimizerTap, "_read_update")):
            before = doc.stopwatch.every_step
            real = getattr(slow, part)

            def slower(*a, real=real, **k):
                time.sleep(0.002)
                return real(*a, **k)

            monkeypatch.setattr(slow, part, slower)
            for _ in range(5):
                net(torch.randn(8, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                doc.step()
            monkeypatch.setattr(slow, part, real)
            assert doc.stopwatch.every_step - before >= 5 * 0.002


@real_budget
def test_the_default_counts_its_logging_steps(tmp_path):
    """End to end: a watched run whose logs cost (a listener of the test's own, on the fake
    clock) collects less often than the same run with free logs."""
    everies = []
    for log_s in (0.0, 0.4):
        fake = FakeTime()
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))

        def slow_log(_record, log_s=log_s, fake=fake):
            fake.t += log_s

        with relu_doctor.watch(net, log_every_n_steps=20) as doc:
            doc.sampler.clock = fake.clock()
            doc.sampler.start()
            doc.add_listener(slow_log)
            for _ in range(80):
                c = doc.probe.collecting
                net(torch.randn(8, 4)).sum().backward()
                fake.t += 1.0
                fake.stats += 0.06 if c else 0.0
                fake.t += 0.06 if c else 0.0
                doc.step()
        everies.append(doc.sampler.every)
    assert everies == [2, 6]  # 6% of a step; with logs at 2% of a step, 1% is left: 6


def test_a_clock_that_reports_at_logs():
    """A deferred clock (the CUDA one) gives one lap per logging interval, with the
    statistics of one timed collecting step: the step time without them is inferred."""

    class Deferred:
        device = torch.device("cpu")

        def __init__(self):
            self.laps = []

        def start(self):
            pass

        def arm(self, collects):
            pass

        def lap(self, *, collected):
            return []

        def read(self):
            out, self.laps = self.laps, []
            return out

    clock = Deferred()
    s = Sampler(every_n_steps=None, overhead_budget=0.03, max_every=50, clock=clock)  # type: ignore[arg-type]
    s.start()
    # 10 steps, all collecting, 0.1 s of statistics each, 1 s of plain work each
    clock.laps = [Lap(seconds=11.0, steps=10, collected=10, stats_s=None, per_collect=0.1)]
    s.at_log()
    assert s.every == 4  # ceil(0.1 / (0.03 * 1.0))
    assert s.overhead() == pytest.approx(0.1 / 4)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "3%", float("nan")])
def test_a_bad_budget_is_an_error_naming_it(bad):
    with pytest.raises(ReluDoctorError, match="overhead_budget"):
        relu_doctor.watch(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), overhead_budget=bad)


@pytest.mark.parametrize("bad", [0, 1.5, "every", None])
def test_a_bad_rate_is_an_error_naming_it(bad):
    with pytest.raises(ReluDoctorError, match="every_n_steps"):
        relu_doctor.watch(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), every_n_steps=bad)


# ---------------------------------------------------------------- the default
def entry_points():
    from relu_doctor.callbacks import ReluDoctor
    from relu_doctor.integrations import hf, keras

    return [relu_doctor.Doctor, ReluDoctor, keras.ReluDoctorCallback, hf.ReluDoctorCallback]


def test_every_entry_point_defaults_to_the_budget():
    for ep in entry_points():
        params = inspect.signature(ep).parameters
        assert params["overhead_budget"].default is DEFAULT_BUDGET, ep
        assert params["every_n_steps"].default == "auto", ep
    assert DEFAULT_BUDGET == 0.03
    # copies and pickles (DDP spawn, Lightning checkpoints) keep it the default
    assert copy.deepcopy(DEFAULT_BUDGET) is DEFAULT_BUDGET
    assert pickle.loads(pickle.dumps(DEFAULT_BUDGET)) is DEFAULT_BUDGET


def test_the_suite_pins_the_default_to_every_step():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert relu_doctor.watch(net).overhead_budget is None
    assert relu_doctor.watch(net, overhead_budget=0.03).overhead_budget == 0.03  # explicit: kept


@real_budget
def test_the_real_default_is_the_budget(monkeypatch):
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    doc = relu_doctor.watch(net)
    assert doc.overhead_budget == 0.03 and doc.sampler.adaptive
    assert isinstance(doc.sampler.clock, HostClock)
    assert not relu_doctor.watch(net, every_n_steps=2).sampler.adaptive
    monkeypatch.setenv(sampling.ENV, "0.1")
    assert relu_doctor.watch(net).overhead_budget == 0.1
    monkeypatch.setenv(sampling.ENV, "lots")
    with pytest.raises(ReluDoctorError, match=sampling.ENV):
        relu_doctor.watch(net)


@real_budget
def test_the_lightning_callback_passes_the_default_through(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from relu_doctor.callbacks import ReluDoctor

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, _i):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb = ReluDoctor(log_every_n_steps=2)
    trainer = pl.Trainer(
        max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Module(), DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8))
    assert cb.doctor is not None
    assert cb.doctor.overhead_budget == 0.03 and cb.doctor.sampler.adaptive


class CostlyStatistics:
    """Each statistics call costs ``per_call`` fake seconds (added to the step's time and to
    the statistics' time); each step's own work costs 1 fake second. A call is a checked one
    (``SiteStats.record_forward``/``record_grad``) or a prepared one that ran (see
    ``relu_doctor._kernels.Prepared``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fake: FakeTime, per_call: float):
        def cost() -> None:
            fake.t += per_call
            fake.stats += per_call

        for name in ("record_forward", "record_grad"):
            original = getattr(SiteStats, name)

            def costly(self_, *args, __original=original, **kwargs):
                __original(self_, *args, **kwargs)
                cost()

            monkeypatch.setattr(SiteStats, name, costly)
        run = Prepared.__call__

        def costly_prepared(self_, *args):
            ran = run(self_, *args)
            if ran:
                cost()
            return ran

        monkeypatch.setattr(Prepared, "__call__", costly_prepared)


@real_budget
@pytest.mark.parametrize("percent", [1, 10, 25])
def test_a_cost_outside_the_statistics_calls_counts_against_the_budget(monkeypatch, percent):
    """Collecting costs more than the statistics calls (hooks, gradient taps...): here the
    statistics are free and a hook of the test's own costs X% of a step on collecting steps
    only. The budget sees it from the step times (collecting against not) and collects every
    ceil(X/3)-th step; without that comparison it would collect every step. A few steps that
    span other work (an evaluation loop) do not move it."""
    log_every, steps = 50, 150
    fake = FakeTime()
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    collected = []
    with relu_doctor.watch(net, log_every_n_steps=log_every) as doc:
        doc.sampler.clock = fake.clock()
        doc.sampler.start()
        for _ in range(steps):
            collected.append(doc.probe.collecting)
            net(torch.randn(8, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            fake.t += 1.0 + (percent / 100 if collected[-1] else 0.0)
            if len(collected) in (40, 70, 71):
                fake.t += 100.0  # other work between two steps (an evaluation loop)
            doc.step()
    n = math.ceil(percent / 3)
    assert doc.sampler.every == n
    tail = collected[-60:]
    # (every step: now and then two steps left out, to time a step further from collecting)
    if n > 1:
        assert_every_nth_off_the_logs(tail, n, log_every, first=steps - 60)
    else:
        assert set(gaps(tail)) <= {1, 3}


@real_budget
@pytest.mark.parametrize("percent", [1, 3, 10, 25, 200])
def test_statistics_costing_x_percent_collect_every_ceil_x_over_3_th_step(monkeypatch, percent):
    """The default watch() on a model whose statistics cost X% of a step (a fake clock):
    it collects every ceil(X/3)-th step, at least once per logging interval; each record and
    to_pandas() state steps_collected of steps_run, and the statistics are those of exactly
    the collected steps (a reference recorded by a hook of the test's own)."""
    log_every, steps, batch = 20, 60, 8
    fake = FakeTime()
    CostlyStatistics(monkeypatch, fake, percent / 100 / 2)  # forward + gradient call
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    outputs: list[torch.Tensor] = []
    net[1].register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    collected, records = [], []
    with relu_doctor.watch(net, optimizer=opt, log_every_n_steps=log_every) as doc:
        doc.sampler.clock = fake.clock()
        doc.sampler.start()
        for _ in range(steps):
            collected.append(doc.probe.collecting)
            net(torch.randn(batch, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            fake.t += 1.0
            rec = doc.step()
            if rec is not None:
                records.append(rec)
    n = min(math.ceil(percent / 3), log_every)
    assert doc.sampler.every == n
    assert collected[:2] == [True, True]  # the first step makes the sites, the second measures
    if n == 1:  # every step, but two steps left out every third until three cycles are timed
        assert collected[:11] == [True] + [True, False, False] * 3 + [True]
        assert collected.count(False) == 6
    else:
        assert_every_nth_off_the_logs(collected[1:], n, log_every, first=1)
    assert len(records) == steps // log_every
    site = doc.sites[0]
    total = torch.zeros(6, dtype=torch.float64)
    for k, rec in enumerate(records):
        window = collected[k * log_every : (k + 1) * log_every]
        row = rec.site_rows[0]
        assert (row["steps_collected"], row["steps_run"]) == (sum(window), log_every)
        assert row["steps_collected"] >= 1  # at least once per logging interval
        # the update ratio is the logging step's, whether or not that step collected
        assert rec.layer_table["update_ratio"].notna().all() and len(rec.layer_table) == 2
        in_window = outputs[k * log_every : (k + 1) * log_every]
        for out, c in zip(in_window, window, strict=True):
            total += out.to(torch.float64).sum(0) if c else 0.0
    life = site.stats.lifetime + site.stats.window
    assert life[ROW["elements"]].tolist() == [sum(collected) * batch] * 6
    torch.testing.assert_close(life[ROW["sum"]], total)
    frame = doc.history()
    assert list(frame["steps_collected"]) == [sum(collected[i : i + log_every])
                                              for i in range(0, steps, log_every)]
    assert set(frame["steps_run"]) == {log_every}
    assert {"steps_collected", "steps_run"} <= set(doc.to_pandas().columns)


@real_budget
def test_the_default_really_samples_on_the_real_clock():
    """Statistics that cost much of a step (256 units per site, four sites, a tiny batch and
    no optimizer): the default watch() collects only some steps, on the real clock. Exact
    counts depend on timing; what is asserted holds at any speed (the statistics cost
    tens of percent of these steps, far above 3%)."""
    width, batch, log_every = 256, 2, 25
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers)
    with relu_doctor.watch(net, log_every_n_steps=log_every) as doc:
        for _ in range(4 * log_every):
            net(torch.randn(batch, width)).sum().backward()
            doc.step()
    rows = doc.history()
    first = rows[rows["site"] == rows["site"].iloc[0]]
    assert (first["steps_run"] == log_every).all()
    assert (first["steps_collected"] >= 1).all()
    assert first["steps_collected"].iloc[1:].min() < log_every  # it samples
    for _i, r in rows.iterrows():
        assert r["elements"] == r["steps_collected"] * batch * width  # counts follow it
    assert doc.sampler.every > 1 and doc.sampler.overhead() is not None


# ---------------------------------------------------------------- free when not collecting
class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **kwargs or {})


class Functional(nn.Module):
    """A module hook site and a functional one (F.relu inside a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(6, 8), nn.Linear(8, 1), nn.ReLU()

    def forward(self, x):
        return self.b(torch.nn.functional.relu(self.act(self.a(x)) - 0.1))


def _ops_of_one_step(model, opt, x, end_step=None) -> list[str]:
    with OpCounter() as counter:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if end_step is not None:
            end_step()
    return counter.ops


@real_budget
@pytest.mark.parametrize("rate", [{"every_n_steps": 2}, {}], ids=["every 2nd step", "default"])
def test_hooks_dispatch_no_op_on_a_step_that_collects_nothing(rate):
    """On a step that collects nothing the hooks (module, functional, gradient, optimizer)
    and doc.step() dispatch no torch op at all: the step's ops are exactly those of the same
    step unwatched. A collecting step records (its windows grow) and, through the fused
    kernels, dispatches nothing either; through the eager path it does (so the count can
    fail)."""
    torch.manual_seed(0)
    plain = Functional()
    watched = copy.deepcopy(plain)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_w = torch.optim.SGD(watched.parameters(), lr=0.01, momentum=0.9)
    fake = FakeTime()
    with relu_doctor.watch(watched, optimizer=opt_w, log_every_n_steps=1000, **rate) as doc:
        if doc.sampler.adaptive:  # statistics as costly as a step: the budget skips steps
            doc.sampler.clock = fake.clock()
            doc.sampler.start()
        seen = {True: 0, False: 0}
        for _ in range(8):
            x = torch.randn(4, 6)
            collecting = doc.probe.collecting

            def end_step(cost=1.0 if collecting else 0.0):
                fake.t += 1.0 + cost
                fake.stats += cost
                doc.step()

            before = _elements_seen(doc)
            ops = _ops_of_one_step(watched, opt_w, x, end_step)
            reference = _ops_of_one_step(plain, opt_p, x)
            if collecting:
                assert _elements_seen(doc) > before
                assert len(ops) >= len(reference)
            else:
                assert ops == reference
                assert _elements_seen(doc) == before
            seen[collecting] += 1
        assert seen[True] and seen[False]
        doc.probe.collecting = True
        with _kernels.disabled():
            ops = _ops_of_one_step(watched, opt_w, x)
        assert len(ops) > len(_ops_of_one_step(plain, opt_p, x))


def _elements_seen(doc: relu_doctor.Doctor) -> float:
    """Activation and gradient elements counted so far, over every site."""
    rows = [ROW["elements"], ROW["grad_elements"]]
    return sum(float((s.stats.window + s.stats.lifetime)[rows].sum()) for s in doc.sites)


@real_budget
def test_no_sync_on_non_logging_steps_under_the_default(tmp_path):
    """The budget's clock reads nothing back between logs (the detectors of test_nosync)."""
    from tests.test_nosync import SyncCounter, one_step, setup

    model, opt, doc, batches = setup("cpu", {}, tmp_path)
    assert doc.sampler.adaptive
    with doc:
        for step, x in enumerate(batches, start=1):
            with SyncCounter() as counter:
                record = one_step(model, opt, doc, x)
            if step % 5:
                assert record is None and not counter.events, dict(counter.events)
            else:
                assert record is not None and counter.events


# ---------------------------------------------------------------- CUDA (device time)
def test_cuda_clocks_arm_and_let_go_independently():
    """Two CUDA clocks timing at once each get the calls on their device; one letting go
    (a step ended, or its Doctor detached) leaves the other timing. No event is made here,
    so it runs without CUDA."""
    one, two = CudaClock("cuda:0"), CudaClock("cuda:1")
    one._made_sites = two._made_sites = True
    one.arm(True)
    two.arm(True)
    assert [d.index for d, _ in sampling._timed] == [0, 1]
    assert sampling.begin_call(torch.zeros(1)) is None  # a CPU tensor: not timed
    one.arm(False)
    assert [d.index for d, _ in sampling._timed] == [1]
    two.arm(False)
    assert not sampling._timed


def test_detach_stops_the_clock():
    armed = []

    class Clock(HostClock):
        def arm(self, collects):
            armed.append(collects)

    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with relu_doctor.watch(net, overhead_budget=0.03) as doc:
        doc.sampler.clock = Clock(doc.stopwatch.read)
        net(torch.randn(4, 2)).sum().backward()
        doc.step()
    assert armed[-1] is False


@real_budget
@cuda_only
def test_cuda_clock_times_the_statistics_calls_in_device_time():
    """begin_call/end_call bracket a statistics call with CUDA events; read() gives the
    interval's device seconds and the timed step's statistics seconds, without a wait."""
    clock = CudaClock("cuda")
    x = torch.randn(1024, 1024, device="cuda")
    clock.start()
    clock.lap(collected=True)  # the first collecting step (makes the sites) is not timed
    clock.arm(True)
    ev = sampling.begin_call(x)
    assert ev is not None
    torch.cuda._sleep(1_000_000)  # work on the device inside the "statistics call"
    sampling.end_call(ev)
    clock.lap(collected=True)
    assert not sampling._timed  # timing ends with the step
    assert sampling.begin_call(x) is None
    torch.cuda.synchronize()  # what the logging step's read-back does
    (lap,) = clock.read()
    assert lap.steps == 2 and lap.collected == 2 and lap.stats_s is None
    assert lap.per_collect is not None and 0 < lap.per_collect <= lap.seconds


@real_budget
@cuda_only
def test_default_watch_on_cuda_uses_device_time_without_sync():
    width, batch, log_every = 512, 4, 10
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())]).cuda()
    with relu_doctor.watch(net, log_every_n_steps=log_every) as doc:
        assert isinstance(doc.sampler.clock, CudaClock)
        for step in range(1, 4 * log_every + 1):
            x = torch.randn(batch, width, device="cuda")
            logging = step % log_every == 0
            torch.cuda.set_sync_debug_mode(0 if logging else "error")
            try:
                net(x).sum().backward()
                doc.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert doc.sampler.overhead() is not None  # it measured
    rows = doc.history()
    assert (rows["steps_collected"] >= 1).all() and (rows["steps_run"] == log_every).all()


# ---------------------------------------------------------------- what the host clock counts
def test_the_host_clock_counts_every_hook_not_only_the_statistics_kernels(monkeypatch):
    """The budget's host measure (the Doctor's stopwatch) covers the whole of each collecting
    hook:
    the activation hook (site lookup, gradient-tap registration), the gradient hook and the
    optimizer tap, since in a training step they cost as much as the kernels. A fake clock
    that advances only inside the gradient-tap registration and the optimizer tap's reading
    shows that both are counted (only the kernels were, before)."""
    from relu_doctor import optimizer_tap, probes

    now = [0.0]
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: now[0])  # the time module
    tap_gradient, read_grads = probes.Probe._tap_gradient, optimizer_tap.OptimizerTap._read_grads

    def slow_tap(self, output, site, keep=None):
        now[0] += 1.0
        tap_gradient(self, output, site, keep)

    def slow_read(self, opt):
        now[0] += 10.0
        read_grads(self, opt)

    monkeypatch.setattr(probes.Probe, "_tap_gradient", slow_tap)
    monkeypatch.setattr(optimizer_tap.OptimizerTap, "_read_grads", slow_read)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with relu_doctor.watch(model, optimizer=opt, overhead_budget=None) as doc:
        before = doc.stopwatch.seconds
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        doc.step()
        assert doc.stopwatch.seconds - before == 2 * 1.0 + 10.0  # two sites, one tap


def test_each_doctor_counts_only_its_own_hooks():
    """Two watched models in one process (a GAN's two networks, a teacher and a student):
    each Doctor's budget measure holds its own hooks' seconds only, so neither collects less
    often for the other's cost. The evaluation stream's Doctor has its own too."""
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    with relu_doctor.watch(a, optimizer=opt_a, overhead_budget=None, eval_stream=True) as da, \
            relu_doctor.watch(b, overhead_budget=None) as db:
        assert da.eval is not None and da.eval.stopwatch is not da.stopwatch
        assert da.stopwatch is not db.stopwatch
        assert da.probe.stopwatch is da.stopwatch and da.tap is not None
        assert da.tap.stopwatch is da.stopwatch
        b_before, eval_before = db.stopwatch.seconds, da.eval.stopwatch.seconds
        a(torch.randn(4, 6)).square().mean().backward()
        opt_a.step()
        da.step()
        assert da.stopwatch.seconds > 0.0
        assert db.stopwatch.seconds == b_before and da.eval.stopwatch.seconds == eval_before
        a_before = da.stopwatch.seconds
        b(torch.randn(4, 6)).square().mean().backward()
        db.step()
        assert db.stopwatch.seconds > b_before and da.stopwatch.seconds == a_before


def test_no_hook_of_ours_runs_on_a_step_that_collects_nothing():
    """On a step that collects nothing the hooks are parked: no relu_doctor function is
    entered during the step's forward and backward, and no module of the model has a forward
    hook, so every call takes torch's hook-free path. (Hooks that returned at their first line
    still cost the 256-site MLP 4% of such a step; before that, 7%.) The next collecting step
    has them back and records its pass."""
    import sys

    model = Functional()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with relu_doctor.watch(model, optimizer=opt, every_n_steps=4, overhead_budget=None) as doc:
        hooked = {m: (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()}
        assert any(n for pair in hooked.values() for n in pair)
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        doc.step()
        assert not doc.probe.collecting
        assert all(
            not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()
        ), "parked"
        entered: set[str] = set()

        def profile(frame, event, arg):
            if event == "call" and "relu_doctor" in frame.f_code.co_filename:
                entered.add(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            model(torch.randn(4, 6)).square().mean().backward()
        finally:
            sys.setprofile(None)
        opt.step()
        assert entered == set()
        for _ in range(3):
            doc.step()
        assert doc.probe.collecting
        assert hooked == {
            m: (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()
        }
        passes = doc.probe.passes
        model(torch.randn(4, 6)).square().mean().backward()
        assert doc.probe.passes == passes + 1


def test_remedies_that_read_dead_units_get_enough_steps_per_window_and_the_cost_is_said():
    """Statistics at 30% of a step fit a 3% budget at every 10th step; a remedy asking for 8
    collected steps per 50-step window caps the interval at 6, and the warning gives the cost
    at that rate (0.3 / 6 = 5%)."""
    fake = FakeTime()
    s = sampler(fake, max_every=50)
    drive(s, fake, 40, 1.0, 0.3)
    assert s.every == 10
    s.need_per_window(8, 50)
    assert (s.max_every, s.every) == (6, 6)
    with pytest.warns(ReluDoctorWarning, match=r"at least 8 collected steps .* every 6 steps; "
                      r"that alone costs about 5\.00% of a step \(logging not timed yet\), more "
                      r"than overhead_budget=0\.03") as rec:
        pattern = drive(s, fake, 200, 1.0, 0.3)
    assert rec[0].filename == __file__  # where the steps were driven from, not the library
    assert s.every == 6 and max(gaps(pattern)) <= 7  # calibration may stretch one cycle
    # logs that eat the whole budget: collected as often as the remedies need, and said so
    with pytest.warns(ReluDoctorWarning, match=r"logging costs .* collected every 6 "
                      r"steps, the least the bound remedies need \(8 per logging interval\)") as rec:
        for _ in range(6):
            drive(s, fake, 50, 1.0, 0.3)
            with s.log_lap():
                fake.t += 5.0
    assert rec[0].filename == __file__  # past relu_doctor and contextlib, to the with block
    # a window shorter than the steps the remedies need: pooled, said so (a trial read
    # "8 collected steps per logging window ... every 1 steps" of a 5-step window)
    fake = FakeTime()
    short = sampler(fake, max_every=5)
    short.need_per_window(8, 5)
    with pytest.warns(ReluDoctorWarning, match=r"at least 8 collected steps \(a logging window "
                      r"of 5 steps holds fewer: they pool windows until they have them\), so "
                      r"statistics are collected at every step; that alone costs"):
        drive(short, fake, 200, 1.0, 0.3)
    with pytest.warns(ReluDoctorWarning, match=r"statistics are now collected at every step, "
                      r"the least the bound remedies need"):  # (not "every 1 steps": a trial)
        for _ in range(6):
            drive(short, fake, 50, 1.0, 0.3)
            with short.log_lap():
                fake.t += 5.0
    # a fixed rate is the user's: left as given
    fixed = sampler(FakeTime(), every_n_steps=25)
    fixed.need_per_window(8, 50)
    assert [fixed.collect(i) for i in range(50)].count(True) == 2



def test_a_last_window_with_no_collecting_step_is_written_but_judges_nothing(tmp_path):
    """A sampled run whose last, partial window holds no collecting step (every 6th step,
    logs every 10, 24 steps: steps 20-23 collect nothing) writes that window all the same:
    its steps and loss are not lost, and it says it collected nothing. It judges nothing:
    its findings are the last judged window's, no listener (remedy) gets it, it is not
    among ``doc.records`` and leaves no parameter-gradient norm; ``to_pandas()`` after the
    block and the report's tables show the last judged window."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with torch.no_grad():
        net[0].bias[:6] = -50.0  # six dead units: a finding that must stand
    losses, collected, heard = [], [], []
    run = tmp_path / "run"
    with relu_doctor.watch(
        net, optimizer=opt, log_every_n_steps=10, every_n_steps=6, run_dir=run, tensorboard=True
    ) as doc:
        doc.add_listener(lambda r: heard.append(r.step))
        for _ in range(24):
            collected.append(doc.probe.collecting)
            loss = net(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            doc.step(loss=loss.detach())
    assert [i for i, c in enumerate(collected) if c] == [0, 6, 12, 18]
    assert heard == [10, 20]  # the window that saw nothing reaches no listener
    assert [(r.step, r.judged) for r in doc.records] == [(10, True), (20, True), (24, False)]
    judged = doc.records[-2]
    assert any(f.kind == "dead" and f.site == "1" for f in judged.findings)
    assert list(doc.to_pandas()["step"].unique()) == [20]
    assert len(doc._grad_norm_history) == 2
    saved = relu_doctor.load_run(run)
    last = saved.history[saved.history["step"] == 24]
    assert list(last["site"]) == ["1"]
    assert (last["steps_collected"] == 0).all() and (last["steps_run"] == 4).all()
    assert (last["elements"] == 0).all()
    assert sorted(saved.layers["step"].unique()) == [10, 20]  # no norm read after step 20
    loss_24 = saved.metrics[(saved.metrics["step"] == 24) & (saved.metrics["name"] == "loss")]
    assert float(loss_24["value"].iloc[0]) == pytest.approx(sum(losses[20:]) / 4)
    assert [f.to_dict() for f in saved.findings()] == [f.to_dict() for f in judged.findings]
    ctx = build_context(saved)
    numbers = dict(ctx.key_numbers)
    assert numbers["steps collected"].startswith("4 of 24 run")
    assert "The windows after step 20 saw nothing" in ctx.findings_stale
    assert ctx.findings_stale in summary(ctx)  # the terminal's report says it too
    assert ctx.series.heatmap_steps == [10, 20]  # no empty column for the step-24 window
    assert [r.raw["dead"] for r in ctx.sites if r.site == "1"] == [6]
    assert ctx.verdict.status != "healthy"
    # Every part of the HTML is of the judged steps: the sites table's heading, the gradient
    # flow's lines (none for step 24, which holds no gradient), the heatmaps' captions (both
    # steps with data shown: no "2 of the 3 logging steps").
    assert (ctx.shown_step, ctx.judged_steps) == (20, [10, 20])
    html = render_report(saved)
    assert re.search(r"<h2>Sites <span[^>]*>at step 20</span></h2>", html)
    fig = plots.gradient_flow_figure(saved.history, saved.layers)
    assert fig is not None
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes] == [
        ["step 10", "step 20"]] * 2
    assert "logging steps with data" not in html and " of the 3 logging steps" not in html
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_log_dir(run)))
    acc.Reload()
    fractions = acc.Scalars("relu_doctor/steps_collected_fraction")
    assert [e.step for e in fractions] == [10, 20, 24]
    assert [e.value for e in fractions] == pytest.approx([2 / 10, 2 / 10, 0.0])
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 24]


def test_the_configuration_states_the_rate_in_effect(tmp_path):
    """A run's configuration says "auto" where the budget chooses the rate, and no budget
    under a fixed rate (which ignores it)."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    cases = [({"overhead_budget": 0.05}, "auto", 0.05),
             ({"every_n_steps": 3}, 3, None),
             ({"every_n_steps": 3, "overhead_budget": 0.05}, 3, None),
             ({"overhead_budget": None}, 1, None)]
    for i, (kw, every, budget) in enumerate(cases):
        with relu_doctor.watch(net, run_dir=tmp_path / str(i), log_every_n_steps=3, **kw) as doc:
            assert (doc.every_n_steps, doc.overhead_budget) == (every, budget)
            for _ in range(3):
                net(torch.randn(3, 4)).sum().backward()
                doc.step()
        config = relu_doctor.load_run(tmp_path / str(i)).meta["config"]
        assert (config["every_n_steps"], config["overhead_budget"]) == (every, budget)


def _train_changed_at(net: nn.Module, steps: int, at: int, change: Callable[[], Any],
                      **kwargs: Any) -> tuple[Any, list[str]]:
    """Train ``net`` ``steps`` steps, logging every 5th and collecting every step, calling
    ``change()`` before step ``at``; the Doctor and its "recorded nothing" warnings."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with pytest.warns(ReluDoctorWarning) as caught, relu_doctor.watch(
        net, optimizer=opt, log_every_n_steps=5, every_n_steps=1, **kwargs
    ) as doc:
        for step in range(steps):
            if step == at:
                change()
            opt.zero_grad()
            net(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            doc.step()
    return doc, [str(w.message) for w in caught if "recorded nothing" in str(w.message)]


def test_a_window_whose_collecting_steps_saw_no_pass_warns_once_and_judges_nothing(tmp_path):
    """Left in eval mode after an evaluation, a model's training stream records nothing: a
    step counts as collected only where a training pass was recorded, a window with none
    says so once, in a warning, and its findings are the last judged window's (not
    "healthy"); the report's tables show that window."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].bias[:6] = -50.0
    run = tmp_path / "run"
    doc, said = _train_changed_at(net, 15, 7, net.eval, run_dir=run)  # never train() again
    assert len(said) == 1
    assert re.search(r"step 15 recorded nothing in its 5 collecting step\(s\): no training "
                     r"pass.*\.train\(\) again on the model", said[0])
    # (a model that never trains, a frozen teacher, is watched on its own stream: a trial was
    # told only to call model.train(), which changes its BatchNorm and dropout)
    assert "Watching a model that never trains" in said[0] and "stream='eval'" in said[0]
    assert [(r.step, r.judged) for r in doc.records] == [(5, True), (10, True), (15, False)]
    saved = relu_doctor.load_run(run)
    rows = saved.history[saved.history["site"] == "1"]
    assert list(rows["steps_collected"]) == [5, 2, 0]
    assert list(rows["elements"]) == [5 * 8 * 16, 2 * 8 * 16, 0]
    assert sorted(saved.layers["step"].unique()) == [5, 10]  # no norm where it saw nothing
    assert len(doc._grad_norm_history) == 2
    judged = [f.to_dict() for f in doc.records[1].findings]
    assert any(f["kind"] == "dead" for f in judged)
    assert [f.to_dict() for f in saved.findings()] == judged
    assert [f.to_dict() for f in doc.records[2].findings] == judged
    assert list(doc.to_pandas()["step"].unique()) == [10]
    ctx = build_context(saved)
    assert "The windows after step 10 saw nothing" in ctx.findings_stale
    assert ctx.key_numbers[[k for k, _ in ctx.key_numbers].index("steps collected")][1].startswith(
        "7 of 15 run")
    assert [r.raw["dead"] for r in ctx.sites if r.site == "1"] == [6]
    assert ctx.verdict.status != "healthy"


def test_a_window_whose_passes_ran_no_activation_says_so_not_eval_mode():
    """The model trains on, but its activation was replaced by nn.Identity: the warning
    says its passes ran no watched activation (it blamed eval mode)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    doc, said = _train_changed_at(net, 10, 5, lambda: net.__setitem__(1, nn.Identity()))
    assert len(said) == 1
    assert ("step 10 recorded nothing in its 5 collecting step(s): training passes ran in 5 "
            "of them, but no watched activation saw an element: its batches were empty, or the "
            "model's activations were replaced (by nn.Identity, say) or bypassed in its "
            "forward. ") in said[0]
    assert "eval" not in said[0]
    assert [(r.step, r.judged) for r in doc.records] == [(5, True), (10, False)]


def test_a_window_continued_in_a_second_with_block_counts_only_its_own_steps():
    """The last window of a ``with`` block is logged at its exit and kept readable; entered
    again, the Doctor starts a new window, whose steps_run and steps_collected count only
    the steps run since."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    doc = relu_doctor.watch(net, log_every_n_steps=5, every_n_steps=1, overhead_budget=None)
    for steps in (7, 3):
        with doc:
            for _ in range(steps):
                net(torch.randn(3, 4)).sum().backward()
                doc.step()
    rows = [(r.step, r.site_rows[0]["steps_collected"], r.site_rows[0]["steps_run"])
            for r in doc.records]
    assert rows == [(5, 5, 5), (7, 2, 2), (10, 3, 3)]


def test_a_window_resumed_from_a_checkpoint_counts_the_steps_run_before_it():
    """A checkpoint taken mid-window carries the steps run so far, so the resumed window
    states its sampling over all of them (it said 3 collected of 1 run)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def train(doc, n):
        for _ in range(n):
            net(torch.randn(8, 4)).sum().backward()
            doc.step()

    first = relu_doctor.Doctor(net, log_every_n_steps=5, every_n_steps=2).attach()
    train(first, 8)  # the open window: steps 5-7, of which 6 collected
    state = first.state_dict()
    first.detach()
    second = relu_doctor.Doctor(net, log_every_n_steps=5, every_n_steps=2).attach()
    second.load_state_dict(state)
    train(second, 2)  # steps 8 (collects) and 9
    row = second.records[-1].site_rows[0]
    assert (row["step"], row["steps_collected"], row["steps_run"]) == (10, 2, 5)


def test_a_step_meant_to_collect_on_which_the_model_did_not_run_hands_on_to_the_next():
    """A loop that calls doc.step() at every iteration while the watched model trains on
    every other one (a GAN's alternation): under the budget, a step meant to collect that
    recorded no pass is not a collected one, so the next step collects instead; no window
    is left without a collected step (they locked onto the other model's steps)."""
    fake = FakeTime()
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    meant, ran = [], []
    with relu_doctor.watch(net, log_every_n_steps=20, overhead_budget=0.03) as doc:
        doc.sampler.clock = fake.clock()
        doc.sampler.start()
        for i in range(160):
            c = doc.probe.collecting
            meant.append(c)
            ran.append(i % 2 == 0)
            if ran[-1]:
                net(torch.randn(8, 4)).sum().backward()
            fake.t += 1.0
            cost = 0.3 if (c and ran[-1]) else 0.0  # collecting costs 30% of a step
            fake.stats += cost
            fake.t += cost
            doc.step()
    assert doc.sampler.every >= 10  # sparse: one collecting step in ten or more
    for i in range(len(meant) - 1):
        if meant[i] and not ran[i]:
            assert meant[i + 1], f"step {i} collected nothing and handed on to no step"
    got = [r.site_rows[0]["steps_collected"] for r in doc.records]
    want = [sum(m and r for m, r in zip(meant[k:k + 20], ran[k:k + 20], strict=True))
            for k in range(0, 160, 20)]
    assert got == want and min(got) >= 1


def test_a_resumed_run_drops_the_partial_log_of_the_window_its_checkpoint_keeps_open(tmp_path):
    """Training stops at step 12 (every 6th step collects, logs every 10): its end writes
    the open window, steps 10-11, which collected nothing. Resumed from a checkpoint taken
    there, that window is logged again when it closes at step 20, so the step-12 log is
    dropped and no step is counted twice."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    run = tmp_path / "run"

    losses: list[float] = []

    def train(doc, n):
        for _ in range(n):
            loss = net(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            losses.append(float(loss))
            doc.step(loss=loss.detach())

    first = relu_doctor.Doctor(net, log_every_n_steps=10, every_n_steps=6, run_dir=run).attach()
    train(first, 12)
    state = first.state_dict()
    assert first.log_final() is not None  # steps 10-11, unjudged
    first.detach()
    first.close()
    second = relu_doctor.Doctor(
        net, log_every_n_steps=10, every_n_steps=6, run_dir=run, resume=True
    )
    second.load_state_dict(state)
    second.attach()
    train(second, 8)
    second.detach()
    second.close()
    saved = relu_doctor.load_run(run)
    rows = saved.history[["step", "steps_collected", "steps_run"]].values.tolist()
    assert rows == [[10, 2, 10], [20, 2, 10]]
    loss = saved.metrics[saved.metrics["name"] == "loss"].sort_values("step")
    assert loss["step"].tolist() == [10, 20]
    # the checkpoint carries the open window's sums: its mean covers steps 10-19, not 12-19
    assert loss["value"].tolist() == pytest.approx([sum(losses[:10]) / 10, sum(losses[10:]) / 10])
    assert dict(build_context(saved).key_numbers)["steps collected"].startswith("4 of 20 run")


def test_a_model_in_eval_mode_from_the_start_warns_once_and_its_windows_keep_their_metrics(
    tmp_path,
):
    """No training pass recorded yet (the model left in eval mode from the start): there is
    no site, but each logged window is still written for its training metrics, judges
    nothing, and one warning says why; the gradients the tap read then belong to no window.
    The report says no activation was seen. (Before: no record, no warning, and the loss of
    those steps went into the first window with a site.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    net.eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    run = tmp_path / "run"
    losses, grad_sq = [], []
    with pytest.warns(ReluDoctorWarning) as caught, relu_doctor.watch(
        net, optimizer=opt, log_every_n_steps=5, every_n_steps=1, run_dir=run
    ) as doc:
        for step in range(12):
            if step == 7:
                net.train()
            opt.zero_grad()
            loss = net(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            losses.append(float(loss))
            grad_sq.append(float(net[0].weight.grad.pow(2).sum() + net[0].bias.grad.pow(2).sum()))
            opt.step()
            doc.step(loss)
    said = [str(w.message) for w in caught if "recorded nothing" in str(w.message)]
    assert len(said) == 1 and "step 5 recorded nothing in its 5 collecting step(s)" in said[0]
    assert [(r.step, r.judged, len(r.site_rows)) for r in doc.records] == [
        (5, False, 0), (10, True, 1), (12, True, 1)]
    saved = relu_doctor.load_run(run)
    loss_rows = saved.metrics[saved.metrics["name"] == "loss"]
    assert loss_rows["step"].tolist() == [5, 10, 12]
    assert loss_rows["value"].tolist() == pytest.approx(
        [sum(losses[a:b]) / (b - a) for a, b in ((0, 5), (5, 10), (10, 12))])
    rows = saved.history[["step", "steps_collected", "steps_run"]].values.tolist()
    assert rows == [[10, 3, 5], [12, 2, 2]]
    windows = saved.tables["windows"][["step", "steps_run", "steps_collected", "judged"]]
    assert windows.values.tolist() == [[5, 5, 0, False], [10, 5, 3, True], [12, 2, 2, True]]
    numbers = dict(build_context(saved).key_numbers)
    assert (numbers["steps logged"], numbers["steps collected"]) == (
        "5–12 (3 logs)", "5 of 12 run (41.7%)")  # (5 of 7: the first window was left out)
    layer0 = saved.layers[(saved.layers["layer"] == "0") & (saved.layers["step"] == 10)]
    assert float(layer0["grad_norm"].iloc[0]) == pytest.approx(math.sqrt(sum(grad_sq[5:10]) / 5))

    # Never trained, and no loss given: every window is still written (the run's windows
    # table), and the report says why it is empty.
    net.eval()
    never = tmp_path / "never"
    with pytest.warns(ReluDoctorWarning, match="recorded nothing"), relu_doctor.watch(
        net, log_every_n_steps=5, every_n_steps=1, run_dir=never
    ) as doc:
        for _ in range(7):
            net(torch.randn(8, 4)).pow(2).mean().backward()
            doc.step()
    assert [(r.step, r.judged) for r in doc.records] == [(5, False), (7, False)]
    saved = relu_doctor.load_run(never)
    assert saved.history.empty and saved.metrics.empty
    assert saved.tables["windows"]["step"].tolist() == [5, 7]
    ctx = build_context(saved)
    assert (ctx.verdict.status, ctx.verdict.headline) == ("empty", "No activation seen")
    assert "up to step 7" in ctx.verdict.detail and "model.train()" in ctx.verdict.detail
    assert dict(ctx.key_numbers)["steps logged"] == "5–7 (2 logs, no site seen)"
    assert summary(saved).splitlines() == ["Sequential: No activation seen",
                                           f"  {ctx.verdict.detail}"]
    page = render_report(saved)
    assert "No findings: nothing was observed to judge." in page
    assert "every watched unit was active" not in page


class _Branch(nn.Module):
    """Two activation sites, the second run only at every ``b_every``-th step."""

    def __init__(self, b_every: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.b_every = b_every
        self.fc1, self.a, self.fc2, self.b = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = self.a(self.fc1(x))
        if step % self.b_every == 0:
            h = self.b(self.fc2(h))
        return self.head(h)


def _undescribed(state):
    """``state`` as a checkpoint from before sites were saved with their description: each
    site is restored when it first runs."""
    sites = {t: {k: v for k, v in st.items() if k != "site"} for t, st in state["sites"].items()}
    return {**state, "sites": sites}


@pytest.mark.parametrize("described", [True, False], ids=["described", "older checkpoint"])
@pytest.mark.parametrize(("every", "log_every", "b_every"), [(8, 5, 1), (2, 10, 8)])
def test_a_resumed_run_logs_the_windows_of_an_uninterrupted_one_whether_or_not_a_site_ran(
    every, log_every, b_every, described
):
    """Resumed mid-window from a checkpoint at step 17 that holds step 16, with a log
    before some site runs again: (8, 5, 1): no site runs between the restore and the log at
    step 20 (every 8th step collects); (2, 10, 8): site ``b`` runs at every 8th step only,
    so it is back at step 24, after the log at step 20.

    A checkpoint describes its sites, so the resumed process makes them at once: every
    window equals the uninterrupted run's (the log at 20 had no site, or no ``b``). An
    older checkpoint's sites are restored when they first run; a log before that closes
    their restored window too, so each later window holds its own steps (it also held step
    16 while saying one step collected). The lifetime counts are the uninterrupted run's."""
    xs = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(30)]

    def train(net, doc, steps):
        for i in steps:
            net(xs[i], i).pow(2).mean().backward()
            doc.step()

    def windows(doc):
        return {(r.step, x["site"]): (x["steps_collected"], x["elements"], str(x["sparsity"]))
                for r in doc.records for x in r.site_rows}

    kw = {"log_every_n_steps": log_every, "every_n_steps": every}
    net = _Branch(b_every)
    with relu_doctor.watch(net, **kw) as full:
        train(net, full, range(30))
    net = _Branch(b_every)
    with relu_doctor.watch(net, **kw) as first:
        train(net, first, range(17))
        state = first.state_dict() if described else _undescribed(first.state_dict())
    net = _Branch(b_every)
    with relu_doctor.watch(net, **kw) as resumed:
        resumed.load_state_dict(state)
        train(net, resumed, range(17, 30))
    got, want = windows(resumed), windows(full)
    not_run = set() if described else {(20, "a"), (20, "b")} if every == 8 else {(20, "b")}
    assert {k for k in want if k[0] > 17} - set(got) == not_run
    assert got == {k: v for k, v in want.items() if k[0] > 17 and k not in not_run}
    if described:
        assert got[(20, "b")][1] == 16 * 8  # step 16's, restored from the checkpoint
    assert got[(25 if every == 8 else 30, "b")][1] == 16 * 8  # one step of b: step 24
    for s in full.sites:
        assert torch.equal(resumed.probe.site(s.name).stats.lifetime, s.stats.lifetime), s.name


def test_a_restored_window_logged_at_a_with_blocks_exit_is_closed_when_the_block_is_entered_again():
    """Resumed from an older checkpoint (no site descriptions) at step 17 (every 2nd step
    collects, logs every 10), the ``with`` block ends at step 18 before any site ran: its
    exit logs the open window, which has no site yet. Entered again, the Doctor starts a
    new window, and the sites' restored windows close with the logged one: site ``a``,
    restored at step 18, holds that step alone at the log at step 20 (it held steps 10-18
    while saying one step collected)."""
    xs = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    kw = {"log_every_n_steps": 10, "every_n_steps": 2}
    net = _Branch(8)
    with relu_doctor.watch(net, **kw) as first:
        for i in range(17):
            net(xs[i], i).pow(2).mean().backward()
            first.step()
        state = _undescribed(first.state_dict())
    net = _Branch(8)
    doc = relu_doctor.watch(net, **kw)
    for steps in (range(17, 18), range(18, 20)):
        with doc:
            if steps.start == 17:
                doc.load_state_dict(state)
            for i in steps:
                net(xs[i], i).pow(2).mean().backward()
                doc.step()
    assert [(r.step, r.judged, len(r.site_rows)) for r in doc.records] == [
        (18, False, 0), (20, True, 1)]
    (row,) = doc.records[-1].site_rows
    assert (row["site"], row["steps_collected"], row["elements"]) == ("a", 1, 16 * 8)
    h = net.a(net.fc1(xs[18]))
    assert row["sparsity"] == pytest.approx(float((h <= 0).double().mean()))


def test_a_run_directory_holding_only_windows_with_no_site_is_resumed_after_its_last_log(
    tmp_path,
):
    """The windows written before any site was seen hold training metrics only; a resume
    reads the step it continues after from them too (it read the history table only, so
    it started again at step 0 and wrote steps 5 and 10 twice)."""
    run = tmp_path / "run"
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    for train, resume in ((False, False), (True, True)):
        net.train(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReluDoctorWarning)
            with relu_doctor.watch(net, log_every_n_steps=5, every_n_steps=1, run_dir=run,
                                   resume=resume) as doc:
                for _ in range(10):
                    loss = net(torch.randn(16, 4)).pow(2).mean()
                    loss.backward()
                    doc.step(loss)
    assert [r.step for r in doc.records] == [15, 20]
    saved = relu_doctor.load_run(run)
    assert saved.metrics[saved.metrics["name"] == "loss"]["step"].tolist() == [5, 10, 15, 20]
    assert sorted(saved.history["step"].unique()) == [15, 20]


def test_the_warning_of_a_resumed_window_that_saw_nothing_counts_its_steps_before_the_checkpoint():
    """The model left in eval mode from step 5, a checkpoint at step 7: the window logged at
    step 10 by the resumed process had five collecting steps, two of them before the
    checkpoint (the warning said three)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def train(doc, steps):
        for i in steps:
            net.train(i < 5)
            net(torch.randn(8, 4)).sum().backward()
            doc.step()

    with relu_doctor.watch(net, log_every_n_steps=5, every_n_steps=1) as first:
        train(first, range(7))
        state = first.state_dict()
    said = r"step 10 recorded nothing in its 5 collecting"
    with pytest.warns(ReluDoctorWarning, match=said), relu_doctor.watch(
        net, log_every_n_steps=5, every_n_steps=1
    ) as resumed:
        resumed.load_state_dict(state)
        train(resumed, range(7, 10))


def test_doc_collecting_names_the_steps_each_window_counts():
    """``doc.collecting``, read before a step's pass, says whether it collects: the steps
    it names in each window are as many as the window's ``steps_collected``."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    named: list[bool] = []
    with relu_doctor.watch(net, log_every_n_steps=6, every_n_steps=3) as doc:
        for _ in range(18):
            named.append(doc.collecting)
            net(torch.randn(3, 4)).sum().backward()
            doc.step()
    windows = doc.to_run().tables["windows"]
    assert windows["steps_collected"].tolist() == [sum(named[i:i + 6]) for i in (0, 6, 12)]
    assert named == [i % 3 == 0 for i in range(18)]


def test_a_save_without_run_dir_says_which_logs_it_no_longer_holds(tmp_path) -> None:
    """Without run_dir= a Doctor keeps its latest keep_records logs: a save after more logs
    held only those, and its report said "steps logged 1500–3000 (16 logs), steps collected
    1600 of 1600 run (100.0%)" of a 3000-step run without a word (an RL trial). The save now
    says so, and so does the report of what it saved."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1, keep_records=3) as doc:
        for _ in range(10):
            net(torch.randn(8, 4)).pow(2).mean().backward()
            doc.step()
    with pytest.warns(ReluDoctorWarning, match=r"holds the latest 3 logs, not the 2 before them"):
        doc.save(tmp_path / "saved")
    numbers = dict(build_context(relu_doctor.load_run(tmp_path / "saved")).key_numbers)
    assert numbers["steps logged"] == (
        "6–10 (3 logs); the 2 before were not kept: a Doctor that writes no run directory "
        "keeps only its latest keep_records logs")
    assert numbers["steps collected"] == "6 of 6 run (100.0%) in the logs kept"
    # continued in that directory (resume=True), the run still lacks those logs, and says so
    with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1, run_dir=tmp_path / "saved",
                           resume=True) as doc:
        for _ in range(4):
            net(torch.randn(8, 4)).pow(2).mean().backward()
            doc.step()
    run = relu_doctor.load_run(tmp_path / "saved")
    assert sorted(set(run.history["step"])) == [6, 8, 10, 12, 14]
    assert run.meta["records_dropped"] == 2
    assert dict(build_context(run).key_numbers)["steps logged"] == (
        "6–14 (5 logs); the 2 before were not kept: a Doctor that writes no run directory "
        "keeps only its latest keep_records logs")
    with warnings.catch_warnings():  # a copy of it holds every log of this process: no word
        warnings.simplefilter("error")
        doc.save(tmp_path / "copy")
    assert relu_doctor.load_run(tmp_path / "copy").meta["records_dropped"] == 2  # (its report says)
    with warnings.catch_warnings():  # all of them kept: no word of it
        warnings.simplefilter("error")
        with relu_doctor.watch(net, log_every_n_steps=2, every_n_steps=1, keep_records=5) as doc:
            for _ in range(10):
                net(torch.randn(8, 4)).pow(2).mean().backward()
                doc.step()
        doc.save(tmp_path / "whole")
    numbers = dict(build_context(relu_doctor.load_run(tmp_path / "whole")).key_numbers)
    assert numbers["steps logged"] == "2–10 (5 logs)"
    assert numbers["steps collected"] == "10 of 10 run (100.0%)"


# ---------------------------------------------------------------------- dead units, pooled


def _rare_units(seed: int = 0) -> nn.Sequential:
    """A layer of 64 units that fire on a few inputs in a hundred (a sparse code's)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[0].weight.normal_(0.0, 1.0 / math.sqrt(8))
        net[0].bias.copy_(-torch.linspace(1.6, 2.8, 64))  # P(active) ~ 5% .. 0.3%
    return net


def test_a_sampled_windows_silent_units_are_dead_where_their_past_makes_it_unlikely() -> None:
    """Silent on the few steps a sampled window collects, units read dead that every step
    collected would not (an online learner at batch 1 read 20 of 32 dead where none was: a
    trial). Pooling the windows before undercounted a dying run instead. Each silent unit of
    a sampled window is dead where a live unit with its past (Beta(1 + active, 1 + silent)
    over its moving outputs when it last fired; never seen to fire, its layer's rate in the
    window) would be silent on its outputs since with a chance under 1%; else it is
    inconclusive, neither dead nor below tau. Checked against a
    reference made here, with math.lgamma, from a hook of the test's own at the steps the
    Doctor collected; a remedy's change keeps the pasts (forgetting them made a recycler
    recycle at every log: a review)."""
    from relu_doctor._silence import ALPHA, HALF_LIFE
    from relu_doctor.events import Intervention

    net = _rare_units()
    # (window, active elements, sum of |activation|, elements) per unit, per collected step
    seen: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
    step = 0
    handle = net[1].register_forward_hook(
        lambda m, i, o: seen.append((step // 50, (o > 0).double().sum(0), o.double().abs().sum(0),
                                     len(o))) if doc.probe.collecting else None)
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=10) as doc:
        for step in range(300):
            if step == 150:  # (as a remedy records its change: at the step it was made)
                doc.record_event(Intervention("dormant_reset", "1", step, "a change"))
            if step == 200:
                with torch.no_grad():
                    net[0].bias[:4] = -50.0  # the four most active units die
            net(torch.randn(16, 8)).pow(2).mean().backward()
            doc.step()
    handle.remove()

    def silent_chance(fired_n: float, fired_a: float, m: float) -> float:  # beta-binomial
        a, b = 1.0 + fired_a, 1.0 + max(fired_n - fired_a, 0.0)
        return math.exp(math.lgamma(b + m) - math.lgamma(b) + math.lgamma(a + b)
                        - math.lgamma(a + b + m))

    ema_n, ema_a, fired_n, fired_a, since = ([0.0] * 64 for _ in range(5))
    rows = [next(r for r in rec.site_rows if r["site"] == "1") for rec in doc.records]
    kinds: set[str] = set()
    for w, row in enumerate(rows):
        act = sum(a for x, a, _, _ in seen if x == w).tolist()
        n = float(sum(k for x, _, _, k in seen if x == w))
        abs_sum = sum(s for x, _, s, _ in seen if x == w)
        site_rate = sum(act) / (64 * n)  # (a unit never seen to fire: its layer's rate)
        unsure = [act[u] == 0 and (
            silent_chance(fired_n[u], fired_a[u], since[u] + n) if fired_a[u] > 0
            else (1 - site_rate) ** (since[u] + n) if site_rate > 0 else 0.0) >= ALPHA
            for u in range(64)]
        dead = [act[u] == 0 and not unsure[u] for u in range(64)]
        kinds |= {"inconclusive"} if any(unsure) else set()
        kinds |= {"dead after firing"} if any(d and fired_a[u] > 0 for u, d in enumerate(dead)) else set()
        kinds |= {"never fired"} if any(d and fired_a[u] == 0 for u, d in enumerate(dead)) else set()
        score = ((abs_sum / n) / (abs_sum / n).mean()).tolist()
        below = [score[u] <= doc.config.tau and not unsure[u] for u in range(64)]
        assert (row["steps_collected"], row["steps_run"]) == (5, 50)
        assert (row["dead"], row["inconclusive"], row["below_tau"]) == (
            sum(dead), sum(unsure), sum(below)), (w, row)
        assert row["dormant"] == sum(b and not d for b, d in zip(below, dead, strict=True))
        keep = 0.5 ** (n / HALF_LIFE)
        for u in range(64):
            ema_n[u], ema_a[u] = ema_n[u] * keep + n, ema_a[u] * keep + act[u]
            if act[u] > 0:
                fired_n[u], fired_a[u], since[u] = ema_n[u], ema_a[u], 0.0
            else:
                since[u] += n
    assert kinds == {"inconclusive", "dead after firing", "never fired"}, kinds
    dead_finding = next(f for r in doc.records for f in r.findings if f.kind == "dead")
    assert "a silent unit is dead where a live one with its past would be" in dead_finding.message


def test_units_that_die_in_a_sampled_run_read_dead_at_their_first_silent_window() -> None:
    """A trial's layer read 0 dead for seven logs while 27-38 of its 64 units were (the
    windows before, pooled in, held the healthy first one). Units firing on half the
    inputs, silent on 80 outputs, are dead at the first window they are silent in."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=10) as doc:
        for step in range(200):
            if step == 100:
                with torch.no_grad():
                    net[0].bias[:4] = -50.0  # four units die
            net(torch.randn(16, 8)).pow(2).mean().backward()
            doc.step()
    dead = [next(r for r in rec.site_rows if r["site"] == "1")["dead"] for rec in doc.records]
    assert dead == [0, 0, 4, 4]


def _graded(fraction: float) -> str:
    from relu_doctor.diagnosis import DiagnosisConfig

    cfg = DiagnosisConfig()
    return ("critical" if fraction >= cfg.dead_critical else
            "warning" if fraction >= cfg.dead_warning else "info")


def test_never_active_on_the_first_few_sampled_steps_is_information() -> None:
    """"Never active since monitoring began" on a sampled run's first windows rests on a
    few steps (one, at the first log of a small model's budget): graded once 8 collected
    steps hold it, as the dead units of a window are."""
    net = _rare_units()
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=25) as doc:
        for _ in range(200):
            net(torch.randn(16, 8)).pow(2).mean().backward()
            doc.step()
    lifetime = [(rec.step, f.severity, f.evidence["lifetime_dead_fraction"])
                for rec in doc.records for f in rec.findings if f.kind == "lifetime_dead"]
    assert [s for s, _, _ in lifetime] == [50, 100, 150, 200]  # (2, 4, 6, 8 steps collected)
    assert [sev for _, sev, _ in lifetime[:3]] == ["info"] * 3
    assert lifetime[3][1] == _graded(lifetime[3][2]) and lifetime[0][2] >= lifetime[3][2]


def test_a_watched_model_in_train_mode_that_no_pass_ran_is_not_told_of_eval_mode() -> None:
    """A trial, told by the torch.func warning to watch one member of a vmap ensemble,
    watched a member that vmap never calls: the next warning blamed eval mode, though the
    model was in train() mode. It asks whether the watched module itself was called."""
    import copy

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    twin = copy.deepcopy(net)  # what the loop trains
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with relu_doctor.watch(net, log_every_n_steps=2, overhead_budget=None) as doc:
            for _ in range(2):
                twin(torch.randn(8, 4)).sum().backward()
                doc.step()
    said = [str(w.message) for w in caught if "recorded nothing" in str(w.message)]
    assert len(said) == 1 and "It is in train() mode: was the watched module itself called" in said[0]
    assert "Left in eval mode" not in said[0]


def test_each_units_rate_is_kept_in_checkpoints_and_forgotten_for_a_site_made_anew() -> None:
    """The rates a sampled window's silent units are judged on go into the Doctor's
    checkpoint (a resumed run judged its rare units dead again until it relearned them: a
    review), a rolled-back Doctor takes the checkpoint's, and a site taken by another module
    forgets the old one's."""
    net = _rare_units()

    def run(doc: relu_doctor.Doctor, steps: int) -> None:
        for _ in range(steps):
            net(torch.randn(16, 8)).pow(2).mean().backward()
            doc.step()

    torch.manual_seed(1)
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=10) as doc:
        run(doc, 100)
        state = doc.state_dict()
        kept = doc._silence.state.copy()
        assert kept[3].any()  # (pasts known)
        run(doc, 100)
        doc.load_state_dict(state)  # (rolled back, as a loop resuming in place does)
        assert np.array_equal(doc._silence.state, kept, equal_nan=True)
    with relu_doctor.watch(net, log_every_n_steps=50, every_n_steps=10) as fresh:
        fresh.load_state_dict(state)
        assert fresh._silence.layout == (("1", 64),)
        assert np.array_equal(fresh._silence.state, kept, equal_nan=True)
        fresh._renewed("1")
        assert not fresh._silence.state.any()
