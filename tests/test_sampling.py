"""The overhead budget: which steps collect (relu_doctor.sampling) and what records state."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import relu_doctor
from relu_doctor import sampling
from relu_doctor.errors import ReluDoctorError
from relu_doctor.sampling import Sampler
from relu_doctor.stats import ROW


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(s: Sampler, clock: FakeClock, steps: int, step_s: float, hook_s: float) -> list[bool]:
    """Run ``steps`` steps; a collecting step costs ``hook_s`` more than a plain one."""
    pattern = []
    for i in range(steps):
        c = s.collect(i)
        pattern.append(c)
        clock.t += step_s + (hook_s if c else 0.0)
        s.done(collected=c, hook_s=hook_s if c else 0.0)
    return pattern


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(sampling.time, "perf_counter", c)
    return c


def test_fixed_rate_ignores_the_budget(clock):
    s = Sampler(every_n_steps=3, overhead_budget=0.03, max_every=50)
    assert drive(s, clock, 9, 1.0, 10.0) == [True, False, False] * 3


def test_no_budget_collects_every_step(clock):
    s = Sampler(every_n_steps=None, overhead_budget=None, max_every=50)
    assert all(drive(s, clock, 20, 1.0, 10.0))


def test_the_rate_keeps_the_budget(clock):
    s = Sampler(every_n_steps=None, overhead_budget=0.03, max_every=50)
    # statistics cost 0.105 s on a 1 s step: 10.5% at every step, so every 4th step keeps 3%
    pattern = drive(s, clock, 40, 1.0, 0.105)
    assert pattern[:3] == [True, True, True]  # measuring first
    assert s.every == 4
    tail = pattern[20:]
    assert sum(tail) == len(tail) // 4
    assert s.overhead() == pytest.approx(0.105 / 4)
    # cheaper statistics: back to every step
    drive(s, clock, 40, 1.0, 0.001)
    assert s.every == 1


def test_at_least_once_per_logging_interval(clock):
    s = Sampler(every_n_steps=None, overhead_budget=0.03, max_every=5)
    pattern = drive(s, clock, 30, 1.0, 100.0)
    assert s.every == 5
    taken = [i for i, c in enumerate(pattern) if c]
    assert [b - a for a, b in itertools.pairwise(taken)][-4:] == [5, 5, 5, 5]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "3%", float("nan")])
def test_a_bad_budget_is_an_error_naming_it(bad):
    with pytest.raises(ReluDoctorError, match="overhead_budget"):
        relu_doctor.watch(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), overhead_budget=bad)


def test_records_state_the_sampling_and_counts_follow_it(clock):
    """A run under a budget: each record's steps_collected counts the steps that added
    statistics (its element counts say so independently), out of steps_run."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    batch = 8
    with relu_doctor.watch(net, log_every_n_steps=10, overhead_budget=0.03) as doc:
        for _ in range(30):
            clock.t += 1.0
            if doc.probe.collecting:  # pretend the statistics cost 10% of a step
                doc.sampler._last = (doc.sampler._last or 0.0) - 0.1
                sampling_cost = 0.1
            else:
                sampling_cost = 0.0
            net(torch.randn(batch, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            doc._clock_mark -= sampling_cost  # the measured statistics time
            rec = doc.step()
            if rec is not None:
                row = rec.site_rows[0]
                assert row["steps_run"] == 10
                assert row["elements"] == row["steps_collected"] * batch * 6
    rows = [r for rec in doc.records for r in rec.site_rows]
    assert rows[-1]["steps_collected"] < 10  # then it samples
    assert doc.overhead_budget == 0.03
    frame = doc.history()
    assert {"steps_collected", "steps_run"} <= set(frame.columns)
    site = doc.sites[0]
    lifetime = site.stats.lifetime + site.stats.window
    assert lifetime[ROW["elements"]][0] == sum(r["steps_collected"] for r in rows) * batch
